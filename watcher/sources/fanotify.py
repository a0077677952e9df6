"""Which mount changes can matter, from fanotify mount events and statmount (Linux 6.15+).

Re-reading `/proc/self/mountinfo` costs about 25 ms of kernel time at 10,000 mounts, so a
node that churns through mounts (kubelet, containerd snapshots) would keep a daemon that
rescans on every mountinfo wake-up busy. This source tells the daemon which changes can
move the map, so that the others cost a few syscalls each and no rescan:

* fanotify with `FAN_REPORT_MNT` on this mount namespace (`FAN_MARK_MNTNS`, 6.15+) reports
  every attach and detach with the mount's 64-bit id; a move is one event with both bits.
* `statmount` (6.8+) tells an attached mount's mount point; a detached mount is gone
  (ENOENT), so the mount point of every mount is kept by id from `listmount` at start on.
* A change matters when its mount point is an ancestor of, or lies under, one of the paths
  the map is made from (dev roots, driver roots, /dev, the validations directory, proc):
  `PathFilter`, the same rule the scan uses to keep mountinfo lines.
* A remount gives no fanotify event, only a mountinfo wake-up; `recheck()` then compares the
  attributes of the few relevant mounts with what they were (statmount each).

Correctness still rests on full rescans: this only decides that a change cannot matter.
Anything it cannot decide (an unexpected statmount error, a queue overflow, a read error)
counts as relevant. Measured on 6.18: a move is one event, a remount none, propagation into
a slave namespace is reported there, `statmount` takes only the new 64-bit ids (EINVAL for
mountinfo's), about 8 us per call through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple, Self

import anyio
from anyio.abc import TaskStatus

from watcher.core.mountinfo import PathFilter
from watcher.sources._fdwait import FdWait
from watcher.sources.mountapi import STATMOUNT_MNT_BASIC, STATMOUNT_MNT_POINT, MountApi

__all__ = [
    "FAN_MNT_ATTACH",
    "FAN_MNT_DETACH",
    "MountEvent",
    "MountEvents",
    "MountEventsUnavailable",
    "parse_events",
    "same_mount_namespace",
    "unsuitable",
]

log = logging.getLogger(__name__)

# <linux/fanotify.h>
FAN_CLOEXEC: Final = 0x1
FAN_NONBLOCK: Final = 0x2
FAN_REPORT_MNT: Final = 0x4000
FAN_MARK_ADD: Final = 0x1
FAN_MARK_MNTNS: Final = 0x110
FAN_MNT_ATTACH: Final = 0x01000000
FAN_MNT_DETACH: Final = 0x02000000
FAN_Q_OVERFLOW: Final = 0x4000
FAN_EVENT_INFO_TYPE_MNT: Final = 7
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
_METADATA: Final = struct.Struct("=IBBHQii")
_INFO_HEADER: Final = struct.Struct("=BBH")  # info_type, pad, len
_MNT_ID: Final = struct.Struct("=Q")  # 8 bytes into a FAN_EVENT_INFO_TYPE_MNT record

_WANTED: Final = STATMOUNT_MNT_BASIC | STATMOUNT_MNT_POINT
_MOUNT_EVENTS: Final = FAN_MNT_ATTACH | FAN_MNT_DETACH

_READ_SIZE: Final = 64 * 1024
# As for inotify: bounds the work per wake-up; the fd stays readable for the next turn.
_READS_PER_WAKE: Final = 16
# Reasons reported per wake-up; one relevant change is enough to rescan.
_MAX_REASONS: Final = 4


class MountEventsUnavailable(Exception):
    """This kernel, process or mount table cannot be watched this way; the message says why."""


class MountEvent(NamedTuple):
    mask: int
    mount_id: int


def parse_events(data: bytes) -> tuple[list[MountEvent], bool]:
    """Decode one read of a `FAN_REPORT_MNT` group: (events, whether the queue overflowed)."""
    events: list[MountEvent] = []
    overflow = False
    offset = 0
    while offset + _METADATA.size <= len(data):
        length, _version, _reserved, metadata_length, mask, _fd, _pid = _METADATA.unpack_from(
            data, offset
        )
        if length < _METADATA.size or offset + length > len(data):
            break  # malformed: never loop on it
        if mask & FAN_Q_OVERFLOW:
            overflow = True
        record = offset + metadata_length
        while record + _INFO_HEADER.size <= offset + length:
            info_type, _pad, info_length = _INFO_HEADER.unpack_from(data, record)
            if info_length < _INFO_HEADER.size:
                break
            if info_type == FAN_EVENT_INFO_TYPE_MNT and record + 16 <= offset + length:
                (mount_id,) = _MNT_ID.unpack_from(data, record + 8)
                events.append(MountEvent(mask, mount_id))
            record += info_length
        offset += length
    return events, overflow


def same_mount_namespace(mountinfo: str) -> bool:
    """Whether `mountinfo` (`/proc/<pid>/mountinfo`) is the table of our own namespace.

    statmount names mount points as seen from our root, and the fanotify mark is on our
    namespace: another namespace's table (`/proc/1/mountinfo` from inside a service's
    private namespace) is left to the mountinfo path.
    """
    if os.path.basename(mountinfo) != "mountinfo":
        return False
    try:
        theirs = os.stat(os.path.join(os.path.dirname(mountinfo), "ns", "mnt"))
        ours = os.stat("/proc/self/ns/mnt")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


_CAP_SYS_ADMIN: Final = 21


def unsuitable(status_path: str = "/proc/self/status") -> str | None:
    """Why this process should not try fanotify mount events on its own, or None.

    `FAN_REPORT_MNT` needs CAP_SYS_ADMIN, which the shipped systemd unit never grants: there
    the attempt would only fail. Under a seccomp filter (a systemd SystemCallFilter=, a
    container's profile) `fanotify_init` may be refused, and where the filter's action is
    to kill (SystemCallFilter= without SystemCallErrorNumber=) the attempt would kill the
    daemon: it is left to an explicit GPU_DEVICE_WATCHER_MOUNT_EVENTS=fanotify.
    """
    try:
        with open(status_path, encoding="ascii", errors="replace") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
    except OSError as error:
        return f"cannot read {status_path}: {error.strerror}"
    try:
        effective = int(fields.get("CapEff", "0").strip(), 16)
        seccomp = int(fields.get("Seccomp", "0").strip() or "0")
    except ValueError:
        return f"cannot parse {status_path}"
    if not effective & (1 << _CAP_SYS_ADMIN):
        return "fanotify mount events need CAP_SYS_ADMIN"
    if seccomp == 2:
        return "a seccomp filter is active (GPU_DEVICE_WATCHER_MOUNT_EVENTS=fanotify overrides)"
    return None


@dataclass(frozen=True, slots=True)
class _Mount:
    point: str
    parent: int
    attributes: int


class _Syscalls:
    """fanotify_init/mark through ctypes, and the mount API (one instance per thread)."""

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syscall = libc.syscall
            self._fanotify_init = libc.fanotify_init
            self._fanotify_mark = libc.fanotify_mark
        except (OSError, AttributeError) as error:
            raise MountEventsUnavailable(f"no fanotify in the C library: {error}") from None
        syscall.restype = ctypes.c_long
        self._api = MountApi(syscall)
        self._fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self._fanotify_init.restype = ctypes.c_int
        self._fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._fanotify_mark.restype = ctypes.c_int

    def fanotify_mount_group(self) -> int:
        fd: int = self._fanotify_init(FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY)
        if fd < 0:
            raise _os_error("fanotify_init(FAN_REPORT_MNT)")
        try:
            self._mark_namespace(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _mark_namespace(self, fd: int) -> None:
        namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            marked = self._fanotify_mark(
                fd, FAN_MARK_ADD | FAN_MARK_MNTNS, _MOUNT_EVENTS, namespace, None
            )
        finally:
            os.close(namespace)
        if marked != 0:
            raise _os_error("fanotify_mark(FAN_MARK_MNTNS)")

    def statmount(self, mount_id: int) -> _Mount | None:
        """The mount's point, parent and attributes; None once it is gone (ENOENT)."""
        reply = self._api.statmount(mount_id, _WANTED)
        if reply is None:
            return None
        if not reply.has(_WANTED):
            raise OSError(errno.EINVAL, f"statmount({mount_id}) left out the mount point")
        basic = reply.basic()
        return _Mount(reply.string(STATMOUNT_MNT_POINT), basic.parent, basic.attributes)

    def listmount(self) -> list[int]:
        """Every mount id of this namespace (below our root), in ascending order."""
        return self._api.listmount()


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


class MountEvents:
    """Tells which mount changes in this namespace can change the map.

    `open()` starts listening before it lists the mounts, so none is missed in between.
    `run()` reports relevant attaches and detaches; `recheck()`, called on every mountinfo
    wake-up, reports relevant remounts; `set_filter()` follows the dev roots as they move.
    """

    def __init__(self, fd: int, syscalls: _Syscalls, relevant: PathFilter) -> None:
        self._fd: int | None = fd
        self._sys = syscalls
        self._filter = relevant
        # Every mount of the namespace by id: its mount point is what decides relevance,
        # and after a detach statmount can no longer tell it.
        self._points: dict[int, str] = {}
        # The relevant ones, as last seen: a remount shows up only as a difference here.
        self._relevant: dict[int, _Mount] = {}
        # Set after an unrecoverable read error: from then on every change counts.
        self._broken: str | None = None
        self._fd_wait = FdWait()

    @classmethod
    def open(cls, mountinfo: str, relevant: PathFilter) -> MountEvents:
        """Listen on the namespace whose table is `mountinfo`; raises MountEventsUnavailable.

        A change matters when `relevant` covers its mount point (before or after a move).

        Lists every mount once (listmount + one statmount each: ~80 ms at 10,000 mounts).
        """
        if not same_mount_namespace(mountinfo):
            raise MountEventsUnavailable(f"{mountinfo} is not this process's mount table")
        syscalls = _Syscalls()
        try:
            fd = syscalls.fanotify_mount_group()
        except OSError as error:
            # EINVAL: no FAN_REPORT_MNT (before 6.15); EPERM: no CAP_SYS_ADMIN.
            raise MountEventsUnavailable(str(error)) from None
        events = cls(fd, syscalls, relevant)
        try:
            events._sync()
        except OSError as error:
            events.close()
            # ENOSYS: no listmount/statmount (before 6.8).
            raise MountEventsUnavailable(str(error)) from None
        return events

    @property
    def filter(self) -> PathFilter:
        return self._filter

    @property
    def mounts(self) -> int:
        return len(self._points)

    @property
    def relevant(self) -> dict[int, str]:
        """The relevant mounts now, id -> mount point."""
        return {mount_id: mount.point for mount_id, mount in self._relevant.items()}

    def set_filter(self, fresh: PathFilter) -> None:
        """Judge relevance by `fresh` from now on (a no-op when it keeps the same paths)."""
        if fresh.key == self._filter.key:
            return
        self._filter = fresh
        relevant: dict[int, _Mount] = {}
        for mount_id, point in self._points.items():
            if fresh.covers(point):
                mount = self._statmount(mount_id)
                if mount is not None:
                    relevant[mount_id] = mount
        self._relevant = relevant

    def recheck(self) -> str | None:
        """After a mountinfo wake-up: why the map may have changed, or None if it cannot.

        Catches remounts (no fanotify event) of relevant mounts; relevant attaches and
        detaches are reported by `run()` as well, whichever comes first.
        """
        if self._broken is not None:
            return self._broken
        reason = None
        for mount_id, before in list(self._relevant.items()):
            try:
                now = self._sys.statmount(mount_id)
            except OSError as error:
                return f"cannot check mount {mount_id} ({before.point}): {error.strerror}"
            if now is None:
                del self._relevant[mount_id]
                reason = reason or f"mount on {before.point} went away"
            elif now != before:
                self._relevant[mount_id] = now
                reason = reason or f"mount on {now.point} changed (remount or move)"
        return reason

    def drain(self) -> list[str]:
        """Read what is queued (bounded) and return the reasons of the relevant changes."""
        fd = self._require_open()
        if self._broken is not None:
            self._discard(fd)
            return [self._broken]
        reasons: list[str] = []
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as error:
                self._broken = (
                    f"fanotify mount events failed ({error.strerror}): every change counts"
                )
                log.error("%s", self._broken)
                return [self._broken]
            events, overflow = parse_events(data)
            if overflow:
                # Events were dropped: forget what was known and list everything again.
                self._discard(fd)
                self._resync()
                return ["fanotify queue overflow"]
            for event in events:
                reason = self._apply(event)
                if reason is not None and len(reasons) < _MAX_REASONS:
                    reasons.append(reason)
        return reasons

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report relevant attaches and detaches until cancelled or closed."""
        fd = self._require_open()
        task_status.started()
        while True:
            if not await self._fd_wait.readable(fd):
                return
            try:
                reasons = self.drain()
            except Exception:
                # Unforeseen: from now on every change counts (a rescan each), as on the
                # mountinfo path, rather than the daemon going down.
                self._broken = "fanotify mount events failed: every change counts"
                log.exception("%s", self._broken)
                reasons = [self._broken]
            for reason in reasons:
                on_change(reason)

    def close(self) -> None:
        """Release the fanotify fd; a `run()` waiting here returns. Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._fd_wait.closing(fd)
        os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError("MountEvents is closed")
        return self._fd

    def _statmount(self, mount_id: int) -> _Mount | None:
        try:
            return self._sys.statmount(mount_id)
        except OSError as error:
            # Not ENOENT (that is None): keep it as relevant with attributes that can never
            # match, so that the next recheck reports it rather than trusting a guess.
            log.debug("statmount %d: %s", mount_id, error)
            return _Mount(self._points.get(mount_id, "?"), -1, -1)

    def _apply(self, event: MountEvent) -> str | None:
        mount_id = event.mount_id
        before = self._points.get(mount_id)
        after: str | None = None
        if event.mask & FAN_MNT_DETACH:
            self._points.pop(mount_id, None)
            self._relevant.pop(mount_id, None)
        if event.mask & FAN_MNT_ATTACH:
            try:
                mount = self._sys.statmount(mount_id)
            except OSError as error:
                return f"mount {mount_id} attached, unreadable ({error.strerror})"
            if mount is not None:
                # None: detached again before we looked; its detach event follows.
                after = mount.point
                self._points[mount_id] = after
                if self._filter.covers(after):
                    self._relevant[mount_id] = mount
        relevant_before = before is not None and self._filter.covers(before)
        relevant_after = after is not None and self._filter.covers(after)
        if not (relevant_before or relevant_after):
            return None
        if before is not None and after is not None:
            return f"mount moved from {before} to {after}"
        if after is not None:
            return f"mount attached on {after}"
        return f"mount detached from {before}"

    def _discard(self, fd: int) -> None:
        while True:
            try:
                if not os.read(fd, _READ_SIZE):
                    return
            except OSError:
                return

    def _sync(self) -> None:
        points: dict[int, str] = {}
        relevant: dict[int, _Mount] = {}
        for mount_id in self._sys.listmount():
            mount = self._sys.statmount(mount_id)
            if mount is None:
                continue  # detached since the listing: its event is queued
            points[mount_id] = mount.point
            if self._filter.covers(mount.point):
                relevant[mount_id] = mount
        self._points, self._relevant = points, relevant

    def _resync(self) -> None:
        try:
            self._sync()
        except OSError as error:
            self._broken = f"cannot list mounts again ({error.strerror}): every change counts"
            log.error("%s", self._broken)
