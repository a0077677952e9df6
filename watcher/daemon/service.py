"""The daemon: kernel events -> debounced rescan -> published map, served on a socket.

Every kernel signal only means "rescan soon". A rescan reads the whole host view off the
event loop, builds a complete map and publishes it as a new generation only when it differs,
so correctness never rests on decoding individual events; only latency does.

The parts each have their own module: when to scan (`scheduler`), which mount changes
matter (`judge`), what systemd hears (`lifecycle`); the event sources come in as arguments
(`Sources`), so a test runs the daemon in process with scripted ones.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import anyio
import anyio.abc

from watcher.config import RELOAD_ON_RESTART, ConfigError, Settings
from watcher.core.devices import FAMILIES
from watcher.core.diff import describe
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import PathFilter
from watcher.core.snapshot import scan_paths
from watcher.daemon.judge import MountJudging
from watcher.daemon.lifecycle import Lifecycle
from watcher.daemon.scanning import Scanned, mount_filter, scan_host, summary, watch_targets
from watcher.daemon.scanthread import DEFAULT_SCAN_DEADLINE_S, ScanRunner
from watcher.daemon.scheduler import RescanScheduler
from watcher.daemon.state import Counters, MapState
from watcher.probe import MountCache
from watcher.publish import Publisher
from watcher.server import Server

__all__ = ["Daemon", "EventSource", "MountSource", "Sources", "TreeSource"]

log = logging.getLogger("watcher.daemon")

OnChange = Callable[[str], None]


class TreeSource(Protocol):
    """Directory events (watcher.sources.inotify.TreeWatcher is the real one)."""

    def set_targets(self, paths: Iterable[str]) -> None: ...

    async def run(
        self, on_change: OnChange, *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> None: ...

    def close(self) -> None: ...


class MountSource(Protocol):
    """Mount-table wake-ups (watcher.sources.mounts.MountTableWatcher is the real one)."""

    @property
    def pollable(self) -> bool: ...

    async def run(
        self, on_change: OnChange, *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> None: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    """Hints with nothing to configure (watcher.sources.uevents.UeventSource is the real one)."""

    async def run(
        self, on_change: OnChange, *, task_status: anyio.abc.TaskStatus[None] = ...
    ) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Sources:
    """The event sources: the directory watcher, how to watch a mount table (called again
    when a reload names another one), and the kernel's uevents (None: not listened to)."""

    tree: TreeSource
    mount_table: Callable[[str], MountSource]
    # GPU_DEVICE_WATCHER_MOUNT_EVENTS: auto | fanotify | mountinfo (see watcher.daemon.judge).
    mount_events: str = "auto"
    uevents: EventSource | None = None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        lifecycle: Lifecycle,
        reload_settings: Callable[[], Settings],
        sources: Sources,
        *,
        socket_activated: bool = False,
        scan_deadline_s: float = DEFAULT_SCAN_DEADLINE_S,
    ) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self._reload_settings = reload_settings
        self._sources = sources
        # A socket passed by systemd wins over the config: a reload never questions it.
        self._socket_activated = socket_activated
        self.counters = Counters()
        self._scans = ScanRunner(self.counters, scan_deadline_s)
        self.scheduler = RescanScheduler(self._scan, debounce_s=settings.debounce_ms / 1000)
        # What the last scan read; the watches and the mount judge follow it.
        self._paths = scan_paths(settings.view, [], FAMILIES)
        # Reused by rescans that follow no relevant mount change (see MountCache).
        self._mount_cache = MountCache()
        self._mounts: _MountWatch | None = None
        self._server: Server | None = None
        # Node labels and metrics (watcher.publish), while serve() runs.
        self._publisher: Publisher | None = None
        self._state: MapState | None = None
        # The task group of serve(), where a reload starts a new mount-table watcher.
        self._tasks: anyio.abc.TaskGroup | None = None

    @property
    def state(self) -> MapState:
        if self._state is None:
            raise RuntimeError("the daemon has not scanned yet")
        return self._state

    # -- scanning --------------------------------------------------------------------

    def _account(self, scanned: Scanned) -> DeviceMap:
        """Book a finished scan (on the event loop): counters and the roots to watch."""
        self.counters.book_scan(scanned.milliseconds)
        self._paths = scanned.paths
        if self._mounts is not None:
            # driver-ready may have named another root: judge mounts against it from now on.
            self._mounts.judging.set_filter(self.mount_filter())
        return scanned.map

    def mount_filter(self) -> PathFilter:
        return mount_filter(self.settings.view, self._paths)

    async def _scan_off_loop(self, generation: int) -> DeviceMap:
        # A scan reads files and lists directories: keep it off the loop so queries are
        # answered while it runs (tens of ms on a host with 10,000 mounts).
        view, cache = self.settings.view, self._mount_cache
        scanned = await self._scans.run(lambda: scan_host(view, generation, cache))
        return self._account(scanned)

    def _rearm(self) -> None:
        self._sources.tree.set_targets(watch_targets(self.settings.view, self._paths))

    async def _scan(self, *, full: bool, rearm: bool) -> None:
        """One rescan, run by the scheduler; publishes a new generation if the map changed.

        `full` (the `rescan` request, start, reload) reads everything again; the debounced
        rescans of events reuse the mount table while no relevant mount changed.
        """
        if full:
            self._mount_cache.invalidate()
        if rearm:
            self._rearm()
        targets_before = self._paths.dev_roots
        candidate = await self._scan_off_loop(self.state.generation)
        if self._paths.dev_roots != targets_before:
            # driver-ready named another root: watch it too, then look once more.
            self._rearm()
            candidate = await self._scan_off_loop(self.state.generation)
        publication = self.state.publish(candidate)
        if publication is None:
            return
        for change in publication.changes:
            log.info("%s", describe(change))
        log.info("generation %d: %s", publication.map.generation, summary(publication.map))
        self.lifecycle.status(summary(publication.map))

    async def rescan(self) -> None:
        """A client's `rescan`: throttled and coalesced by the scheduler. TimeoutError when
        a scan is stuck: the client hears so instead of waiting as long as the scan does."""
        stuck = TimeoutError(
            f"a scan has not finished within {self._scans.deadline_s:g} s (see `status` and "
            "the daemon's log); try again later"
        )
        if self.counters.scan_overdue:
            raise stuck
        # The spacing after the last scan (long after a slow one), then one scan under way
        # and this one, each within the deadline.
        bound = self.scheduler.pause() + 2 * self._scans.deadline_s
        with anyio.move_on_after(bound) as scope:
            await self.scheduler.on_request()
        if scope.cancelled_caught:
            raise stuck

    def signal_change(self, reason: str) -> None:
        """Called by every event source: schedule a debounced rescan."""
        self.counters.events += 1
        log.debug("event: %s", reason)
        self.scheduler.request()

    def signal_uevent(self, reason: str) -> None:
        """A module or render node came or went. Every scan reads /proc/devices afresh, so
        the rescan sees a major registered or dropped with no mount or node change."""
        self.counters.uevents += 1
        self.signal_change(reason)

    def signal_mount_change(self, reason: str) -> None:
        # A watch on a directory that something got mounted over is blind: re-arm first.
        self._mount_cache.invalidate()
        self.counters.events += 1
        log.debug("event: %s", reason)
        self.scheduler.request_rearm()

    # -- reload ------------------------------------------------------------------------

    async def reload(self) -> str:
        """SIGHUP: re-read the config and apply it everywhere; a bad one is refused and the
        running one kept. Returns the status line for READY=1."""
        try:
            fresh = self._reload_settings()
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
        else:
            await self.apply(fresh)
            log.info("config reloaded from %s", self.settings.config_path)
            try:
                await self.scheduler.now()
            except Exception:
                # As in the scheduler: keep serving the last map.
                log.exception("rescan failed; still serving generation %d", self.state.generation)
        return summary(self.state.current)

    async def apply(self, fresh: Settings) -> None:
        """Make every part use `fresh` (config.RELOAD_LIVE); the socket keys wait for a restart
        (config.RELOAD_ON_RESTART)."""
        kept = self.settings
        for key in RELOAD_ON_RESTART:
            if getattr(fresh, key) == getattr(kept, key):
                continue
            if self._socket_activated:
                # systemd made the socket: its .socket unit, not the config, says where and how.
                log.info("%s is ignored: the socket is systemd's (see its .socket unit)", key)
            else:
                log.warning(
                    "%s changes only on restart; still serving %s with the old value",
                    key,
                    kept.socket,
                )
        settings = replace(
            fresh,
            socket=kept.socket,
            socket_mode=kept.socket_mode,
            socket_group=kept.socket_group,
        )
        self.settings = settings
        logging.getLogger("watcher").setLevel(settings.log_level.upper())
        self.scheduler.debounce_s = settings.debounce_ms / 1000
        if self._server is not None:
            self._server.configure(settings)
        if self._publisher is not None:
            # Never raises: READY=1 must follow the reload whatever happens there.
            await self._publisher.reload(settings)
        if settings.view != kept.view:
            # Other roots or another --proc: the mount filter and watches follow the next
            # scan (re-armed first); a cached mount table was filtered for the old paths.
            self._mount_cache.invalidate()
            self.scheduler.request_rearm()
            if self._mounts is not None:
                if settings.view.mountinfo != self._mounts.path:
                    await self._watch_mounts(settings.view.mountinfo)
                else:
                    self._mounts.judging.set_filter(self.mount_filter())

    # -- the whole service -------------------------------------------------------------

    async def _watch_mounts(self, mountinfo: str) -> None:
        """Watch and judge `mountinfo` from now on (in place of the table watched so far)."""
        if self._mounts is not None:
            self._mounts.close()
            self._mounts = None
            log.info("mount table: now watching %s", mountinfo)
        if self._tasks is None:
            return  # not serving (yet, or any more): serve() starts the watch
        watch = _MountWatch(mountinfo, self._sources, self)
        self._mounts = watch
        await watch.start(self._tasks)

    async def serve(
        self,
        listener: socket.socket,
        *,
        handle_signals: bool = True,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Scan, watch, serve `listener` until SIGTERM/SIGINT (or cancelled); `started()`
        once the first map is served (where READY=1 is sent)."""
        first = await self._scan_off_loop(generation=1)
        self._state = MapState(first)
        self._server = server = Server(self.state, self.counters, self.settings, self.rescan)
        publisher = Publisher(self.state, self.counters, self.settings, server)
        try:
            async with anyio.create_task_group() as group:
                self._tasks = group
                if handle_signals:
                    group.start_soon(self.lifecycle.handle_signals, group.cancel_scope, self.reload)
                await self._watch_mounts(self.settings.view.mountinfo)
                await group.start(self._sources.tree.run, self.signal_change)
                if self._sources.uevents is not None:
                    await group.start(self._sources.uevents.run, self.signal_uevent)
                await group.start(self.scheduler.run)
                # The first map was scanned before the watches existed; scan once more
                # now that they do, so nothing that changed in between is missed.
                await self.scheduler.now()
                await group.start(server.serve, listener)
                # Labels written and metrics listening before READY=1.
                await group.start(publisher.run)
                self._publisher = publisher
                log.info(
                    "serving generation %d on %s: %s",
                    self.state.generation,
                    self.settings.socket,
                    summary(self.state.current),
                )
                self.lifecycle.ready(summary(self.state.current))
                group.start_soon(self.lifecycle.watchdog)
                task_status.started()
        finally:
            self._tasks = None
            self._publisher = None
            if self._mounts is not None:
                self._mounts.close()
                self._mounts = None
            self._sources.tree.close()
            if self._sources.uevents is not None:
                self._sources.uevents.close()


class _MountWatch:
    """One watched mount table: its source, its judge, and the scope both run in."""

    def __init__(self, path: str, sources: Sources, daemon: Daemon) -> None:
        self.path = path
        self.source = sources.mount_table(path)
        view = daemon.settings.view
        self.judging = MountJudging(
            path,
            mode=sources.mount_events,
            pollable=self.source.pollable,
            foreign_root=view.root if view.foreign_table else None,
            relevant=daemon.mount_filter,
            on_relevant=daemon.signal_mount_change,
        )
        self._scope = anyio.CancelScope()
        self._cache = daemon._mount_cache

    async def start(self, tasks: anyio.abc.TaskGroup) -> None:
        await tasks.start(self._run)

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with self._scope:
            async with anyio.create_task_group() as group:
                await self.judging.start(group)
                # Scans read only the relevant mounts where the judge found that possible.
                self._cache.reader = self.judging.targeted
                await group.start(self.source.run, self.judging.on_wake)
                task_status.started()

    def close(self) -> None:
        self._cache.reader = None
        self._scope.cancel()
        self.judging.close()
        self.source.close()
