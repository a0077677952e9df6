"""The composition root of `serve`: event sources -> debounced rescan -> published map.

Every kernel signal only means "rescan soon". A rescan reads the whole host view off the
event loop, builds a complete map and publishes it as a new generation only when it differs,
so correctness never rests on decoding individual events; only latency does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import anyio
import anyio.abc

from watcher import logs
from watcher.config import ConfigError, Settings
from watcher.core.devices import NVIDIA
from watcher.core.diff import describe
from watcher.core.model import DeviceMap
from watcher.core.scan import HostView, build_map
from watcher.probe import read_host, utc_now
from watcher.sources.inotify import TreeWatcher
from watcher.sources.mounts import MountTableWatcher
from watcher.state import Counters, MapState
from watcher.systemd import Notifier, NotifyError, listen_fds, watchdog_interval

log = logging.getLogger("watcher.daemon")


def summary(device_map: DeviceMap) -> str:
    """The one-line STATUS= text: driver version, where the nodes are, what is wrong."""
    driver = device_map.driver
    if not driver.loaded:
        head = "driver not loaded"
    else:
        head = f"driver {driver.version or '(unknown version)'}"
    where = (
        f"{len(device_map.devices)} devices in {driver.dev_root}"
        if driver.dev_root
        else "no device root"
    )
    counts: dict[str, int] = {}
    for problem in device_map.problems:
        counts[problem.severity] = counts.get(problem.severity, 0) + 1
    troubles = ", ".join(
        f"{count} {severity}{'s' if count > 1 else ''}"
        for severity in ("error", "warning")
        if (count := counts.get(severity, 0))
    )
    return ", ".join(part for part in (head, where, troubles) if part)


def _watch_targets(view: HostView, dev_roots: list[str]) -> list[str]:
    host_paths = [*dev_roots, "/dev", view.validations_dir]
    return [view.fs_path(path) for path in dict.fromkeys(host_paths)]


# What the GPU Operator writes into the validations directory; the rest of it is noise.
_VALIDATION_FILES = frozenset({"driver-ready", ".driver-ctr-ready"})


def _matters(name: str) -> bool:
    """Whether an entry with this name, in a dev root or a family subdirectory or the
    validations directory, can change the map."""
    return (
        name in _VALIDATION_FILES
        or name in NVIDIA.subdirs
        or NVIDIA.match(name) is not None
        or any(NVIDIA.match(f"{subdir}/{name}") is not None for subdir in NVIDIA.subdirs)
    )


@dataclass(frozen=True, slots=True)
class _Scanned:
    map: DeviceMap
    dev_roots: list[str]
    milliseconds: float


def _scan_host(view: HostView, generation: int) -> _Scanned:
    started = time.perf_counter()
    snapshot = read_host(view)
    device_map = build_map(view, snapshot, generation=generation, updated=utc_now())
    return _Scanned(
        map=device_map,
        dev_roots=[candidate.dev_root for candidate in snapshot.candidates],
        milliseconds=round((time.perf_counter() - started) * 1000, 3),
    )


class Daemon:
    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        reload_settings: Callable[[], Settings],
        *,
        watchdog: float | None = None,
        socket_activated: bool = False,
    ) -> None:
        self.settings = settings
        self._reload_settings = reload_settings
        self.notifier = notifier
        # Seconds between WATCHDOG=1 pings (None: no watchdog), read and checked by run().
        self._watchdog_interval = watchdog
        # A socket passed by systemd wins over the config: a reload never questions it.
        self._socket_activated = socket_activated
        self.counters = Counters()
        self._rescan_due = anyio.Event()
        self._rearm_due = True
        self._rescan_lock = anyio.Lock()
        self._tree = TreeWatcher(subdirs=NVIDIA.subdirs, names=_matters)
        self._dev_roots: list[str] = []
        self.state = MapState(self._account(_scan_host(settings.view, generation=1)))

    # -- scanning --------------------------------------------------------------------

    def _account(self, scanned: _Scanned) -> DeviceMap:
        """Book a finished scan (on the event loop): counters and the roots to watch."""
        self.counters.scans += 1
        self.counters.last_scan_ms = scanned.milliseconds
        self._dev_roots = scanned.dev_roots
        return scanned.map

    async def _scan_off_loop(self) -> DeviceMap:
        # A scan reads files and lists directories: keep it off the loop so queries are
        # answered while it runs (tens of ms on a host with 10,000 mounts).
        scanned = await anyio.to_thread.run_sync(
            _scan_host, self.settings.view, self.state.generation
        )
        return self._account(scanned)

    async def rescan(self) -> None:
        """Scan now and publish; concurrent callers queue rather than scan in parallel."""
        async with self._rescan_lock:
            if self._rearm_due:
                # Before the scan: whatever changes after the re-arm is seen by the watches,
                # whatever changed before it is seen by this scan.
                self._rearm_due = False
                self._tree.set_targets(_watch_targets(self.settings.view, self._dev_roots))
            targets_before = self._dev_roots
            candidate = await self._scan_off_loop()
            if self._dev_roots != targets_before:
                # driver-ready named another root: watch it too, then look once more.
                self._tree.set_targets(_watch_targets(self.settings.view, self._dev_roots))
                candidate = await self._scan_off_loop()
            publication = self.state.publish(candidate)
        if publication is None:
            return
        for change in publication.changes:
            log.info("%s", describe(change))
        log.info("generation %d: %s", publication.map.generation, summary(publication.map))
        self._notify_status()

    def signal_change(self, reason: str) -> None:
        """Called by every event source: schedule a debounced rescan."""
        self.counters.events += 1
        log.debug("event: %s", reason)
        self._rescan_due.set()

    def signal_mount_change(self, reason: str) -> None:
        # A watch on a directory that something got mounted over is blind: re-arm first.
        self._rearm_due = True
        self.signal_change(reason)

    async def _rescan_on_signal(self) -> None:
        debounce = self.settings.debounce_ms / 1000
        while True:
            await self._rescan_due.wait()
            # Collect the burst: every signal during this window is served by one rescan.
            # A window fixed from the first signal (not reset by each new one) keeps a
            # continuous storm from starving the map of updates.
            await anyio.sleep(debounce)
            self._rescan_due = anyio.Event()
            try:
                await self.rescan()
            except Exception:
                # A bug in one scan must not take the map away from every client: keep
                # serving the last good generation, log the traceback for a report, and
                # let the next event try again.
                log.exception("rescan failed; still serving generation %d", self.state.generation)

    # -- systemd -----------------------------------------------------------------------

    def _notify(self, **fields: str | int) -> None:
        try:
            self.notifier.notify(**fields)
        except NotifyError as error:
            log.warning("sd_notify failed: %s", error)

    def _notify_status(self) -> None:
        self._notify(STATUS=summary(self.state.current))

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop itself: a wedged loop stops the pings and systemd
        # restarts the service.
        while True:
            self._notify(WATCHDOG=1)
            await anyio.sleep(interval)

    async def reload(self) -> None:
        """SIGHUP: re-read the config; a bad one is refused and the running one kept."""
        try:
            self.notifier.reloading()
        except NotifyError as error:
            log.warning("sd_notify failed: %s", error)
        try:
            fresh = self._reload_settings()
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
        else:
            kept = self.settings
            if fresh.socket != kept.socket and not self._socket_activated:
                log.warning("socket path changes only on restart; still serving %s", kept.socket)
            self.settings = replace(fresh, socket=kept.socket)
            logging.getLogger("watcher").setLevel(self.settings.log_level.upper())
            self._rearm_due = True
            log.info("config reloaded from %s", self.settings.config_path)
            try:
                await self.rescan()
            except Exception:
                # As in _rescan_on_signal: keep serving the last map. READY=1 must follow
                # RELOADING=1 in every case, or systemd shows the unit reloading forever.
                log.exception("rescan failed; still serving generation %d", self.state.generation)
        self._notify(READY=1)
        self._notify_status()

    async def _handle_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for received in signals:
                if received == signal.SIGHUP:
                    await self.reload()
                    continue
                log.info("%s: shutting down", signal.Signals(received).name)
                self._notify(STOPPING=1)
                scope.cancel()
                return

    # -- the whole service -------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        from watcher.server import Server  # noqa: PLC0415 (keeps import cycles out)

        server = Server(self.state, self.counters, self.settings, self.rescan)
        mounts = MountTableWatcher(self.settings.view.mountinfo)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._handle_signals, group.cancel_scope)
                await group.start(mounts.run, self.signal_mount_change)
                await group.start(self._tree.run, self.signal_change)
                group.start_soon(self._rescan_on_signal)
                # The first map was scanned before the watches existed; scan once more
                # now that they do, so nothing that changed in between is missed.
                await self.rescan()
                await group.start(server.serve, listener)
                log.info(
                    "serving generation %d on %s: %s",
                    self.state.generation,
                    self.settings.socket,
                    summary(self.state.current),
                )
                self._notify(READY=1)
                self._notify_status()
                if self._watchdog_interval is not None:
                    group.start_soon(self._watchdog, self._watchdog_interval)
        finally:
            mounts.close()
            self._tree.close()


def run(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    environ: Mapping[str, str] = os.environ,
) -> int:
    """`serve`: run until SIGTERM/SIGINT; 0 on a clean stop.

    `reload_settings` reads the config again with the same command-line options, for SIGHUP.
    """
    from watcher.server import SocketSetupError, bind_unix_socket, unlink_socket  # noqa: PLC0415

    logs.setup(settings.log_level, environ)
    try:
        # What systemd handed us is checked before anything starts: a malformed variable
        # is one log line and exit 1, not a traceback from deep inside the event loop.
        interval = watchdog_interval(environ)
        notifier = Notifier.from_env(environ)
        activated = listen_fds()
    except ValueError as error:
        log.error("%s", error)
        return 1
    owned_inode: int | None = None
    if activated:
        listener = activated[0].socket
        for extra in activated[1:]:
            # One listening socket is served; holding the others would leave their
            # clients hanging in a backlog nobody accepts from.
            log.warning("ignoring extra socket passed by systemd (%s)", extra.name)
            extra.socket.close()
        # The contract: an activated socket wins over --socket, the environment and the
        # config. Name it as it is, so logs and a reload speak of the socket really served.
        address = listener.getsockname()
        if isinstance(address, str) and address:
            settings = replace(settings, socket=address)
        log.info("using the socket passed by systemd (%s): %s", activated[0].name, address)
    else:
        try:
            bound = bind_unix_socket(settings.socket, settings.socket_mode, settings.socket_group)
        except SocketSetupError as error:
            log.error("%s", error)
            return 1
        listener, owned_inode = bound, bound.inode
    try:
        daemon = Daemon(
            settings,
            notifier,
            reload_settings,
            watchdog=interval,
            socket_activated=bool(activated),
        )
        anyio.run(daemon.serve, listener)
    finally:
        listener.close()
        if owned_inode is not None:
            unlink_socket(settings.socket, owned_inode)
        notifier.close()
    return 0
