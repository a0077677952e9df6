"""Which mount-table changes can move the map: one interface, several judges.

A mount table wakes the daemon for every mount, umount and remount in its namespace. On a
node with thousands of container mounts most of those cannot change the map, and a full
rescan reads the whole table (~40 ms at 10,000 mounts). A judge decides, per wake-up,
whether to rescan:

- `EveryChange` (the mountinfo path): every wake-up may be relevant. Works everywhere.
- `FanotifyJudge`: fanotify mount events (Linux 6.15+, CAP_SYS_ADMIN) report attaches and
  detaches with their mount ids, and `statmount` rechecks the few relevant mounts on a
  wake-up (a remount gives no fanotify event).
- Room for more: an unprivileged `statmount` judge (Linux 6.8+) would recheck the relevant
  mounts on every wake-up without fanotify; it implements `MountJudge` like these.

`MountJudging` holds the judge in use and the switch from the mountinfo path to fanotify
(`GPU_DEVICE_WATCHER_MOUNT_EVENTS`: `auto`, `fanotify`, `mountinfo`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol

import anyio
import anyio.abc

from watcher.contract import MOUNT_EVENTS_ENV
from watcher.core.mountinfo import PathFilter
from watcher.sources.fanotify import MountEvents, MountEventsUnavailable, unsuitable

__all__ = [
    "MOUNT_EVENTS_MODES",
    "EveryChange",
    "FanotifyJudge",
    "MountJudge",
    "MountJudging",
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
        elif self._mode == "mountinfo":
            forced = f"{MOUNT_EVENTS_ENV}=mountinfo"
            log.info("mount changes: every mountinfo wake-up rescans (%s)", forced)
        elif self._tried:
            return
        elif self._mode == "fanotify":
            # Listening before the mount table watcher starts: a change in between is seen
            # by both, and by the full rescan that follows the start.
            await self.switch_to_fanotify(rescan=False)
        elif (why := unsuitable()) is not None:
            self._tried = True
            log.info("mount changes: every mountinfo wake-up rescans (%s)", why)
        else:
            # Nothing is listed, no fd is held until mounts are seen to change: a quiet
            # host never pays for it.
            log.info(
                "mount changes: mountinfo wake-ups; fanotify mount events from the first "
                "mount change"
            )

    def on_wake(self, reason: str) -> None:
        """A wake-up of the mount table: rescan if the judge says it may matter."""
        why = self.judge.judge(reason)
        if why is None:
            log.debug("mount table changed; no relevant mount did")
            return
        self._on_relevant(why)
        if not self._tried and self._tasks is not None:
            self._tried = True
            self._tasks.start_soon(self.switch_to_fanotify)

    def set_filter(self, relevant: PathFilter) -> None:
        self.judge.set_filter(relevant)

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
        self.judge.close()
