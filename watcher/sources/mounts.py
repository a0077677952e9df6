"""Mount-table changes as a wake-up signal.

The kernel marks an open `/proc/<pid>/mountinfo` with POLLPRI|POLLERR after every mount,
umount or remount in that file's mount namespace, and wakes the file's poll waiters. The
file is always readable, so waiting for readability directly would spin; instead the fd sits
in a private `select.epoll`, and the event loop waits for that epoll fd to become readable.

Measured on kernel 6.18 under anyio's asyncio backend (`unshare -m`, tmpfs mounts):

* EPOLLPRI gives one wake-up per mount, remount and umount while the loop waits, but the
  mark is cleared by whichever poll sees it first, and that includes the readiness probe
  the kernel runs when anyio registers the epoll fd for the next wait. A mount that lands
  before `run()` starts, or while `on_change` runs, was lost: 0 wake-ups for 2 mounts.
* EPOLLIN|EPOLLET (libmount's way): every wake-up of the file's waiters puts the entry on
  the epoll's ready list, and only `epoll.poll()` takes it off, so nothing the event loop
  does can consume it. 2 wake-ups for those 2 mounts; one per mount, remount and umount;
  none for propagation changes; none while idle. Registration queues one event, dropped
  in `__init__`. Skipping the `poll(0)` after a wake-up spins (9,468 wake-ups in 0.3 s after
  one mount), so it is never skipped.

A mount table that is not a proc file (a fixture that tests rewrite) cannot join an epoll
set; for those the watcher falls back to inotify on the file's directory.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import anyio
from anyio.abc import TaskStatus

from watcher.sources._fdwait import FdWait
from watcher.sources.inotify import TreeWatcher

__all__ = ["DEFAULT_MOUNTINFO", "MountTableWatcher"]

DEFAULT_MOUNTINFO: Final = "/proc/self/mountinfo"

log = logging.getLogger(__name__)


class MountTableWatcher:
    """Calls `on_change` after every mount, umount or remount seen in one mount table.

    The table is armed on construction, so a change between construction and `run()` is
    reported by the first wake-up of `run()` rather than lost. Watch the table of the
    namespace whose mounts matter: `/proc/self/mountinfo` follows the calling process's
    namespace, `/proc/1/mountinfo` follows init's.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_MOUNTINFO) -> None:
        self.path = os.fspath(path)
        self._reason = f"mount table changed ({self.path})"
        self._table_fd: int | None = None
        self._epoll: select.epoll | None = None
        self._file_watcher: TreeWatcher | None = None
        self._fd_wait = FdWait()

        try:
            table_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            # Unreadable (EACCES: /proc/1/mountinfo for an unprivileged daemon) or missing:
            # every scan reports that in the map. Not fatal: watch the file's directory as
            # for a plain file (a fixture may appear or become readable; procfs stays quiet).
            log.warning(
                "cannot open the mount table %s (%s): mount changes are not signalled; "
                "the map says so",
                self.path,
                error.strerror,
            )
            self._watch_directory()
            return
        epoll = select.epoll()
        try:
            epoll.register(table_fd, select.EPOLLIN | select.EPOLLET)
        except PermissionError:
            # EPERM is epoll's answer for regular files: not a kernel mount table.
            epoll.close()
            os.close(table_fd)
            self._watch_directory()
            return
        except BaseException:
            epoll.close()
            os.close(table_fd)
            raise
        # Registration itself queues one event, which says nothing about a change.
        epoll.poll(0)
        self._table_fd = table_fd
        self._epoll = epoll

    def _watch_directory(self) -> None:
        self._file_watcher = TreeWatcher(subdirs=())
        self._file_watcher.set_targets([str(Path(self.path).parent)])

    @property
    def pollable(self) -> bool:
        """True when the kernel signals changes; False for a plain file watched by inotify."""
        return self._file_watcher is None

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report every change until cancelled or closed; `started()` once armed."""
        if self._file_watcher is not None:
            await self._file_watcher.run(on_change, task_status=task_status)
            return
        epoll = self._require_open()
        task_status.started()
        while True:
            if not await self._fd_wait.readable(epoll.fileno()):
                return
            # Drain before reporting: a change that lands after the drain wakes us again,
            # one that lands before it is covered by the rescan this report triggers. An
            # undrained edge-triggered entry keeps the epoll fd readable: a busy loop.
            epoll.poll(0)
            on_change(self._reason)

    def close(self) -> None:
        """Release the fds; a `run()` blocked in this watcher returns. Safe to call twice."""
        if self._file_watcher is not None:
            self._file_watcher.close()
            return
        epoll, table_fd = self._epoll, self._table_fd
        self._epoll = self._table_fd = None
        if epoll is None or table_fd is None:
            return
        self._fd_wait.closing(epoll.fileno())
        epoll.close()
        os.close(table_fd)

    def _require_open(self) -> select.epoll:
        if self._epoll is None:
            raise ValueError(f"MountTableWatcher for {self.path} is closed")
        return self._epoll

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
