"""The collector's values and the HTTP endpoint, in process (anyio, real TCP on loopback)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from watcher.core.model import Problem
from watcher.daemon.state import Counters, MapState
from watcher.publish.metrics import MapCollector, MetricsServer, registry_for

from .maps import device, operator_map

TIMEOUT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeServer:
    clients: int = 3
    subscribers: int = 1


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[name, frozenset(labels.items())]


def test_the_collector_reads_the_map_and_the_counters() -> None:
    problem = Problem(code="missing-node", severity="error", message="m", path="/x")
    device_map = operator_map(
        generation=7,
        devices=(
            device("nvidia0", "gpu", 195, 0),
            device("nvidia1", "gpu", 195, 1, valid=False),
            device("nvidiactl", "control", 195, 255),
        ),
        problems=(problem, problem),
    )
    state = MapState(device_map)
    counters = Counters(events=12, uevents=3)
    for milliseconds in (0.2, 0.9, 3.0, 40.0, 5000.0):
        counters.book_scan(milliseconds)
    collector = MapCollector(state, counters, FakeServer())
    from prometheus_client import generate_latest

    found = samples(generate_latest(registry_for(collector)).decode())
    prefix = "gpu_device_watcher_"
    assert value(found, prefix + "generation") == 7
    assert value(found, prefix + "driver_loaded") == 1
    assert (
        value(
            found,
            prefix + "driver_info",
            version="580.95.05",
            dev_root=device_map.driver.dev_root or "",
        )
        == 1
    )
    assert value(found, prefix + "devices", kind="gpu", valid="true") == 1
    assert value(found, prefix + "devices", kind="gpu", valid="false") == 1
    assert value(found, prefix + "devices", kind="control", valid="true") == 1
    assert value(found, prefix + "devices", kind="uvm", valid="true") == 0
    # AMD's kinds are series too (zero on a host without AMD nodes).
    assert value(found, prefix + "devices", kind="kfd", valid="true") == 0
    assert value(found, prefix + "devices", kind="render", valid="false") == 0
    assert value(found, prefix + "problems", code="missing-node", severity="error") == 2
    assert value(found, prefix + "problems", code="not-in-dev", severity="warning") == 0
    # An error in the map: not ready, whatever cuda-checkpoint says.
    assert value(found, prefix + "checkpoint_ready") == 0
    assert value(found, prefix + "scans_total") == 5
    assert value(found, prefix + "events_total") == 12
    assert value(found, prefix + "uevents_total") == 3
    assert value(found, prefix + "clients") == 3
    assert value(found, prefix + "subscribers") == 1
    histogram = prefix + "scan_duration_seconds"
    assert value(found, histogram + "_count") == 5
    assert value(found, histogram + "_sum") == pytest.approx(5.0441)
    assert value(found, histogram + "_bucket", le="0.0005") == 1
    assert value(found, histogram + "_bucket", le="0.001") == 2
    assert value(found, histogram + "_bucket", le="0.005") == 3
    assert value(found, histogram + "_bucket", le="0.05") == 4
    assert value(found, histogram + "_bucket", le="2.5") == 4
    assert value(found, histogram + "_bucket", le="+Inf") == 5


def test_ready_when_the_map_is_clean_and_cuda_checkpoint_is_there() -> None:
    state = MapState(operator_map())
    collector = MapCollector(state, Counters(), FakeServer())
    from prometheus_client import generate_latest

    found = samples(generate_latest(registry_for(collector)).decode())
    assert value(found, "gpu_device_watcher_checkpoint_ready") == 1
    missing = MapCollector(MapState(operator_map(cuda_checkpoint=None)), Counters(), FakeServer())
    found = samples(generate_latest(registry_for(missing)).decode())
    assert value(found, "gpu_device_watcher_checkpoint_ready") == 0


# --- the endpoint --------------------------------------------------------------------------


@asynccontextmanager
async def endpoint(
    state: MapState | None = None, **limits: Any
) -> AsyncIterator[tuple[int, MetricsServer]]:
    collector = MapCollector(state or MapState(operator_map()), Counters(), FakeServer())
    server = MetricsServer(registry_for(collector), freshness=collector.freshness, **limits)
    listener = await MetricsServer.bind("127.0.0.1", 0)
    port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with anyio.create_task_group() as group:
        await group.start(server.serve, listener)
        yield port, server
        group.cancel_scope.cancel()


async def exchange(port: int, request: bytes) -> bytes:
    """Send `request`, read the reply until the server closes."""
    with anyio.fail_after(TIMEOUT):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            reply = b""
            try:
                while True:
                    reply += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return reply


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body(reply: bytes) -> str:
    return reply.split(b"\r\n\r\n", 1)[1].decode()


@pytest.mark.anyio
async def test_get_metrics() -> None:
    async with endpoint() as (port, _):
        reply = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        assert status(reply) == 200
        head = reply.split(b"\r\n\r\n", 1)[0].decode()
        assert "Content-Type: text/plain; version=0.0.4; charset=utf-8" in head.splitlines()
        assert f"Content-Length: {len(body(reply).encode())}" in head.splitlines()
        found = samples(body(reply))
        assert value(found, "gpu_device_watcher_generation") == 3
        # HTTP/1.0, a query string, bare newlines: all fine.
        reply = await exchange(port, b"GET /metrics?x=1 HTTP/1.0\n\n")
        assert status(reply) == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
    ],
)
async def test_anything_but_get_metrics(
    request_bytes: bytes, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "watcher.metrics")
    async with endpoint() as (port, _):
        reply = await exchange(port, request_bytes)
        assert status(reply) == code
        if code == 405:
            assert b"\r\nAllow: GET\r\n" in reply
        if code == 400:
            lines = [r.getMessage() for r in caplog.records if "bad request" in r.getMessage()]
            assert len(lines) == 1
            assert "\n" not in lines[0]
        assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200


@pytest.mark.anyio
async def test_an_oversized_request_is_refused() -> None:
    async with endpoint(max_request=1024) as (port, _):
        huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
        assert status(await exchange(port, huge)) == 431
        # A head that never ends, sent in pieces: refused once past the limit.
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            with anyio.fail_after(TIMEOUT):
                await stream.send(b"GET /metrics HTTP/1.1\r\n")
                reply = b""
                try:
                    while True:
                        await stream.send(b"X-Pad: " + b"b" * 100 + b"\r\n")
                        with anyio.move_on_after(0.01):
                            reply += await stream.receive()
                        if reply:
                            break
                except (anyio.BrokenResourceError, anyio.EndOfStream):
                    pass
            assert status(reply) == 431
        assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200


@pytest.mark.anyio
async def test_a_stalled_request_times_out() -> None:
    async with endpoint(read_timeout=0.2) as (port, _):
        with anyio.fail_after(TIMEOUT):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /metrics HTTP/1.1\r\n")
                reply = b""
                try:
                    while True:
                        reply += await stream.receive()
                except anyio.EndOfStream:
                    pass
        assert status(reply) == 408


@pytest.mark.anyio
async def test_too_many_connections_get_503_and_the_endpoint_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "watcher.metrics")
    async with endpoint(max_connections=3) as (port, server):
        assert server.active == 0
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(3)]
        try:
            # Accepted in order: by the time the server takes the next connection it has
            # counted these three (which stay silent well within the read timeout).
            for _ in range(5):
                assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 503
        finally:
            for stream in idle:
                await stream.aclose()
        assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
    warnings = [r for r in caplog.records if "refusing more" in r.getMessage()]
    assert len(warnings) == 1


# --- what keeps one peer from blinding the endpoint or slowing the daemon -------------------


class FrozenClock:
    """A clock that moves only when told: throttles and caches see no time pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_one_peer_cannot_take_every_connection() -> None:
    async with endpoint() as (port, server):
        # Idle connections from one address (all of 127/8 is loopback): as many as the
        # whole endpoint allows.
        idle = [
            await anyio.connect_tcp("127.0.0.1", port, local_host="127.0.0.2") for _ in range(16)
        ]
        try:
            with anyio.fail_after(TIMEOUT):
                refused = await idle[-1].receive()
            assert status(refused) == 503
            # Another peer is served meanwhile.
            assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
            assert server.active <= 4
        finally:
            for stream in idle:
                await stream.aclose()


