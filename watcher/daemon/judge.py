"""Which mount-table changes can move the map: one interface, several judges.

A mount table wakes the daemon for every mount, umount and remount in its namespace. On a
node with thousands of container mounts most of those cannot change the map, and a full
rescan reads the whole table (~40 ms at 10,000 mounts). A judge decides, per wake-up,
whether to rescan:

- `EveryChange` (the mountinfo path): every wake-up may be relevant. Works everywhere.
- `FanotifyJudge`: fanotify mount events (Linux 6.15+, CAP_SYS_ADMIN) report attaches and
  detaches with their mount ids, and `statmount` rechecks the few relevant mounts on a
  wake-up (a remount gives no fanotify event).
- `StatmountJudge` (Linux 6.8+, no privileges): on every wake-up, reads the few mounts on,
  above and below the paths a scan reads (`watcher.sources.statmount`: statx, statmount,
  listmount) and compares them with the last read; only a difference asks for a rescan, and
  that rescan reads the same few mounts instead of the whole table (`targeted`).

`MountJudging` holds the judge in use and the switch from the mountinfo path to fanotify
(`GPU_DEVICE_WATCHER_MOUNT_EVENTS`: `auto`, `fanotify`, `mountinfo`). Under `auto` the
statmount judge serves from the start where the kernel allows; a process that may use
fanotify mount events switches to them at the first relevant change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

import anyio
import anyio.abc

from watcher.contract import MOUNT_EVENTS_ENV
from watcher.core.mountinfo import MountTable, PathFilter
from watcher.sources.fanotify import MountEvents, MountEventsUnavailable, unsuitable
from watcher.sources.statmount import (
    MountRecord,
    MountSyscalls,
    RelevantMounts,
    StatmountUnavailable,
    targeted_mismatch,
)

__all__ = [
    "MOUNT_EVENTS_MODES",
    "EveryChange",
    "FanotifyJudge",
    "MountJudge",
    "MountJudging",
    "StatmountJudge",
    "mount_events_mode",
]

log = logging.getLogger("watcher.daemon")

# `auto` (default): the mountinfo path until the first mount change, then fanotify mount
# events if the kernel has them (6.15+) and the process may use them (CAP_SYS_ADMIN, no
# seccomp filter); `fanotify`: fanotify mount events from the start when the kernel allows;
# `mountinfo`: always the mountinfo path (the fallback, for tests).
MOUNT_EVENTS_MODES: Final = ("auto", "fanotify", "mountinfo")


def mount_events_mode(value: str | None) -> str:
    """The mode named by the environment; a bad value is a warning and `auto`."""
    mode = value or "auto"
    if mode not in MOUNT_EVENTS_MODES:
        log.warning(
            "%s=%s is not one of %s; using auto",
            MOUNT_EVENTS_ENV,
            mode,
            ", ".join(MOUNT_EVENTS_MODES),
        )
        return "auto"
    return mode


class MountJudge(Protocol):
    """Decides whether a mount-table wake-up can have changed the map."""

    def judge(self, reason: str) -> str | None:
        """Why to rescan after this wake-up, or None when no relevant mount changed."""

    def set_filter(self, relevant: PathFilter) -> None:
        """The mounts that matter changed (a scan found other dev roots)."""

    def close(self) -> None: ...


class EveryChange:
    """The mountinfo path: every wake-up may be relevant."""

    def judge(self, reason: str) -> str | None:
        return reason

    def set_filter(self, relevant: PathFilter) -> None:
        pass

    def close(self) -> None:
        pass


class FanotifyJudge:
    """Attaches and detaches judged as they arrive (`run`); remounts on a wake-up."""

    def __init__(self, events: MountEvents) -> None:
        self.events = events

    def judge(self, reason: str) -> str | None:
        # With fanotify, attaches and detaches are judged as they arrive (MountEvents.run);
        # what is left for this wake-up to reveal is a remount, which only the attributes
        # of the relevant mounts can show.
        try:
            return self.events.recheck()
        except Exception:
            # The filter is an optimisation: a bug in it costs a rescan, never the daemon.
            log.exception("checking the relevant mounts failed; rescanning")
            return reason

    def set_filter(self, relevant: PathFilter) -> None:
        self.events.set_filter(relevant)

    def close(self) -> None:
        self.events.close()


class StatmountJudge:
    """Judges each wake-up by the relevant mounts (statx, statmount, listmount) alone.

    The last read is what the last requested rescan sees at least (that rescan starts after
    the read), so a change is judged against what the map is, or will be, built from.
    """

    def __init__(self, mounts: RelevantMounts, relevant: PathFilter) -> None:
        self._mounts = mounts
        # The scans' own reader: they run in worker threads (one at a time, under the
        # scheduler's lock) while this judge runs on the event loop.
        self._scans = RelevantMounts()
        self._filter = relevant
        self._last: dict[int, MountRecord] | None = None
        self._last = self._read()

    @classmethod
    def open(
        cls, mountinfo: str, relevant: PathFilter, calls: MountSyscalls | None = None
    ) -> StatmountJudge:
        """Raises StatmountUnavailable where the kernel or process lacks the calls."""
        mounts = RelevantMounts.open(mountinfo, calls)
        judge = cls(mounts, relevant)
        if judge._last is None:
            raise StatmountUnavailable("the relevant mounts could not be read")
        return judge

    @property
    def relevant(self) -> dict[int, str]:
        """The relevant mounts as last read, unique id -> mount point."""
        return {mount_id: record.point for mount_id, record in (self._last or {}).items()}

    def _read(self) -> dict[int, MountRecord] | None:
        try:
            return self._mounts.read(self._filter)
        except OSError as error:
            # A mount that went away mid-read, or a call that failed: the wake-up counts.
            log.debug("reading the relevant mounts: %s", error)
            return None
        except Exception:
            # The judge is an optimisation: a bug in it costs a rescan, never the daemon.
            log.exception("reading the relevant mounts failed; rescanning")
            return None

    def judge(self, reason: str) -> str | None:
        before, now = self._last, self._read()
        self._last = now
        if now is None or before is None:
            return reason
        if now == before:
            return None
        return _difference(before, now) or reason

    def set_filter(self, relevant: PathFilter) -> None:
        if relevant.key == self._filter.key:
            return
        self._filter = relevant
        # The scan that named the new paths is followed by another (Daemon._scan), which
        # starts after this read.
        self._last = self._read()

    def targeted(self, relevant: PathFilter) -> MountTable:
        """A scan's mount table from the mounts it needs (scans never run two at once)."""
        return self._scans.table(relevant)

    def close(self) -> None:
        pass


