"""Prometheus metrics of the live map, and the HTTP endpoint that serves them.

The values are read at scrape time from the map, the daemon's counters and the socket
server: a scrape always shows the generation being served, and nothing is kept up to date
between scrapes. The exposition is prometheus-client's, from a private registry (the global
one would add the interpreter's own metrics and whatever else imported the library).

The endpoint is a deliberately small HTTP/1.1 server on the daemon's event loop (no thread
per scrape, none at all): one request per connection, answered and closed. Where a request
is not `GET /metrics` it gets 404 or 405; a malformed one gets 400 and one log line.
Limits, as on the socket: at most `MAX_CONNECTIONS` at once (more get 503), a request head
of at most `MAX_REQUEST` bytes (more gets 431), all of it within `READ_TIMEOUT` (else 408),
and a reply the client must take within `WRITE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import re
import socket
import typing
from collections.abc import Iterable
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
from watcher.publish.labels import checkpoint_ready
from watcher.state import SCAN_BUCKETS, Counters, MapState

__all__ = [
    "CONTENT_TYPE",
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "MapCollector",
    "MetricsServer",
    "ServerStats",
    "registry_for",
]

log = logging.getLogger("watcher.metrics")

MAX_CONNECTIONS: Final = 16
MAX_REQUEST: Final = 8192
READ_TIMEOUT: Final = 5.0
WRITE_TIMEOUT: Final = 5.0
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


class MetricsServer:
    """Serves `GET /metrics` from `registry` on one TCP address until cancelled."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_request: int = MAX_REQUEST,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._registry = registry
        self._max_connections = max_connections
        self._max_request = max_request
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._active = 0
        self._saturated = False

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
        while True:
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
            # Counted before any await: the limit holds however fast connections arrive.
            if self._active >= self._max_connections:
                group.start_soon(self._refuse, stream)
                continue
            self._active += 1
            group.start_soon(self._connection, stream)

    async def _refuse(self, stream: anyio.abc.SocketStream) -> None:
        if not self._saturated:
            # Once per episode, not once per refused connection.
            self._saturated = True
            log.warning(
                "metrics: %d connections open; refusing more until one closes",
                self._max_connections,
            )
        with anyio.move_on_after(self._write_timeout):
            with contextlib.suppress(*_GONE):
                await stream.send(_BUSY)
        await _close(stream)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
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
            await _close(stream)

    async def _reply(self, stream: anyio.abc.SocketStream) -> bytes | None:
        try:
            with anyio.fail_after(self._read_timeout):
                head = await _read_head(stream, self._max_request)
        except TimeoutError:
            log.info(
                "metrics: request from %s incomplete after %g s", _peer(stream), self._read_timeout
            )
            return _response(408, b"request incomplete; closing\n")
        if head is None:
            return None  # closed before a whole request: nobody to answer
        try:
            return self._answer(head)
        except _BadRequest as error:
            if error.status in (400, 431):
                log.info("metrics: bad request from %s: %s", _peer(stream), error)
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
        return _response(200, generate_latest(self._registry), CONTENT_TYPE)


async def _read_head(stream: anyio.abc.SocketStream, limit: int) -> bytes | None:
    """The request head (request line and headers); more than `limit` bytes of it is
    returned as is, for the caller to refuse; None if the client closed before its end."""
    buffer = bytearray()
    while True:
        try:
            chunk = await stream.receive(4096)
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
