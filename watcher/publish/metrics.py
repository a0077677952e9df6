"""Prometheus metrics of the live map, and the HTTP endpoint that serves them.

The values are read at scrape time from the map, the daemon's counters and the socket
server: a scrape always shows the generation being served, and nothing is kept up to date
between scrapes. The exposition is prometheus-client's, from a private registry (the global
one would add the interpreter's own metrics and whatever else imported the library).

The endpoint is a deliberately small HTTP/1.1 server on the daemon's event loop (no thread
per scrape, none at all): one request per connection, answered and closed. Where a request
is not `GET /metrics` it gets 404 or 405; a malformed one gets 400 and a log line.
Limits, as on the socket: at most `MAX_CONNECTIONS` at once and `MAX_PER_PEER` from one
address (more get 503), a first byte within `FIRST_BYTE_TIMEOUT` (else the connection is
closed), a request head of at most `MAX_REQUEST` bytes (more gets 431), all of it within
`READ_TIMEOUT` (else 408), and a reply the client must take within `WRITE_TIMEOUT`.

Whoever reaches the port must not be able to slow the Unix socket, which shares the loop:
connections are accepted at most `ACCEPT_RATE` a second (a burst of `ACCEPT_BURST`; the rest
wait in the kernel's backlog, costing the daemon nothing), the exposition is rendered at most
once per `RENDER_INTERVAL` while what it shows is unchanged, and each kind of complaint is
logged at most once per `LOG_INTERVAL`, with a count of the lines held back.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import re
import socket
import time
import typing
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import anyio
import anyio.abc
import anyio.streams.stapled
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from watcher.core.model import Kind, ProblemCode, Severity
from watcher.daemon.state import SCAN_BUCKETS, Counters, MapState
from watcher.publish.labels import checkpoint_ready

__all__ = [
    "ACCEPT_RATE",
    "CONTENT_TYPE",
    "FIRST_BYTE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_PER_PEER",
    "MAX_REQUEST",
    "MapCollector",
    "MetricsServer",
    "ServerStats",
    "registry_for",
]

log = logging.getLogger("watcher.metrics")

MAX_CONNECTIONS: Final = 16
# A scraper needs one connection at a time: four leave room for retries, and the rest of
# MAX_CONNECTIONS to the other peers (one peer's idle connections made every scrape fail).
MAX_PER_PEER: Final = 4
MAX_REQUEST: Final = 8192
# Scrapers send their request as soon as they connect; an idle connection holds a slot.
FIRST_BYTE_TIMEOUT: Final = 1.0
READ_TIMEOUT: Final = 5.0
WRITE_TIMEOUT: Final = 5.0
# Prometheus scrapes once every 15-60 s per server; 200 a second is far beyond any honest
# use, and at ~0.1 ms of loop time each (the exposition cached) stays below 2% of the loop.
ACCEPT_RATE: Final = 200.0
ACCEPT_BURST: Final = 50
# A scrape shows values at most this old when nothing the key covers changed.
RENDER_INTERVAL: Final = 1.0
LOG_INTERVAL: Final = 10.0
# The classic text format: every Prometheus (and every other scraper) reads it, and with
# our metric and label names generate_latest() writes exactly it.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_KINDS: Final = typing.get_args(Kind)
_CODES: Final = typing.get_args(ProblemCode)
_SEVERITIES: Final = typing.get_args(Severity)
_REQUEST_LINE: Final = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.[01]")
# What anyio.create_tcp_listener returns: one listener per address the host resolves to.
Listener = anyio.streams.stapled.MultiListener[anyio.abc.SocketStream]
_GONE: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionError,
)


class ServerStats(Protocol):
    """What the socket server tells about its clients (watcher.server.Server has it)."""

    @property
    def clients(self) -> int: ...

    @property
    def subscribers(self) -> int: ...


class MapCollector:
    """The contract's metrics, computed from the live state at each scrape."""

    def __init__(
        self,
        state: MapState,
        counters: Counters,
        server: ServerStats,
    ) -> None:
        self._state = state
        self._counters = counters
        self._server = server

    def freshness(self) -> tuple[object, ...]:
        """What the exposition shows, cheaply: while it is unchanged, a rendered exposition
        may be served again (the histogram moves only with `scans`)."""
        counters = self._counters
        return (
            self._state.generation,
            counters.scans,
            counters.events,
            counters.uevents,
            self._server.clients,
            self._server.subscribers,
        )

    def collect(self) -> Iterable[Metric]:
        current = self._state.current
        driver = current.driver
        counters = self._counters
        prefix = "gpu_device_watcher_"

        yield GaugeMetricFamily(
            prefix + "generation", "Generation of the device map being served.", current.generation
        )
        yield GaugeMetricFamily(
            prefix + "driver_loaded",
            "1 when /proc/devices lists the NVIDIA driver.",
            int(driver.loaded),
        )
        info = GaugeMetricFamily(
            prefix + "driver_info",
            "Always 1: the driver version and the dev root (empty when unknown or none).",
            labels=["version", "dev_root"],
        )
        info.add_metric([driver.version or "", driver.dev_root or ""], 1)
        yield info

        # Every kind and validity, zeros included: a series that vanishes is harder to alert
        # on than one that reads 0.
        devices = GaugeMetricFamily(
            prefix + "devices", "Device nodes in the dev root.", labels=["kind", "valid"]
        )
        device_counts = {(kind, valid): 0 for kind in _KINDS for valid in (True, False)}
        for device in current.devices:
            kind_valid = (device.kind, device.valid)
            device_counts[kind_valid] = device_counts.get(kind_valid, 0) + 1
        for (kind, valid), count in device_counts.items():
            devices.add_metric([kind, "true" if valid else "false"], count)
        yield devices

        problems = GaugeMetricFamily(
            prefix + "problems", "Problems in the device map.", labels=["code", "severity"]
        )
        problem_counts = {(code, severity): 0 for code in _CODES for severity in _SEVERITIES}
        for problem in current.problems:
            key = (problem.code, problem.severity)
            problem_counts[key] = problem_counts.get(key, 0) + 1
        for (code, severity), count in problem_counts.items():
            problems.add_metric([code, severity], count)
        yield problems

        yield GaugeMetricFamily(
            prefix + "checkpoint_ready",
            "1 when the node can take GPU checkpoints (the checkpoint-ready label).",
            int(checkpoint_ready(current)),
        )
        yield CounterMetricFamily(
            prefix + "scans", "Scans of the host view since start.", counters.scans
        )
        yield CounterMetricFamily(
            prefix + "events", "Kernel events that asked for a rescan.", counters.events
        )
        yield CounterMetricFamily(
            prefix + "uevents",
            "Kernel uevents (a GPU module or render node came or went) that asked for a rescan.",
            counters.uevents,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*SCAN_BUCKETS, float("inf")), counters.scan_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        yield HistogramMetricFamily(
            prefix + "scan_duration_seconds",
            "How long a scan of the host view took.",
            buckets=buckets,
            sum_value=counters.scan_seconds,
        )
        yield GaugeMetricFamily(
            prefix + "clients", "Connections on the Unix socket.", self._server.clients
        )
        yield GaugeMetricFamily(
            prefix + "subscribers",
            "Subscribed connections on the Unix socket.",
            self._server.subscribers,
        )


