"""The daemon's side of systemd: READY/STATUS/RELOADING/STOPPING, the watchdog, signals.

Speaking to systemd must never take the daemon down: a notification that cannot be sent is
a warning in the log. The watchdog pings come from the event loop itself, so a wedged loop
stops them and systemd restarts the service.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import anyio

from watcher.daemon.systemd import Notifier, NotifyError

__all__ = ["Lifecycle"]

log = logging.getLogger("watcher.daemon")


class Lifecycle:
    """Tells the service manager where the daemon stands; turns signals into actions."""

    def __init__(self, notifier: Notifier, *, watchdog_s: float | None = None) -> None:
        self.notifier = notifier
        # Seconds between WATCHDOG=1 pings (None: no watchdog).
        self.watchdog_s = watchdog_s

    def notify(self, **fields: str | int) -> None:
        try:
            self.notifier.notify(**fields)
        except NotifyError as error:
            log.warning("sd_notify failed: %s", error)

    def ready(self, status: str) -> None:
        self.notify(READY=1)
        self.status(status)

    def status(self, text: str) -> None:
        self.notify(STATUS=" ".join(text.splitlines()))

    def reloading(self) -> None:
        try:
            self.notifier.reloading()
        except NotifyError as error:
            log.warning("sd_notify failed: %s", error)

    async def watchdog(self) -> None:
        """Ping every `watchdog_s` seconds until cancelled (returns at once without one)."""
        if self.watchdog_s is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await anyio.sleep(self.watchdog_s)

    async def handle_signals(
        self, scope: anyio.CancelScope, reload: Callable[[], Awaitable[str]]
    ) -> None:
        """SIGHUP: RELOADING=1, `reload()`, then READY=1 with its status in every case (or
        systemd shows the unit reloading forever). SIGTERM/SIGINT: STOPPING=1, cancel `scope`.

        A reload runs beside the signal receiver, one at a time: it waits for the scan under
        way, which may be stuck, and a SIGTERM meanwhile must still stop the daemon.
        """
        reloading = anyio.Lock()

        async def one_reload() -> None:
            async with reloading:
                self.reloading()
                self.ready(await reload())

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as reloads:
                async for received in signals:
                    if received == signal.SIGHUP:
                        reloads.start_soon(one_reload)
                        continue
                    log.info("%s: shutting down", signal.Signals(received).name)
                    self.notify(STOPPING=1)
                    reloads.cancel_scope.cancel()
                    scope.cancel()
                    return
