"""One scan in a thread of its own, watched against a deadline.

A scan reads the host's files, and a read can block in the kernel where no flag of ours
helps (a hung NFS or FUSE mount under a driver root). Such a scan must not freeze the daemon
silently: past the deadline it is logged and `status` reports it (so a liveness probe
restarts the daemon), and a SIGTERM still stops the daemon. So the scan runs in a daemon
thread that the event loop can abandon: a worker thread of the pool would be joined at
interpreter exit and hold the process forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from watcher.contract import SCAN_DEADLINE_ENV
from watcher.daemon.state import Counters

__all__ = ["DEFAULT_SCAN_DEADLINE_S", "ScanRunner", "parse_deadline"]

log = logging.getLogger("watcher.daemon")

# A full scan of a 10,000-mount host takes ~45 ms; 200 times that is no longer slow but stuck.
DEFAULT_SCAN_DEADLINE_S: Final = 10.0

T = TypeVar("T")


def parse_deadline(text: str | None) -> float:
    """The deadline from SCAN_DEADLINE_ENV (seconds); ValueError names the fix."""
    if text is None or not text.strip():
        return DEFAULT_SCAN_DEADLINE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ValueError(
            f"{SCAN_DEADLINE_ENV}={text!r}: give seconds, more than 0 and at most 3600, or unset it"
        )
    return value


class _Outcome:
    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: object = None
        self.error: BaseException | None = None


class ScanRunner:
    """Runs one scan at a time off the loop and tells `counters` how it goes."""

    def __init__(self, counters: Counters, deadline_s: float = DEFAULT_SCAN_DEADLINE_S) -> None:
        self._counters = counters
        self.deadline_s = deadline_s

    async def run(self, scan: Callable[[], T]) -> T:
        """The result of `scan()`, run in its own thread; cancelling abandons the thread."""
        counters = self._counters
        outcome = _Outcome()
        finished = anyio.Event()
        token = anyio.lowlevel.current_token()

        def work() -> None:
            try:
                outcome.value = scan()
            except BaseException as error:  # noqa: BLE001 (handed to the loop, re-raised there)
                outcome.error = error
            # RuntimeError: the loop has closed (the daemon stopped while this scan was stuck).
            with contextlib.suppress(RuntimeError):
                anyio.from_thread.run_sync(finished.set, token=token)

        started = time.monotonic()
        counters.scan_started = started
        threading.Thread(target=work, name="gdw-scan", daemon=True).start()
        try:
            with anyio.move_on_after(self.deadline_s):
                await finished.wait()
            if not finished.is_set():
                counters.scan_overdue = True
                log.error(
                    "a scan has not finished after %g s (a read of the host view is blocked); "
                    "the map is not updated until it does; `status` reports it and exits 1",
                    self.deadline_s,
                )
                await finished.wait()
                log.warning("the overdue scan finished after %.1f s", time.monotonic() - started)
        finally:
            counters.scan_started = None
            counters.scan_overdue = False
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[return-value]