def _difference(before: dict[int, MountRecord], now: dict[int, MountRecord]) -> str | None:
    for mount_id, record in now.items():
        old = before.get(mount_id)
        if old is None:
            return f"mount on {record.point} appeared"
        if old != record:
            return f"mount on {record.point} changed (remount or move)"
    for mount_id, record in before.items():
        if mount_id not in now:
            return f"mount on {record.point} went away"
    return None


class MountJudging:
    """The judge in use for one mount table, and the switch to fanotify.

    `on_relevant(reason)` is called for every mount change that can move the map; `relevant`
    gives the current filter (it follows the dev roots that scans find).
    """

    def __init__(
        self,
        mountinfo: str,
        *,
        mode: str,
        pollable: bool,
        relevant: Callable[[], PathFilter],
        on_relevant: Callable[[str], None],
        foreign_root: str | None = None,
    ) -> None:
        """`foreign_root`: the `--root` files are read under, when `mountinfo` is another
        process's table (None: this process's own)."""
        self.mountinfo = mountinfo
        self._mode = mode
        self._foreign_root = foreign_root
        self._relevant = relevant
        self._on_relevant = on_relevant
        self.judge: MountJudge = EveryChange()
        self._statmount: StatmountJudge | None = None
        # Reads a scan's mount table from the relevant mounts alone (statmount), or None:
        # the whole table is read.
        self.targeted: Callable[[PathFilter], MountTable] | None = None
        self._pollable = pollable
        self._tasks: anyio.abc.TaskGroup | None = None
        # auto: the switch to fanotify is tried once, at the first mount change. A plain
        # file standing in for the table (inotify reports its writes) has no fanotify.
        # Another process's table never gets fanotify: its mount points are another root's
        # paths and its namespace may not be ours, while statmount names points from our
        # root, so the two cannot be matched.
        self._tried = not pollable or mode == "mountinfo" or foreign_root is not None

    async def start(self, tasks: anyio.abc.TaskGroup) -> None:
        """Choose the first judge; `tasks` runs the fanotify listener when there is one."""
        self._tasks = tasks
        if self._foreign_root is not None:
            log.info(
                "mount changes: every mountinfo wake-up rescans (%s is another process's mount "
                "table: its mount points are taken as host paths, files are read under %s)",
                self.mountinfo,
                self._foreign_root,
            )
            return
        if self._mode == "mountinfo":
            forced = f"{MOUNT_EVENTS_ENV}=mountinfo"
            log.info("mount changes: every mountinfo wake-up rescans (%s)", forced)
            return
        if not self._pollable:
            return
        # statmount first (any process may use it): the judge of every wake-up until
        # fanotify takes over attaches and detaches, and the reader of targeted scans.
        why_not_statmount = await self._open_statmount()
        if self._mode == "fanotify":
            # Listening before the mount table watcher starts: a change in between is seen
            # by both, and by the full rescan that follows the start.
            await self.switch_to_fanotify(rescan=False)
        elif (why := unsuitable()) is not None:
            self._tried = True
            if self._statmount is not None:
                log.info(
                    "mount changes: statmount of the %d relevant mounts at each mountinfo "
                    "wake-up (%s)",
                    len(self._statmount.relevant),
                    why,
                )
            else:
                log.info(
                    "mount changes: every mountinfo wake-up rescans (%s; no statmount: %s)",
                    why,
                    why_not_statmount,
                )
        else:
            # Nothing is listed, no fd is held until mounts are seen to change: a quiet
            # host never pays for it.
            log.info(
                "mount changes: mountinfo wake-ups; fanotify mount events from the first "
                "mount change"
            )

    async def _open_statmount(self) -> str | None:
        """Judge by statmount from now on where the kernel allows; why not, otherwise."""
        try:
            judge = await anyio.to_thread.run_sync(
                StatmountJudge.open, self.mountinfo, self._relevant()
            )
        except StatmountUnavailable as error:
            return str(error)
        except Exception:
            # An optimisation that failed in an unforeseen way: the mountinfo path stays.
            log.exception("mount changes: statmount failed")
            return "statmount failed"
        self._statmount = judge
        self.judge = judge
        # A scan may read the few mounts it needs instead of the whole table, once they are
        # seen to give the same answers as the table does here.
        mismatch = await anyio.to_thread.run_sync(
            targeted_mismatch, self.mountinfo, self._relevant()
        )
        if mismatch is None:
            self.targeted = judge.targeted
        else:
            log.info("mount changes: scans read the whole mount table (%s)", mismatch)
        return None

    def on_wake(self, reason: str) -> None:
        """A wake-up of the mount table: rescan if the judge says it may matter."""
        if not self._tried and self._tasks is not None:
            # Mounts change here: worth the listing fanotify needs (the switch rescans).
            self._tried = True
            self._tasks.start_soon(self.switch_to_fanotify)
        why = self.judge.judge(reason)
        if why is None:
            log.debug("mount table changed; no relevant mount did")
            return
        self._on_relevant(why)

    def set_filter(self, relevant: PathFilter) -> None:
        self.judge.set_filter(relevant)
        if self._statmount is not None and self._statmount is not self.judge:
            self._statmount.set_filter(relevant)

    async def switch_to_fanotify(self, *, rescan: bool = True) -> None:
        """Judge mount changes by fanotify mount events from now on, if the kernel allows.

        Listening starts before the mounts are listed, so no change is missed after the
        listing; one that came after the last full read and before the listing is judged by
        nobody, hence the rescan once the switch is made.
        """
        self._tried = True
        try:
            # Lists every mount once (~90 ms at 10,000): off the loop.
            events = await anyio.to_thread.run_sync(
                MountEvents.open, self.mountinfo, self._relevant()
            )
        except MountEventsUnavailable as error:
            if self._statmount is not None:
                log.info(
                    "mount changes: statmount of the %d relevant mounts at each mountinfo "
                    "wake-up (no fanotify mount events: %s)",
                    len(self._statmount.relevant),
                    error,
                )
            else:
                log.info(
                    "mount changes: every mountinfo wake-up rescans (no fanotify mount events: %s)",
                    error,
                )
            return
        except Exception:
            # An optimisation that failed in an unforeseen way: the mountinfo path stays.
            log.exception("mount changes: every mountinfo wake-up rescans (fanotify failed)")
            return
        if self._tasks is None:
            events.close()
            return
        self.judge = FanotifyJudge(events)
        await self._tasks.start(events.run, self._on_relevant)
        log.info(
            "mount changes: fanotify mount events; %d mounts, %d of them relevant",
            events.mounts,
            len(events.relevant),
        )
        if rescan:
            self._on_relevant("switched to fanotify mount events")

    def close(self) -> None:
        self._tasks = None
        self.targeted = None
        self.judge.close()
