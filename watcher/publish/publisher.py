"""Keeps the node labels and the metrics endpoint current with the live map.

One `Publisher` per daemon. It listens to every publication of the map, and on each (and
once at start, and on reload) rewrites the feature file if its content changed; the write
runs in a worker thread, one at a time, so a burst of generations costs one refresh for the
latest. Where `cuda-checkpoint` is comes from the map (`driver.cuda_checkpoint`, found by
the probe at each scan). The metrics are computed at scrape
time (see `metrics.py`) and served from the event loop.

On a clean stop the feature file is removed (only if it is still the one this daemon
wrote): a daemon that is not running cannot vouch for any of the facts in it, and NFD then
drops every label; a node affinity on `checkpoint-ready=true` treats the absence as "not
ready" exactly as it would treat `false`. Marking the file not ready instead would leave the
other labels (driver version, GPU model) standing unchecked, and leave a file behind after
the daemon is uninstalled.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from watcher.config import Settings, format_listen
from watcher.daemon.state import Counters, MapState, Publication
from watcher.publish.labels import PREFIX, compute_labels, render
from watcher.publish.nfd import remove_if_ours, write_atomically

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from watcher.publish.metrics import Listener, MapCollector, ServerStats

__all__ = ["Publisher"]

log = logging.getLogger("watcher.publish")


class _Written:
    __slots__ = ("content", "inode", "path")

    def __init__(self, path: str, content: bytes, inode: int) -> None:
        self.path, self.content, self.inode = path, content, inode


class _Endpoint:
    """One running metrics listener: its address, its scope, and when it has closed."""

    __slots__ = ("address", "closed", "scope")

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.scope = anyio.CancelScope()
        self.closed = anyio.Event()


class Publisher:
    def __init__(
        self, state: MapState, counters: Counters, settings: Settings, server: ServerStats
    ) -> None:
        self._state = state
        self._settings = settings
        self._due = anyio.Event()
        # One refresh or removal of the file at a time: a reload that moves the file must
        # not remove the old one while a write to it is still under way in a thread.
        self._file_lock = anyio.Lock()
        # The map's cuda-checkpoint at the last refresh, to log only when it changes.
        self._cuda_checkpoint: str | None = None
        self._looked = False
        self._ready: bool | None = None
        self._written: _Written | None = None
        self._write_error: str | None = None
        self._endpoint: _Endpoint | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._counters = counters
        self._server = server
        # Made with the first endpoint: a daemon without metrics_listen never imports
        # prometheus-client (about 3 MiB of memory, 50 ms of start).
        self._registry: CollectorRegistry | None = None
        self._collector: MapCollector | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the labels and open the metrics endpoint, then keep both current until
        cancelled; on the way out the feature file is removed."""
        unlisten = self._state.listen(self._on_publication)
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                # Before started(): the file exists (and READY=1 follows) with the first map.
                await self._refresh()
                await self._open_metrics(self._settings.metrics_listen)
                group.start_soon(self._keep_current)
                task_status.started()
        finally:
            unlisten()
            self._group = None
            self._remove_file()

    async def reload(self, settings: Settings) -> None:
        """Apply a reloaded config: another file path, another address, another host view.

        Never raises: the daemon must answer a reload with READY=1 whatever happens here.
        """
        previous, self._settings = self._settings, settings
        try:
            if previous.nfd_features_file != settings.nfd_features_file:
                async with self._file_lock:
                    self._remove_file()
            # Also when the address is the same but nothing listens there: it failed to bind
            # before (the port was taken), and a reload is how an operator says "try again".
            wanted = settings.metrics_listen
            if previous.metrics_listen != wanted or (wanted is not None and self._endpoint is None):
                await self._open_metrics(wanted)
        except Exception:
            log.exception("applying the reloaded config to the labels and metrics failed")
        # The file may have moved: write it at its new place (the daemon's rescan after the
        # reload publishes the map of another host view, if that changed too).
        self._due.set()

    # -- the feature file ----------------------------------------------------------------

    def _on_publication(self, _: Publication) -> None:
        # Runs inside MapState.publish, on the loop: only note that a refresh is due.
        self._due.set()

    async def _keep_current(self) -> None:
        while True:
            await self._due.wait()
            self._due = anyio.Event()
            try:
                await self._refresh()
            except Exception:
                # A bug here must not take the daemon (and the map) down; the next
                # generation tries again.
                log.exception("updating the node labels failed")

    async def _refresh(self) -> None:
        async with self._file_lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        settings, current = self._settings, self._state.current
        found = current.driver.cuda_checkpoint
        if found != self._cuda_checkpoint or not self._looked:
            log.info("cuda-checkpoint: %s", found or "not found on the host")
        self._cuda_checkpoint, self._looked = found, True
        labels = compute_labels(current)
        if settings.nfd_features_file is not None:
            await self._write(settings.nfd_features_file, render(labels))
        # Logged after the file is written: the line tells what the node now advertises.
        ready = labels[PREFIX + "checkpoint-ready"] == "true"
        if ready != self._ready:
            log.info("checkpoint-ready: %s (generation %d)", str(ready).lower(), current.generation)
            self._ready = ready

    async def _write(self, path: str, content: bytes) -> None:
        written = self._written
        if written is not None and written.path == path and written.content == content:
            return
        try:
            inode = await anyio.to_thread.run_sync(write_atomically, path, content)
        except OSError as error:
            message = f"cannot write the NFD feature file {path}: {error.strerror or error}"
            if message != self._write_error:
                # Once per distinct failure, not once per generation.
                log.error("%s; the node labels are stale until it can be written", message)
                self._write_error = message
            return
        if self._write_error is not None:
            log.info("NFD feature file %s written again", path)
            self._write_error = None
        self._written = _Written(path, content, inode)
        log.debug("NFD feature file %s: %s", path, content.decode().strip().replace("\n", " "))

    def _remove_file(self) -> None:
        written, self._written = self._written, None
        if written is not None and remove_if_ours(written.path, written.inode):
            log.info("removed the NFD feature file %s", written.path)

    # -- the metrics endpoint -----------------------------------------------------------

    async def _open_metrics(self, address: tuple[str, int] | None) -> None:
        """Serve the metrics on `address` (None: nowhere), replacing the endpoint there was.

        A failure to listen is logged and leaves the daemon serving the map: the metrics
        are secondary to it (Prometheus shows the target down). A reload tries again.
        """
        if address is None:
            await self._close_metrics()
            self._counters.metrics = "off"
            return
        from watcher.publish.metrics import MetricsServer  # noqa: PLC0415 (see _registry)

        try:
            listener = await MetricsServer.bind(*address)
        except OSError as error:
            if self._endpoint is None:
                self._not_served(address, error)
                return
            # The old endpoint may hold the port (127.0.0.1:9402 -> 0.0.0.0:9402): free it and
            # try once more.
            await self._close_metrics()
            try:
                listener = await MetricsServer.bind(*address)
            except OSError as again:
                self._not_served(address, again)
                return
        await self._close_metrics()
        endpoint = _Endpoint(address)
        if self._group is None:
            listener_close = listener.aclose
            await listener_close()
            return
        await self._group.start(self._serve_metrics, listener, endpoint)
        self._endpoint = endpoint
        self._counters.metrics = f"http://{format_listen(address)}/metrics"
        log.info("metrics on %s", self._counters.metrics)

    def _not_served(self, address: tuple[str, int], error: OSError) -> None:
        # Whoever holds the port may be serving metrics of their own making: say so where an
        # operator looks (the log, `status`), and that a reload tries again.
        why = f"metrics_listen {format_listen(address)}: {error.strerror or error}"
        self._counters.metrics = f"not served: {why}"
        log.error("%s; metrics not served (a reload tries again)", why)

    async def _serve_metrics(
        self,
        listener: Listener,
        endpoint: _Endpoint,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from watcher.publish.metrics import MapCollector, MetricsServer, registry_for  # noqa: PLC0415

        try:
            if self._registry is None or self._collector is None:
                self._collector = MapCollector(self._state, self._counters, self._server)
                self._registry = registry_for(self._collector)
            server = MetricsServer(self._registry, freshness=self._collector.freshness)
            with endpoint.scope:
                await server.serve(listener, task_status=task_status)
        finally:
            endpoint.closed.set()

    async def _close_metrics(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is None:
            return
        endpoint.scope.cancel()
        await endpoint.closed.wait()
        log.info("metrics endpoint %s closed", format_listen(endpoint.address))
