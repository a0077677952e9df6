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
from watcher.contract import MOUNT_EVENTS_ENV, summary_line, utc_timestamp
from watcher.core.devices import NVIDIA
from watcher.core.diff import describe
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import PathFilter
from watcher.core.scan import HostView, build_map
from watcher.probe import MountCache, read_host
from watcher.sources.fanotify import MountEvents, MountEventsUnavailable, unsuitable
from watcher.sources.inotify import TreeWatcher
from watcher.sources.mounts import MountTableWatcher
from watcher.state import Counters, MapState
from watcher.systemd import Notifier, NotifyError, listen_fds, watchdog_interval

log = logging.getLogger("watcher.daemon")

# How mount changes are judged (MOUNT_EVENTS_ENV). `auto` (default): the mountinfo path until
# the first mount change, then fanotify mount events if the kernel has them (6.15+) and the
# process may use them (CAP_SYS_ADMIN, no seccomp filter); `fanotify`: fanotify mount events
# from the start when the kernel allows; `mountinfo`: always the mountinfo path (the fallback).
MOUNT_EVENTS_MODES = ("auto", "fanotify", "mountinfo")

# After a scan, the next one waits this many times its duration (beyond the debounce). A
# full read of a 10,000-mount table takes ~40 ms, and in a storm of mount changes on the
# mountinfo path every wake-up asks for one: back to back they would take a whole core.
# Spaced, scans take at most 1/(1 + 2) of a core (measured: ~35% with the wake-ups), and
# the map trails the last change by at most one scan under way + the spacing + one scan
# (4 scans, ~160 ms). A scan that reuses the mount table (~1 ms) is not held back.
_SCAN_SPACING = 2.0


def summary(device_map: DeviceMap) -> str:
    """The one-line STATUS= text: driver version, where the nodes are, what is wrong."""
    driver = device_map.driver
    return summary_line(
        loaded=driver.loaded,
        version=driver.version,
        dev_root=driver.dev_root,
        devices=len(device_map.devices),
        invalid=sum(1 for device in device_map.devices if not device.valid),
        severities=(problem.severity for problem in device_map.problems),
    )


def _watch_targets(view: HostView, dev_roots: list[str]) -> list[str]:
    host_paths = [*dev_roots, "/dev", view.validations_dir]
    return [view.fs_path(path) for path in dict.fromkeys(host_paths)]


def _mount_filter(view: HostView, dev_roots: list[str], driver_roots: list[str]) -> PathFilter:
    """Which mount points (as this process sees them) can change the map: on, above or below
    what a scan lists, watches or reads, and on or above the driver roots (a scan only asks
    whether those exist). A superset only costs rescans."""
    paths = {view.fs_path(path) for path in [*dev_roots, "/dev", view.validations_dir]}
    paths.add(os.path.abspath(view.proc))
    return PathFilter(sorted(paths), sorted({view.fs_path(path) for path in driver_roots}))


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
    driver_roots: list[str]