def registry_for(collector: MapCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class _BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    extra = "Allow: GET\r\n" if status == 405 else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_BUSY: Final = _response(503, b"too many connections; try again later\n")


class _Throttled:
    """Logs one line per `interval` at most; the lines held back meanwhile are counted into
    the next one, so a flood of bad requests costs the log a line every `interval`."""

    __slots__ = ("_clock", "_held", "_interval", "_next")

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._held = 0

    def log(self, level: int, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += f" (and {self._held} more in the last {self._interval:g} s, not logged)"
        log.log(level, message, *args)
        self._held = 0
        self._next = now + self._interval


class MetricsServer:
    """Serves `GET /metrics` from `registry` on one TCP address until cancelled."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        freshness: Callable[[], object] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
        max_request: int = MAX_REQUEST,
        first_byte_timeout: float = FIRST_BYTE_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        accept_rate: float = ACCEPT_RATE,
        accept_burst: int = ACCEPT_BURST,
        render_interval: float = RENDER_INTERVAL,
        log_interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._freshness = freshness
        self._max_connections = max_connections
        self._max_per_peer = max_per_peer
        self._max_request = max_request
        self._first_byte_timeout = first_byte_timeout
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._accept_rate = accept_rate
        self._accept_burst = accept_burst
        self._render_interval = render_interval
        self._clock = clock
        self._active = 0
        self._per_peer: dict[str, int] = {}
        self._saturated = False
        self._busy_peers = _Throttled(log_interval, clock)
        # One budget per kind (400, 431): a flood of one does not hide the other.
        self._bad_requests = {status: _Throttled(log_interval, clock) for status in (400, 431)}
        self._incomplete = _Throttled(log_interval, clock)
        self.renders = 0
        self._rendered: bytes | None = None
        self._rendered_key: object = None
        self._rendered_at = 0.0

    @property
    def active(self) -> int:
        return self._active

    @staticmethod
    async def bind(host: str, port: int) -> Listener:
        """Listen on (host, port); raises OSError (address in use, unknown host, ...).

        An IP address is bound directly. Only a host name goes through getaddrinfo(), whose
        AI_ADDRCONFIG opens a netlink socket: under the unit's RestrictAddressFamilies=
        (AF_UNIX AF_INET AF_INET6 with the metrics drop-in) that one is refused, and glibc
        then assumes both IPv4 and IPv6 are configured, which is harmless here.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return await anyio.create_tcp_listener(local_host=host, local_port=port)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As every server does: a restart may bind while old connections linger.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            listener = await anyio.abc.SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            raise
        return anyio.streams.stapled.MultiListener([listener])

    async def serve(
        self,
        listener: Listener,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and answer until cancelled; takes ownership of `listener`."""
        async with listener, anyio.create_task_group() as group:
            for each in listener.listeners:
                # create_tcp_listener makes socket listeners (which have accept()).
                group.start_soon(self._accept, typing.cast(anyio.abc.SocketListener, each), group)
            task_status.started()

    async def _accept(self, listener: anyio.abc.SocketListener, group: anyio.abc.TaskGroup) -> None:
        # A token bucket: ACCEPT_BURST at once, then ACCEPT_RATE a second.
        tokens, refilled = float(self._accept_burst), self._clock()
        while True:
            now = self._clock()
            tokens = min(float(self._accept_burst), tokens + (now - refilled) * self._accept_rate)
            refilled = now
            if tokens < 1:
                await anyio.sleep((1 - tokens) / self._accept_rate)
                continue
            tokens -= 1
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as error:
                cause = error.__cause__ if isinstance(error, anyio.BrokenResourceError) else error
                code = cause.errno if isinstance(cause, OSError) else None
                if code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays in the backlog and the listener readable:
                    # retrying at once would spin.
                    log.warning(
                        "metrics: cannot accept a connection: %s; retrying in 100 ms", cause
                    )
                    await anyio.sleep(0.1)
                continue
            peer = _peer_host(stream)
            # Counted before any await: the limits hold however fast connections arrive.
            if self._active >= self._max_connections:
                if not self._saturated:
                    # Once per episode, not once per refused connection.
                    self._saturated = True
                    log.warning(
                        "metrics: %d connections open; refusing more until one closes",
                        self._max_connections,
                    )
                group.start_soon(self._refuse, stream)
                continue
            if self._per_peer.get(peer, 0) >= self._max_per_peer:
                self._busy_peers.log(
                    logging.WARNING,
                    "metrics: %s holds %d connections; refusing more from it",
                    peer,
                    self._max_per_peer,
                )
                group.start_soon(self._refuse, stream)
                continue
            self._active += 1
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            group.start_soon(self._connection, stream, peer)

    async def _refuse(self, stream: anyio.abc.SocketStream) -> None:
        with anyio.move_on_after(self._write_timeout):
            with contextlib.suppress(*_GONE):
                await stream.send(_BUSY)
        await _close(stream)

    async def _connection(self, stream: anyio.abc.SocketStream, peer: str) -> None:
        try:
            reply = await self._reply(stream)
            if reply is not None:
                with anyio.move_on_after(self._write_timeout):
                    await stream.send(reply)
        except _GONE:
            log.debug("metrics: a client went away")
        except Exception:
            # Safety net: a bug in answering one scrape costs that scrape, never the daemon.
            log.exception("metrics: a request failed")
        finally:
            self._active -= 1
            if self._active < self._max_connections:
                self._saturated = False
            if (left := self._per_peer[peer] - 1) > 0:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]
            await _close(stream)

    async def _reply(self, stream: anyio.abc.SocketStream) -> bytes | None:
        try:
            with anyio.fail_after(self._read_timeout):
                head = await _read_head(stream, self._max_request, self._first_byte_timeout)
        except TimeoutError:
            self._incomplete.log(
                logging.INFO,
                "metrics: request from %s incomplete after %g s",
                _peer(stream),
                self._read_timeout,
            )
            return _response(408, b"request incomplete; closing\n")
        if head is None:
            return None  # closed, or silent past the first-byte deadline: nobody to answer
        try:
            return self._answer(head)
        except _BadRequest as error:
            if (throttled := self._bad_requests.get(error.status)) is not None:
                throttled.log(
                    logging.INFO, "metrics: bad request from %s: %s", _peer(stream), error
                )
            return _response(error.status, f"{error}\n".encode("ascii", "replace"))

    def _answer(self, head: bytes) -> bytes:
        if len(head) > self._max_request:
            raise _BadRequest(431, f"request head longer than {self._max_request} bytes")
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        matched = _REQUEST_LINE.fullmatch(line)
        if matched is None:
            raise _BadRequest(400, f"malformed request line {line[:80]!r}")
        method, target = matched.group(1), matched.group(2)
        if method != b"GET":
            raise _BadRequest(405, f"method {method[:20].decode()} not allowed; use GET")
        if target.split(b"?", 1)[0] != b"/metrics":
            raise _BadRequest(404, "not found; the metrics are at /metrics")
        return _response(200, self._exposition(), CONTENT_TYPE)

    def _exposition(self) -> bytes:
        """The rendered metrics, rendered again only when what they show may have changed:
        a flood of scrapes costs one rendering per RENDER_INTERVAL."""
        key = self._freshness() if self._freshness is not None else None
        now = self._clock()
        if (
            self._rendered is None
            or key != self._rendered_key
            or now - self._rendered_at >= self._render_interval
        ):
            self._rendered = generate_latest(self._registry)
            self._rendered_key, self._rendered_at = key, now
            self.renders += 1
        return self._rendered


async def _read_head(
    stream: anyio.abc.SocketStream, limit: int, first_byte_timeout: float
) -> bytes | None:
    """The request head (request line and headers); more than `limit` bytes of it is
    returned as is, for the caller to refuse; None if the client closed before its end or
    sent nothing within `first_byte_timeout`."""
    buffer = bytearray()
    while True:
        try:
            if buffer:
                chunk = await stream.receive(4096)
            else:
                chunk = b""  # stays empty when the deadline passes first
                with anyio.move_on_after(first_byte_timeout):
                    chunk = await stream.receive(4096)
                if not chunk:
                    return None
        except anyio.EndOfStream:
            return None
        # Search only the new part (and the 3 bytes before it) for the blank line.
        start = max(0, len(buffer) - 3)
        buffer += chunk
        ends = (buffer.find(b"\r\n\r\n", start), buffer.find(b"\n\n", start))
        if found := [end for end in ends if end >= 0]:
            return bytes(buffer[: min(found)])
        if len(buffer) > limit:
            return bytes(buffer)


def _peer_host(stream: anyio.abc.SocketStream) -> str:
    """The peer's address without its port: what the per-peer limit counts by."""
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    return str(address[0]) if isinstance(address, tuple) else str(address)


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


async def _close(stream: anyio.abc.SocketStream) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(OSError, anyio.BrokenResourceError):
            await stream.aclose()
