"""When to rescan: debounce, spacing after an expensive scan, and re-arm ordering.

Every event only asks for "a rescan soon"; this part decides when that rescan runs and that
two never run at once. It knows nothing of maps or files: the scan is a function passed in,
and so are the clock and the sleep, so a test drives it with a fake clock and a fake scan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio
import anyio.abc

__all__ = ["SCAN_SPACING", "RescanScheduler", "Scan"]

log = logging.getLogger("watcher.daemon")

# After a scan, the next one waits this many times its duration (beyond the debounce). A
# full read of a 10,000-mount table takes ~40 ms, and in a storm of mount changes on the
# mountinfo path every wake-up asks for one: back to back they would take a whole core.
# Spaced, scans take at most 1/(1 + 2) of a core (measured: ~35% with the wake-ups), and
# the map trails the last change by at most one scan under way + the spacing + one scan
# (4 scans, ~160 ms). A scan that reuses the mount table, or reads only the relevant mounts
# (the statmount judge: ~1-3 ms at 10,000 mounts), is not held back: the spacing follows
# the cost of the scan that was, so back-to-back relevant changes are not delayed where the
# kernel allows targeted reads.
SCAN_SPACING: Final = 2.0


class Scan(Protocol):
    """One scan and publication: `full` reads everything again; `rearm` first re-arms the
    watches (a mount may have blinded them)."""

    def __call__(self, *, full: bool, rearm: bool) -> Awaitable[None]: ...


class _Pending:
    """A client-requested scan that others may join until it starts."""

    __slots__ = ("done", "failed", "served")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.served = False
        self.failed = False


class RescanScheduler:
    """Runs `scan` once per burst of requests, never two at once, spaced after slow ones."""

    def __init__(
        self,
        scan: Scan,
        *,
        debounce_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        spacing: float = SCAN_SPACING,
    ) -> None:
        self._scan = scan
        # Changed by a reload; read at the start of every burst.
        self.debounce_s = debounce_s
        self._clock = clock
        self._sleep = sleep
        self._spacing = spacing
        self._due = anyio.Event()
        # The watches are armed by the first scan.
        self._rearm_due = True
        self._lock = anyio.Lock()
        # When the last scan ended and how long it took, for the spacing.
        self._ended = 0.0
        self._seconds = 0.0
        # The client-requested scan not yet started, which further requests join.
        self._pending: _Pending | None = None

    def request(self) -> None:
        """Something may have changed: rescan after the debounce."""
        self._due.set()

    def request_rearm(self) -> None:
        """A mount changed (or the watched paths did): the next scan re-arms the watches first."""
        self._rearm_due = True
        self._due.set()

    async def now(self, *, full: bool = True) -> None:
        """Scan now (queued behind a scan under way); for start and reload."""
        async with self._lock:
            await self._locked_scan(full=full)

    async def _locked_scan(self, *, full: bool) -> None:
        # Taken under the lock and before the scan: whatever changes after the re-arm is
        # seen by the watches, whatever changed before it is seen by this scan. A mount
        # change during the scan sets the flag again for the next one.
        rearm, self._rearm_due = self._rearm_due, False
        started = self._clock()
        try:
            await self._scan(full=full, rearm=rearm)
        except BaseException:
            # The watches may not be armed: the next scan tries again.
            self._rearm_due = self._rearm_due or rearm
            raise
        finally:
            self._ended = self._clock()
            self._seconds = self._ended - started

    async def on_request(self) -> None:
        """A client's `rescan`: a full scan that starts after this call, then return.

        Throttled, so that clients cannot make the daemon scan back to back without bound:
        requests that arrive while one is waiting to start share its scan, and a scan for
        clients keeps the same spacing after the previous scan as the debounced ones (at
        most a third of a core however many clients ask, however fast).
        """
        while True:
            pending = self._pending
            if pending is None:
                break
            # Joined before that scan started: it is as fresh as one of our own.
            await pending.done.wait()
            if pending.failed:
                raise RuntimeError("the rescan failed; see the daemon's log")
            if pending.served:
                return
            # Its requester went away before the scan started: lead the next one.
        pending = self._pending = _Pending()
        try:
            if (pause := self.pause()) > 0:
                await self._sleep(pause)
            async with self._lock:
                # From here on the scan is under way: later requests wait for the next one.
                self._pending = None
                await self._locked_scan(full=True)
            pending.served = True
        except Exception:
            pending.failed = True
            raise
        finally:
            if self._pending is pending:
                self._pending = None
            pending.done.set()

    def pause(self) -> float:
        """How long the next debounced scan still waits after the last one (the spacing)."""
        return max(0.0, self._ended + self._spacing * self._seconds - self._clock())

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve requests until cancelled."""
        task_status.started()
        while True:
            await self._due.wait()
            # Collect the burst: every request during this window is served by one scan. A
            # window fixed from the first request (not reset by each new one) keeps a
            # continuous storm from starving the map of updates.
            await self._sleep(self.debounce_s)
            # Spacing after an expensive scan; requests meanwhile are served by the scan
            # that follows it.
            if (pause := self.pause()) > 0:
                await self._sleep(pause)
            self._due = anyio.Event()
            try:
                await self.now(full=False)
            except Exception:
                # A bug in one scan must not take the map away from every client: keep
                # serving the last good generation, log the traceback for a report, and
                # let the next event try again.
                log.exception("rescan failed; still serving the last map")