def _scan_host(view: HostView, generation: int, mount_cache: MountCache | None = None) -> _Scanned:
    started = time.perf_counter()
    snapshot = read_host(view, mount_cache=mount_cache)
    device_map = build_map(view, snapshot, generation=generation, updated=utc_timestamp())
    return _Scanned(
        map=device_map,
        dev_roots=[candidate.dev_root for candidate in snapshot.candidates],
        milliseconds=round((time.perf_counter() - started) * 1000, 3),
        driver_roots=[candidate.driver_root for candidate in snapshot.candidates],
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
        mount_events: str = "auto",
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
        self._driver_roots: list[str] = []
        # Reused by rescans that follow no relevant mount change (see MountCache).
        self._mount_cache = MountCache()
        self._mount_events_mode = mount_events
        # Set by serve() when the kernel has fanotify mount events: filters mount changes.
        self._mount_events: MountEvents | None = None
        self._mount_events_table = ""
        # auto: the switch to fanotify is tried once, at the first mount change.
        self._mount_events_tried = False
        self._tasks: anyio.abc.TaskGroup | None = None
        # When the last scan ended (time.monotonic) and how long it took, for the spacing.
        self._scan_ended = 0.0
        self._scan_seconds = 0.0
        self.state = MapState(
            self._account(_scan_host(settings.view, generation=1, mount_cache=self._mount_cache))
        )

    # -- scanning --------------------------------------------------------------------

    def _account(self, scanned: _Scanned) -> DeviceMap:
        """Book a finished scan (on the event loop): counters and the roots to watch."""
        self.counters.scans += 1
        self.counters.last_scan_ms = scanned.milliseconds
        self._scan_ended = time.monotonic()
        self._scan_seconds = scanned.milliseconds / 1000
        self._dev_roots = scanned.dev_roots
        self._driver_roots = scanned.driver_roots
        if self._mount_events is not None:
            # driver-ready may have named another root: judge mounts against it from now on.
            self._mount_events.set_filter(self._mount_filter())
        return scanned.map

    def _mount_filter(self) -> PathFilter:
        return _mount_filter(self.settings.view, self._dev_roots, self._driver_roots)

    async def _scan_off_loop(self) -> DeviceMap:
        # A scan reads files and lists directories: keep it off the loop so queries are
        # answered while it runs (tens of ms on a host with 10,000 mounts).
        scanned = await anyio.to_thread.run_sync(
            _scan_host, self.settings.view, self.state.generation, self._mount_cache
        )
        return self._account(scanned)

    async def rescan(self, *, full: bool = True) -> None:
        """Scan now and publish; concurrent callers queue rather than scan in parallel.

        `full` (the `rescan` request, start, reload) reads everything again; the debounced
        rescans of events reuse the mount table while no relevant mount changed.
        """
        if full:
            self._mount_cache.invalidate()
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
        self._mount_cache.invalidate()
        self.signal_change(reason)

    def _on_mount_table(self, reason: str) -> None:
        """A mountinfo wake-up: rescan, unless fanotify shows no relevant mount changed.

        With fanotify, attaches and detaches are judged as they arrive (MountEvents.run);
        what is left for this wake-up to reveal is a remount, which only the attributes of
        the relevant mounts can show. Without fanotify every wake-up may be relevant.
        """
        events = self._mount_events
        if events is None or self.settings.view.mountinfo != self._mount_events_table:
            self.signal_mount_change(reason)
            if not self._mount_events_tried and self._tasks is not None:
                self._mount_events_tried = True
                self._tasks.start_soon(self._switch_to_mount_events)
            return
        try:
            why = events.recheck()
        except Exception:
            # The filter is an optimisation: a bug in it costs a rescan, never the daemon.
            log.exception("checking the relevant mounts failed; rescanning")
            why = reason
        if why is not None:
            self.signal_mount_change(why)
        else:
            log.debug("mount table changed; no relevant mount did")

    async def _rescan_on_signal(self) -> None:
        debounce = self.settings.debounce_ms / 1000
        while True:
            await self._rescan_due.wait()
            # Collect the burst: every signal during this window is served by one rescan.
            # A window fixed from the first signal (not reset by each new one) keeps a
            # continuous storm from starving the map of updates.
            await anyio.sleep(debounce)
            # Spacing after an expensive scan (see _SCAN_SPACING); signals meanwhile are
            # served by the scan that follows it.
            pause = self._scan_ended + _SCAN_SPACING * self._scan_seconds - time.monotonic()
            if pause > 0:
                await anyio.sleep(pause)
            self._rescan_due = anyio.Event()
            try:
                await self.rescan(full=False)
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
                self._tasks = group
                mode = self._mount_events_mode
                if not mounts.pollable:
                    # A plain file standing in for the table: inotify reports its writes.
                    self._mount_events_tried = True
                elif mode == "mountinfo":
                    self._mount_events_tried = True
                    forced = f"{MOUNT_EVENTS_ENV}=mountinfo"
                    log.info("mount changes: every mountinfo wake-up rescans (%s)", forced)
                elif mode == "fanotify":
                    # Listening before the mount table watcher starts: a change in between
                    # is seen by both, and by the full rescan below.
                    await self._switch_to_mount_events(rescan=False)
                elif (why := unsuitable()) is not None:
                    self._mount_events_tried = True
                    log.info("mount changes: every mountinfo wake-up rescans (%s)", why)
                else:
                    # Nothing is listed, no fd is held until mounts are seen to change: a
                    # quiet host never pays for it.
                    log.info(
                        "mount changes: mountinfo wake-ups; fanotify mount events from the "
                        "first mount change"
                    )
                await group.start(mounts.run, self._on_mount_table)
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
            self._tasks = None
            mounts.close()
            self._tree.close()
            if self._mount_events is not None:
                self._mount_events.close()

    async def _switch_to_mount_events(self, *, rescan: bool = True) -> None:
        """Judge mount changes by fanotify mount events from now on, if the kernel allows.

        Listening starts before the mounts are listed, so no change is missed after the
        listing; one that came after the last full read and before the listing is judged by
        nobody, hence the rescan once the switch is made.
        """
        self._mount_events_tried = True
        view = self.settings.view
        try:
            # Lists every mount once (~90 ms at 10,000): off the loop.
            events = await anyio.to_thread.run_sync(
                MountEvents.open, view.mountinfo, self._mount_filter()
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
        self._mount_events, self._mount_events_table = events, view.mountinfo
        await self._tasks.start(events.run, self.signal_mount_change)
        log.info(
            "mount changes: fanotify mount events; %d mounts, %d of them relevant",
            events.mounts,
            len(events.relevant),
        )
        if rescan:
            self.signal_mount_change("switched to fanotify mount events")


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
    mount_events = environ.get(MOUNT_EVENTS_ENV, "auto") or "auto"
    if mount_events not in MOUNT_EVENTS_MODES:
        log.warning(
            "%s=%s is not one of %s; using auto",
            MOUNT_EVENTS_ENV,
            mount_events,
            ", ".join(MOUNT_EVENTS_MODES),
        )
        mount_events = "auto"
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
            mount_events=mount_events,
        )
        anyio.run(daemon.serve, listener)
    finally:
        listener.close()
        if owned_inode is not None:
            unlink_socket(settings.socket, owned_inode)
        notifier.close()
    return 0
