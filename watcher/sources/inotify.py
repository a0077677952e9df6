"""inotify watches on the directories whose contents make up the device map.

The watcher reports "something under this path may have changed" and nothing more: the
daemon rescans, so no event is decoded into state and a lost event costs latency, never
correctness. Three kernel facts shape it (see DESIGN.md, measured on 6.18):

* A watch on a directory goes blind when something is mounted over it, and no event says
  so. The owner calls `set_targets()` after every mount-table change; that re-arms every
  watch, so a target now covered by a mount is watched on the new mount's root.
* A missing target (`/run/nvidia/driver/dev` before the driver pod starts) is waited for by
  watching its nearest existing ancestor for the next path component to appear.
* IN_Q_OVERFLOW means events were dropped: everything is re-armed and "overflow" reported.

pyinotify's `WatchManager` keeps the inotify instance and the watch descriptors. Its
`Notifier` is not used: its event processing drops events for watch descriptors it no
longer knows (the ones a re-arm just retired), sends IN_Q_OVERFLOW only to a default
handler, logs at ERROR level on IN_MOVE_SELF, and raises on a file name that is not UTF-8.
Reading the fd here is a struct unpack per event and avoids all four.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, NamedTuple, Self

import anyio
from anyio.abc import TaskStatus

from watcher.sources._fdwait import FdWait

with warnings.catch_warnings():
    # pyinotify imports asyncore for a notifier this module never uses.
    warnings.filterwarnings("ignore", "The asyncore module is deprecated", DeprecationWarning)
    import pyinotify

__all__ = ["OVERFLOW", "TreeWatcher"]

log = logging.getLogger(__name__)

OVERFLOW: Final = "overflow"
"""The reason reported when the kernel dropped events: rescan everything."""

IN_ATTRIB: Final[int] = pyinotify.IN_ATTRIB
IN_CLOSE_WRITE: Final[int] = pyinotify.IN_CLOSE_WRITE
IN_CREATE: Final[int] = pyinotify.IN_CREATE
IN_DELETE: Final[int] = pyinotify.IN_DELETE
IN_DELETE_SELF: Final[int] = pyinotify.IN_DELETE_SELF
IN_DONT_FOLLOW: Final[int] = pyinotify.IN_DONT_FOLLOW
IN_IGNORED: Final[int] = pyinotify.IN_IGNORED
IN_ISDIR: Final[int] = pyinotify.IN_ISDIR
IN_MOVE_SELF: Final[int] = pyinotify.IN_MOVE_SELF
IN_MOVED_FROM: Final[int] = pyinotify.IN_MOVED_FROM
IN_MOVED_TO: Final[int] = pyinotify.IN_MOVED_TO
IN_Q_OVERFLOW: Final[int] = pyinotify.IN_Q_OVERFLOW
IN_UNMOUNT: Final[int] = pyinotify.IN_UNMOUNT

_GONE: Final = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT
_APPEARED_OR_WENT: Final = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
# One mask for every watch: inotify keeps one mask per inode, and a placeholder ancestor
# can be the same inode as a target (or a bind mount of one).
WATCH_MASK: Final = _APPEARED_OR_WENT | IN_ATTRIB | IN_CLOSE_WRITE | _GONE

_EVENT_HEADER: Final = struct.Struct("=iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ_SIZE: Final = 64 * 1024
# Bounds the work per wake-up during an event storm; the fd stays readable, so the rest is
# read on the next turn of the event loop after other tasks ran.
_READS_PER_WAKE: Final = 16
# A target that vanishes and reappears this often while it is being armed is left to the
# next re-arm; the events of that churn trigger one.
_ARM_ATTEMPTS: Final = 8

_FLAG_NAMES: Final = tuple(
    sorted(
        (value, name)
        for name, value in pyinotify.EventsCodes.ALL_FLAGS.items()
        if name in pyinotify.EventsCodes.OP_FLAGS
        or name in pyinotify.EventsCodes.EVENT_FLAGS
        or name == "IN_ISDIR"
    )
)


def describe_mask(mask: int) -> str:
    """`IN_CREATE|IN_ISDIR` for an event mask."""
    return "|".join(name for value, name in _FLAG_NAMES if mask & value) or hex(mask)


class _Event(NamedTuple):
    wd: int
    mask: int
    name: str


@dataclass(slots=True)
class _Watch:
    """What one watch descriptor stands for; one inode can serve several targets."""

    path: str
    # Entries of a tree watch are reported; a placeholder reports only `awaited` names.
    tree: bool = False
    # A target root: a subdirectory appearing or going away changes the set of watches.
    descend: bool = False
    # Placeholder: next path components of missing targets below this directory.
    awaited: set[str] = field(default_factory=set)


class TreeWatcher:
    """Reports changes in a set of directories, each watched with its subdirectories.

    `subdirs` names the subdirectories of a target that are watched too (None: all of
    them); symlinks are never followed. Targets are armed by `set_targets()`, which may be
    called before or during `run()`; events that arrive before `run()` wait in the kernel.
    """

    def __init__(
        self,
        *,
        subdirs: Collection[str] | None = None,
        names: Callable[[str], bool] | None = None,
    ) -> None:
        self._subdirs = None if subdirs is None else frozenset(subdirs)
        # On a real host /dev is busy (every close of /dev/null after a write is an
        # IN_CLOSE_WRITE there); `names` keeps events about other entries from costing a
        # rescan each. The watched directories themselves going away always counts.
        self._names = names
        self._targets: tuple[str, ...] = ()
        self._watches: dict[int, _Watch] = {}
        self._fd_wait = FdWait()
        self._manager = pyinotify.WatchManager()
        fd: int = self._manager.get_fd()
        # pyinotify calls inotify_init() without flags; a daemon must not leak it to
        # children, and a read must never block the event loop.
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        self._fd: int | None = fd

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    @property
    def watched_paths(self) -> frozenset[str]:
        """Every path holding a watch now: targets, their subdirectories, placeholders."""
        return frozenset(watch.path for watch in self._watches.values())

    def set_targets(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Watch these directories from now on, re-arming every watch.

        Call it after every mount-table change, before the rescan that change triggers:
        anything that changed before the new watches landed is then seen by that rescan.
        """
        self._require_open()
        self._targets = tuple(
            dict.fromkeys(os.path.normpath(os.path.abspath(os.fspath(p))) for p in paths)
        )
        self._rearm()

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report changes until cancelled or closed; `started()` once waiting."""
        fd = self._require_open()
        task_status.started()
        while True:
            if not await self._fd_wait.readable(fd):
                return
            self._dispatch(self._read_events(fd), on_change)

    def close(self) -> None:
        """Drop every watch and the inotify fd; a `run()` waiting here returns."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._fd_wait.closing(fd)
        self._watches.clear()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError("TreeWatcher is closed")
        return self._fd

    def _read_events(self, fd: int) -> list[_Event]:
        events: list[_Event] = []
        for _ in range(_READS_PER_WAKE):
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                offset += _EVENT_HEADER.size
                # The kernel pads the name with NULs to an alignment boundary.
                raw_name = data[offset : offset + length].split(b"\0", 1)[0]
                offset += length
                events.append(_Event(wd, mask, os.fsdecode(raw_name)))
        return events

    def _dispatch(self, events: Iterable[_Event], on_change: Callable[[str], None]) -> None:
        reasons: list[str] = []
        overflow = False
        rearm = False
        for event in events:
            what = describe_mask(event.mask)
            if event.mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            watch = self._watches.get(event.wd)
            if watch is None:
                # A watch retired by a re-arm. Its IN_IGNORED is our own doing; anything
                # else was queued before the re-arm and is reported in case it matters.
                if not event.mask & IN_IGNORED:
                    subject = f" {event.name}" if event.name else ""
                    reasons.append(f"{what}{subject} (retired watch {event.wd})")
                continue
            if event.mask & IN_IGNORED:
                # The kernel dropped the watch: its inode was deleted or unmounted.
                del self._watches[event.wd]
                self._manager.watches.pop(event.wd, None)
                rearm = True
                reasons.append(f"{what} {watch.path}")
            elif event.mask & _GONE:
                rearm = True
                reasons.append(f"{what} {watch.path}")
            elif event.name:
                awaited = event.name in watch.awaited
                subdir_came_or_went = (
                    watch.descend
                    and bool(event.mask & IN_ISDIR)
                    and bool(event.mask & _APPEARED_OR_WENT)
                    and self._wants_subdir(event.name)
                )
                rearm = rearm or awaited or subdir_came_or_went
                wanted = self._names is None or self._names(event.name) or subdir_came_or_went
                if (watch.tree and wanted) or awaited:
                    reasons.append(f"{what} {os.path.join(watch.path, event.name)}")
            elif watch.tree:
                reasons.append(f"{what} {watch.path}")
        # Re-arm before reporting, so that the rescan the report triggers runs after the new
        # watches landed and sees whatever they could not.
        if overflow or rearm:
            self._rearm()
        if overflow:
            on_change(OVERFLOW)
            return
        for reason in reasons:
            on_change(reason)

    def _wants_subdir(self, name: str) -> bool:
        return self._subdirs is None or name in self._subdirs

    def _rearm(self) -> None:
        # Add first, retire after: an inode that stays watched keeps its watch descriptor,
        # so re-arming leaves no window in which its events are lost.
        watches: dict[int, _Watch] = {}
        for target in self._targets:
            self._arm_target(target, watches)
        for wd in set(self._manager.watches) - watches.keys():
            try:
                self._manager.rm_watch(wd, quiet=False)
            except pyinotify.WatchManagerError:
                # The kernel dropped it already; its IN_IGNORED is still queued.
                self._manager.watches.pop(wd, None)
        self._watches = watches

    def _arm_target(self, target: str, watches: dict[int, _Watch]) -> None:
        for _ in range(_ARM_ATTEMPTS):
            try:
                mode: int | None = os.lstat(target).st_mode
            except OSError:
                mode = None
            if mode is not None:
                wd = self._add_watch(target, follow_symlink=False)
                if wd is None:
                    if os.path.lexists(target):
                        return  # cannot be watched at all; _add_watch said why
                    continue  # removed meanwhile: look again
                watch = watches.setdefault(wd, _Watch(target))
                watch.tree = True
                if stat.S_ISDIR(mode):
                    watch.descend = True
                    # Listed after the target's watch landed: a subdirectory created later
                    # is reported by that watch and re-arms.
                    self._arm_subdirs(target, watches)
                return
            ancestor, next_name = _nearest_directory(target)
            # The ancestor may be reached through a symlink (/var/run): follow it, since
            # the kernel follows it too when the target is looked up.
            wd = self._add_watch(ancestor, follow_symlink=True)
            if wd is None:
                if os.path.isdir(ancestor):
                    return
                continue
            watches.setdefault(wd, _Watch(ancestor)).awaited.add(next_name)
            if not os.path.lexists(os.path.join(ancestor, next_name)):
                return
            # It appeared before the watch landed, so no event will announce it.
        log.warning("%s kept changing while being watched; left to the next re-arm", target)

    def _arm_subdirs(self, target: str, watches: dict[int, _Watch]) -> None:
        try:
            with os.scandir(target) as entries:
                names = [
                    entry.name
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False) and self._wants_subdir(entry.name)
                ]
        except OSError:
            return  # the target went away; its own IN_DELETE_SELF re-arms
        for name in names:
            path = os.path.join(target, name)
            wd = self._add_watch(path, follow_symlink=False)
            if wd is not None:
                watches.setdefault(wd, _Watch(path)).tree = True

    def _add_watch(self, path: str, *, follow_symlink: bool) -> int | None:
        mask = WATCH_MASK if follow_symlink else WATCH_MASK | IN_DONT_FOLLOW
        try:
            # quiet=True would log every failure at ERROR level; most are races with a
            # directory going away, which the caller handles.
            added = self._manager.add_watch(path, mask, quiet=False)
        except pyinotify.WatchManagerError as error:
            if os.path.lexists(path):
                log.warning("cannot watch %s: %s", path, error)
            return None
        except UnicodeEncodeError:
            return self._add_watch_by_fd(path, mask)
        wd: int = added[path]
        return wd

    def _add_watch_by_fd(self, path: str, mask: int) -> int | None:
        """Watch `path` whose name is not UTF-8 (pyinotify encodes names strictly).

        The same inode has an ASCII name: /proc/self/fd/N of an O_PATH descriptor, opened
        with O_NOFOLLOW where the watch must not follow a symlink (the descriptor is then
        the symlink itself, as IN_DONT_FOLLOW would watch it).
        """
        flags = os.O_PATH | os.O_CLOEXEC | (os.O_NOFOLLOW if mask & IN_DONT_FOLLOW else 0)
        try:
            fd = os.open(path, flags)
        except OSError as error:
            if os.path.lexists(path):
                log.warning("cannot watch %r: %s", path, error.strerror)
            return None
        alias = f"/proc/self/fd/{fd}"
        try:
            added = self._manager.add_watch(alias, mask & ~IN_DONT_FOLLOW, quiet=False)
        except pyinotify.WatchManagerError as error:
            log.warning("cannot watch %r: %s", path, error)
            return None
        finally:
            os.close(fd)
        wd: int = added[alias]
        return wd


def _nearest_directory(path: str) -> tuple[str, str]:
    """The closest existing ancestor directory of `path` and the next component below it."""
    child = path
    parent = os.path.dirname(child)
    while parent != child and not os.path.isdir(parent):
        child, parent = parent, os.path.dirname(parent)
    return parent, os.path.basename(child)