@pytest.mark.anyio
async def test_a_silent_connection_is_closed_at_the_first_byte_deadline() -> None:
    async with endpoint(first_byte_timeout=0.2) as (port, server):
        with anyio.fail_after(TIMEOUT):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
        # Closed without a reply; a request that starts at once is still answered.
        assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
        with anyio.fail_after(TIMEOUT):
            while server.active:
                await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_bad_requests_are_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "watcher.metrics")
    clock = FrozenClock()
    async with endpoint(clock=clock, log_interval=10.0) as (port, _):
        for _ in range(30):
            assert status(await exchange(port, b"\x00 garbage\r\n\r\n")) == 400
        # A bad request of another kind has a budget of its own.
        assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)) == 431
        clock.now += 10.0
        assert status(await exchange(port, b"\x00 garbage\r\n\r\n")) == 400
    lines = [r.getMessage() for r in caplog.records if "bad request" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "malformed request line" in lines[0] and "more" not in lines[0]
    assert "longer than" in lines[1]
    assert lines[2].endswith("(and 29 more in the last 10 s, not logged)"), lines[2]


@pytest.mark.anyio
async def test_the_exposition_is_rendered_once_while_nothing_changes() -> None:
    clock = FrozenClock()
    state = MapState(operator_map())
    async with endpoint(state, clock=clock) as (port, server):
        for _ in range(20):
            assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
        assert server.renders == 1
        # A new generation is shown at the next scrape.
        state.publish(operator_map(devices=()))
        reply = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert value(samples(body(reply)), "gpu_device_watcher_generation") == 4
        assert server.renders == 2
        # Values the key does not cover are at most RENDER_INTERVAL old.
        clock.now += 1.0
        await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert server.renders == 3


@pytest.mark.anyio
async def test_connections_are_accepted_at_a_bounded_rate() -> None:
    async with endpoint(accept_rate=10.0, accept_burst=1) as (port, _):
        started = anyio.current_time()
        for _ in range(4):
            assert status(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
        # One at once, then one every 100 ms: at least 0.3 s for four, however fast the host.
        assert anyio.current_time() - started >= 0.29
