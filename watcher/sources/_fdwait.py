"""Waiting for a source's fd on the event loop, in a way `close()` can interrupt."""

from __future__ import annotations

import anyio


class FdWait:
    """Tracks whether a source's `run()` is parked on its fd, so `close()` can wake it.

    anyio must be told before an fd it waits on is closed (`notify_closing`), or the wait
    never ends; and it may only be told while someone waits, from the loop's own thread.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting = False

    async def readable(self, fd: int) -> bool:
        """True once `fd` is readable; False when it was closed while we waited."""
        self._waiting = True
        try:
            await anyio.wait_readable(fd)
        except anyio.ClosedResourceError:
            return False
        finally:
            self._waiting = False
        return True

    def closing(self, fd: int) -> None:
        """Call before closing `fd`: a `run()` waiting on it returns."""
        if self._waiting:
            # Only set while run() waits, which means we are on the event loop's thread.
            anyio.notify_closing(fd)
