"""The socket server on real Unix sockets: every op, every error code, every limit.

The server runs in the test's event loop on a socket under tmp_path; clients are anyio
streams (or a child process that drops to nobody, for SO_PEERCRED). Every wait is bounded
by `anyio.fail_after`; connection ends are observed through a notification per closed
connection, never by polling.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import stat
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import watcher
from watcher.config import Settings
from watcher.core.model import Device, DeviceMap, Driver, Kind, Mount, Problem
from watcher.core.snapshot import HostView
from watcher.daemon.state import Counters, MapState
from watcher.server import (
    Server,
    SocketInUseError,
    SocketSetupError,
    UnixServerSocket,
    bind_unix_socket,
    unlink_socket,
)
from watcher.server.protocol import (
    ERROR_CODES,
    KNOWN_OPS,
    MAX_LINE,
    ErrorReply,
    Get,
    Rescan,
    Status,
    Subscribe,
    Wait,
    decode_request,
    encode,
)
from watcher.server.protocol import (
    Path as PathRequest,
)

TIMEOUT = 10.0
NOBODY = 65534


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- maps --------------------------------------------------------------------------------


def make_device(
    name: str, minor: int, *, valid: bool = True, dev_root: str = "/dev", mode: str = "0666"
) -> Device:
    kind: Kind = "control" if name == "nvidiactl" else "gpu"
    return Device(
        name=name,
        path=f"{dev_root}/{name}",
        kind=kind,
        major=195,
        minor=minor,
        mode=mode,
        valid=valid,
        mount=Mount(
            id=22,
            mount_point=dev_root,
            fstype="devtmpfs",
            source="udev",
            options=("rw", "nosuid"),
            nodev=False,
        ),
    )


def make_map(
    *devices: Device,
    problems: tuple[Problem, ...] = (),
    dev_root: str | None = "/dev",
) -> DeviceMap:
    return DeviceMap(
        generation=1,
        updated="2026-11-28T20:40:00.000000Z",
        driver=Driver(
            loaded=True, version="580.95.05", root="/", dev_root=dev_root, source="detected"
        ),
        devices=tuple(sorted(devices, key=lambda device: device.name)),
        gpus=(),
        problems=problems,
    )


BASE_MAP = make_map(make_device("nvidiactl", 255), make_device("nvidia0", 0))


def big_map(index: int, count: int = 600) -> DeviceMap:
    """A map of roughly 150 KB encoded, different for every `index`."""
    devices = [make_device(f"nvidia-caps/nvidia-cap{n:05d}-padding", n) for n in range(count)]
    devices.append(make_device("nvidiactl", 255, mode=f"{index % 0o7777:04o}"))
    devices.append(make_device(f"nvidia{index}", index % 256))
    return make_map(*devices)


def map_json(device_map: DeviceMap) -> Any:
    return json.loads(msgspec.json.encode(device_map))


# --- harness -----------------------------------------------------------------------------


class TrackingServer(Server):
    """A Server that reports each finished connection, so tests wait for it without polling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed_send, self.closed = anyio.create_memory_object_stream[None](10_000)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await super()._connection(stream)
        finally:
            self.closed_send.send_nowait(None)

    async def wait_closed(self, count: int = 1) -> None:
        with anyio.fail_after(TIMEOUT):
            for _ in range(count):
                await self.closed.receive()

    def close_streams(self) -> None:
        self.closed_send.close()
        self.closed.close()


class Client:
    """A line-oriented test client over an anyio Unix stream."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def line(self) -> bytes:
        with anyio.fail_after(TIMEOUT):
            while (end := self.buffer.find(b"\n")) < 0:
                self.buffer += await self.stream.receive()
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    async def reply(self) -> Any:
        line = await self.line()
        assert line.count(b"\n") == 1
        return json.loads(line)

    async def ask(self, request: dict[str, Any] | bytes) -> Any:
        data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        await self.send(data)
        return await self.reply()

    async def rest_until_eof(self) -> bytes:
        """Everything the server still sends, up to the closed connection."""
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    self.buffer += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    # ECONNRESET after the data: the server closed with our input unread.
                    rest = bytes(self.buffer)
                    self.buffer.clear()
                    return rest

    async def aclose(self) -> None:
        await self.stream.aclose()


class Harness:
    def __init__(
        self, server: TrackingServer, state: MapState, counters: Counters, address: str
    ) -> None:
        self.server = server
        self.state = state
        self.counters = counters
        self.address = address
        self._clients: list[Client] = []

    async def connect(self) -> Client:
        with anyio.fail_after(TIMEOUT):
            client = Client(await anyio.connect_unix(self.address))
        self._clients.append(client)
        return client

    async def close_clients(self) -> None:
        for client in self._clients:
            await client.aclose()


async def _no_rescan() -> None:
    raise AssertionError("rescan was not expected")


def make_settings(
    path: str,
    *,
    max_clients: int = 256,
    allowed_uids: frozenset[int] | None = None,
    allowed_gids: frozenset[int] | None = None,
) -> Settings:
    return Settings(
        view=HostView(),
        socket=path,
        max_clients=max_clients,
        allowed_uids=allowed_uids,
        allowed_gids=allowed_gids,
    )


@asynccontextmanager
async def serving(
    tmp_path: Path,
    device_map: DeviceMap = BASE_MAP,
    *,
    rescan: Callable[[], Awaitable[None]] = _no_rescan,
    listener: socket.socket | None = None,
    max_clients: int = 256,
    allowed_uids: frozenset[int] | None = None,
    allowed_gids: frozenset[int] | None = None,
    **options: Any,
) -> AsyncIterator[Harness]:
    state = MapState(device_map)
    counters = Counters(scans=3, events=5, uevents=2, last_scan_ms=1.5)
    path = str(tmp_path / "gdw.sock")
    if listener is None:
        listener = bind_unix_socket(path, 0o660)
    # getsockname() names the temporary path a socket was bound under, not the final one.
    address = listener.path if isinstance(listener, UnixServerSocket) else listener.getsockname()
    settings_ = make_settings(
        path, max_clients=max_clients, allowed_uids=allowed_uids, allowed_gids=allowed_gids
    )
    server = TrackingServer(state, counters, settings_, rescan, **options)
    harness = Harness(server, state, counters, address)
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, listener)
            yield harness
            group.cancel_scope.cancel()
    finally:
        await harness.close_clients()
        server.close_streams()


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# --- get, path, status, rescan -------------------------------------------------------------


@pytest.mark.anyio
async def test_get_replies_with_the_pre_encoded_map(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"get"}\n')
        line = await client.line()
        assert line == harness.state.get_reply
        reply = json.loads(line)
        assert list(reply) == ["ok", "generation", "map"]
        assert reply == {"ok": True, "generation": 1, "map": map_json(BASE_MAP)}


@pytest.mark.anyio
async def test_path_of_a_valid_device(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "path", "name": "nvidiactl"})
        assert reply == {"ok": True, "generation": 1, "path": "/dev/nvidiactl"}
        assert list(reply) == ["ok", "generation", "path"]


@pytest.mark.anyio
async def test_path_of_an_absent_device_is_not_found(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        for name in ("nvidia7", "../../etc/passwd", "", "/dev/nvidiactl"):
            reply = await client.ask({"op": "path", "name": name})
            assert reply == error(
                "not-found",
                f"device {name!r} is absent: /dev has no such node (present: nvidia0, nvidiactl)",
            )


@pytest.mark.anyio
async def test_path_of_an_invalid_device_says_why(tmp_path: Path) -> None:
    problem = Problem(
        code="wrong-minor",
        severity="error",
        path="/dev/nvidia0",
        message="/dev/nvidia0 has minor 9, the driver registered 0",
    )
    device_map = make_map(make_device("nvidia0", 0, valid=False), problems=(problem,))
    async with serving(tmp_path, device_map) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "path", "name": "nvidia0"})
        assert reply == error(
            "not-found",
            "device 'nvidia0' is present at /dev/nvidia0 but not valid:"
            " /dev/nvidia0 has minor 9, the driver registered 0",
        )


@pytest.mark.anyio
async def test_path_without_a_device_root(tmp_path: Path) -> None:
    problem = Problem(
        code="no-device-root", severity="error", message="no NVIDIA device nodes anywhere"
    )
    async with serving(tmp_path, make_map(problems=(problem,), dev_root=None)) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "path", "name": "nvidiactl"})
        assert reply == error(
            "not-found",
            "device 'nvidiactl' is absent: there is no device root"
            " (no NVIDIA device nodes anywhere)",
        )


@pytest.mark.anyio
async def test_status_reports_counters(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "status"})
        assert list(reply) == ["ok", "status"]
        status = reply["status"]
        assert list(status) == [
            "version",
            "uptime_s",
            "generation",
            "clients",
            "scans",
            "events",
            "uevents",
            "last_scan_ms",
            "scan_running_s",
            "scan_stuck",
            "metrics",
        ]
        assert (status["scan_running_s"], status["scan_stuck"], status["metrics"]) == (
            None,
            False,
            "off",
        )
        harness.counters.scan_started = time.monotonic() - 12.0
        harness.counters.scan_overdue = True
        harness.counters.metrics = "not served: address in use"
        stuck = (await client.ask({"op": "status"}))["status"]
        assert stuck["scan_stuck"] is True
        assert 12.0 <= stuck["scan_running_s"] < 72.0
        assert stuck["metrics"] == "not served: address in use"
        harness.counters.scan_started, harness.counters.scan_overdue = None, False
        assert status["version"] == watcher.__version__
        assert 0 <= status["uptime_s"] < 60
        assert (status["generation"], status["clients"]) == (1, 1)
        assert (status["scans"], status["events"], status["uevents"]) == (3, 5, 2)
        assert status["last_scan_ms"] == 1.5
        second = await harness.connect()
        assert (await second.ask({"op": "status"}))["status"]["clients"] == 2


@pytest.mark.anyio
async def test_rescan_awaits_the_daemon_then_replies_with_the_new_map(tmp_path: Path) -> None:
    calls: list[int] = []
    changed = make_map(make_device("nvidiactl", 255))

    async def rescan() -> None:
        calls.append(1)
        # A real rescan takes a while; the reply must wait for it.
        await anyio.sleep(0.01)
        harness.state.publish(changed)

    async with serving(tmp_path, rescan=rescan) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "rescan"})
        assert calls == [1]
        assert reply["generation"] == 2
        assert reply["map"]["devices"] == map_json(changed)["devices"]


@pytest.mark.anyio
async def test_a_rescan_that_times_out_is_busy(tmp_path: Path) -> None:
    async def rescan() -> None:
        raise TimeoutError("a scan has not finished within 10 s")

    async with serving(tmp_path, rescan=rescan) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "rescan"})
        assert reply["error"] == {"code": "busy", "message": "a scan has not finished within 10 s"}
        assert (await client.ask({"op": "get"}))["ok"]


@pytest.mark.anyio
async def test_a_failing_request_is_internal_and_harms_nobody(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def rescan() -> None:
        raise RuntimeError("scan exploded")

    async with serving(tmp_path, rescan=rescan) as harness:
        bystander = await harness.connect()
        client = await harness.connect()
        with caplog.at_level(logging.ERROR, logger="watcher.server"):
            reply = await client.ask({"op": "rescan"})
        assert reply == error("internal", "internal error; see the daemon's log")
        assert "scan exploded" in caplog.text
        assert (await client.ask({"op": "get"}))["ok"] is True
        assert (await bystander.ask({"op": "get"}))["ok"] is True


# --- framing ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(
            b'{"op":"get"}\n{"op":"path","name":"nvidia0"}\n{"op":"nope"}\n'
            b'{"op":"status"}\r\n{"op":"path","name":"nvidia9"}\n{"op":"get"}\n'
        )
        replies = [await client.reply() for _ in range(6)]
        assert [reply["ok"] for reply in replies] == [True, True, False, True, False, True]
        assert "map" in replies[0]
        assert replies[1]["path"] == "/dev/nvidia0"
        assert replies[2]["error"]["code"] == "bad-request"
        assert "status" in replies[3]
        assert replies[4]["error"]["code"] == "not-found"
        assert "map" in replies[5]


@pytest.mark.anyio
async def test_a_request_split_across_writes(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        for piece in (b'{"op":', b'"path","na', b'me":"nvidiactl"}', b"\n"):
            await client.send(piece)
            await anyio.wait_all_tasks_blocked()
        assert (await client.reply())["path"] == "/dev/nvidiactl"


@pytest.mark.anyio
async def test_half_close_still_gets_every_reply(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        # The last request lacks its newline, as `printf ... | socat` would send it.
        await client.send(b'{"op":"get"}\n{"op":"path","name":"nvidiactl"}')
        await client.stream.send_eof()
        rest = await client.rest_until_eof()
        lines = rest.splitlines(keepends=True)
        assert lines[0] == harness.state.get_reply
        assert json.loads(lines[1])["path"] == "/dev/nvidiactl"
        assert len(lines) == 2
        await harness.server.wait_closed()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\xfe\x00garbage", "invalid JSON: invalid character (byte 0)"),
        (b"not json", "invalid JSON: invalid character (byte 4)"),
        (b'{"op":"get"', "invalid JSON: input data was truncated"),
        (b"[1,2]", "a request must be a JSON object, got array"),
        (b'"get"', "a request must be a JSON object, got str"),
        (b"{}", "missing 'op'; known ops: get, path, wait, subscribe, rescan, status"),
        (
            b'{"op":1}',
            "'op' must be a string; known ops: get, path, wait, subscribe, rescan, status",
        ),
        (
            b'{"op":"foo"}',
            "unknown op 'foo'; known ops: get, path, wait, subscribe, rescan, status",
        ),
        (b'{"op":"path"}', "op 'path': missing field 'name'"),
        (b'{"op":"path","name":5}', "op 'path': field 'name': expected str, got int"),
        (
            b'{"op":"wait","after":"x"}',
            "op 'wait': field 'after': expected int | null, got str",
        ),
        (b'{"op":"wait","timeout":-1}', "op 'wait': field 'timeout': expected float >= 0.0"),
        (b"", 'empty request line; send one JSON object per line, e.g. {"op":"get"}'),
        (b'{"op":"get","x":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "request nested too deeply"),
    ],
)
async def test_bad_requests_get_bad_request_and_the_connection_lives_on(
    tmp_path: Path, line: bytes, message: str
) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        assert await client.ask(line + b"\n") == error("bad-request", message)
        assert await client.ask({"op": "get"}) == json.loads(harness.state.get_reply)


@pytest.mark.anyio
async def test_unknown_fields_and_invalid_utf8_in_them_are_ignored(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"get","client":"x\xff","v":[1,{"a":null}]}\n')
        assert await client.line() == harness.state.get_reply


@pytest.mark.anyio
async def test_a_line_of_exactly_64_kib_is_accepted(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        head = b'{"op":"get","pad":"'
        line = head + b"x" * (MAX_LINE - len(head) - 2) + b'"}'
        assert len(line) == MAX_LINE
        await client.send(line + b"\n")
        assert await client.line() == harness.state.get_reply


@pytest.mark.anyio
async def test_a_too_large_line_is_refused_and_closes(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"get"}\n' + b"x" * (65 * 1024) + b"\n")
        assert await client.line() == harness.state.get_reply
        assert await client.reply() == error(
            "too-large", "request line longer than 65536 bytes; closing the connection"
        )
        assert await client.rest_until_eof() == b""
        await harness.server.wait_closed()
        other = await harness.connect()
        assert (await other.ask({"op": "get"}))["ok"] is True


@pytest.mark.anyio
async def test_a_too_large_partial_line_is_refused_without_waiting_for_its_end(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        # No newline ever comes: the limit must apply to what is buffered, not to lines.
        await client.send(b"x" * (MAX_LINE + 1))
        assert (await client.reply())["error"]["code"] == "too-large"
        assert await client.rest_until_eof() == b""


@pytest.mark.anyio
async def test_a_stalled_partial_line_is_dropped(tmp_path: Path) -> None:
    async with serving(tmp_path, stall_timeout=0.2) as harness:
        idle = await harness.connect()
        client = await harness.connect()
        await client.send(b'{"op":"ge')
        assert await client.reply() == error(
            "timeout", "request line incomplete after 0.2 s; closing the connection"
        )
        assert await client.rest_until_eof() == b""
        await harness.server.wait_closed()
        # A connection with no partial line is not on the clock: idle clients stay.
        assert (await idle.ask({"op": "get"}))["ok"] is True


# --- wait ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_is_woken_by_a_publication(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        # A pipelined get behind the wait is answered after it, in order.
        await client.send(b'{"op":"wait","after":1,"timeout":30}\n{"op":"get"}\n')
        await anyio.wait_all_tasks_blocked()
        harness.state.publish(make_map(make_device("nvidiactl", 255)))
        reply = await client.reply()
        assert list(reply) == ["ok", "generation", "map"]
        assert reply["generation"] == 2
        assert await client.line() == harness.state.get_reply


@pytest.mark.anyio
async def test_wait_for_a_generation_already_past_replies_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"wait","after":0,"timeout":0}\n')
        assert await client.line() == harness.state.get_reply


@pytest.mark.anyio
async def test_wait_times_out(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        reply = await client.ask({"op": "wait", "after": 1, "timeout": 0.05})
        assert reply == error("timeout", "no generation after 1 within 0.05 s (current: 1)")
        assert (await client.ask({"op": "get"}))["ok"] is True


@pytest.mark.anyio
async def test_wait_after_defaults_to_the_current_generation(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        harness.state.publish(make_map(make_device("nvidiactl", 255)))
        client = await harness.connect()
        reply = await client.ask({"op": "wait", "timeout": 0.05})
        assert reply == error("timeout", "no generation after 2 within 0.05 s (current: 2)")


def test_wait_timeout_defaults_to_30_s_and_is_capped_at_300_s() -> None:
    assert decode_request(b'{"op":"wait"}') == Wait(after=None, timeout=30.0)
    request = decode_request(b'{"op":"wait","timeout":100000}')
    assert isinstance(request, Wait)
    assert request.bounded_timeout == 300.0


@pytest.mark.anyio
async def test_a_waiting_client_that_hangs_up_frees_its_slot_at_once(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"wait","timeout":300}\n')
        await anyio.wait_all_tasks_blocked()
        await client.aclose()
        await harness.server.wait_closed()
        assert harness.server.clients == 0


# --- subscribe -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_subscribe_streams_one_line_per_generation(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"subscribe"}\n')
        assert await client.line() == harness.state.get_reply
        second = make_map(
            make_device("nvidiactl", 255, valid=False),
            make_device("nvidia1", 1),
            make_device("nvidia-uvm", 0),
        )
        harness.state.publish(second)
        reply = await client.reply()
        assert list(reply) == ["ok", "generation", "changes", "map"]
        assert reply["ok"] is True
        assert reply["generation"] == 2
        assert reply["changes"] == [
            {"change": "added", "name": "nvidia-uvm", "path": "/dev/nvidia-uvm"},
            {"change": "removed", "name": "nvidia0", "path": "/dev/nvidia0"},
            {"change": "added", "name": "nvidia1", "path": "/dev/nvidia1"},
            {"change": "changed", "name": "nvidiactl", "path": "/dev/nvidiactl"},
        ]
        assert reply["map"] == {**map_json(second), "generation": 2}
        # Content equal to the current map is no generation: no line.
        assert harness.state.publish(second) is None
        harness.state.publish(BASE_MAP)
        assert (await client.reply())["generation"] == 3


@pytest.mark.anyio
async def test_a_half_closed_subscriber_keeps_its_stream(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"subscribe"}\n{"op":"get"}\n')
        await client.stream.send_eof()
        assert await client.line() == harness.state.get_reply
        await anyio.wait_all_tasks_blocked()
        harness.state.publish(make_map(make_device("nvidiactl", 255)))
        # Input after subscribe is ignored: the next line is the change, not a get reply.
        assert (await client.reply())["changes"][0]["change"] == "removed"


@pytest.mark.anyio
async def test_a_subscriber_that_hangs_up_is_gone_before_the_next_generation(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"subscribe"}\n')
        await client.line()
        assert harness.server.subscribers == 1
        await client.aclose()
        await harness.server.wait_closed()
        assert (harness.server.subscribers, harness.server.clients) == (0, 0)


@pytest.mark.anyio
async def test_a_slow_subscriber_gets_a_busy_line_and_is_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, subscriber_queue=4) as harness:
        client = await harness.connect()
        await client.send(b'{"op":"subscribe"}\n')
        await client.line()
        await anyio.wait_all_tasks_blocked()
        # Six generations at once, none of them sent yet: more than the queue holds.
        for index in range(6):
            harness.state.publish(make_map(make_device(f"nvidia{index}", index)))
        assert (await client.reply())["generation"] == 2
        assert await client.reply() == error(
            "busy",
            "subscriber fell behind by more than 4 generations; subscribe again to resynchronise",
        )
        assert await client.rest_until_eof() == b""
        assert harness.server.subscribers == 0


@pytest.mark.anyio
async def test_a_subscriber_that_stopped_reading_is_dropped_and_memory_stays_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="watcher.server")
    publications = 120
    line_size = len(msgspec.json.encode(big_map(0)))
    async with serving(tmp_path, subscriber_queue=4, send_grace=0.2) as harness:
        stuck = await harness.connect()
        await stuck.send(b'{"op":"subscribe"}\n')
        await stuck.line()
        bystander = await harness.connect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for index in range(1, publications + 1):
                harness.state.publish(big_map(index))
                # Let the server run between generations, as the daemon's debounce would.
                await anyio.wait_all_tasks_blocked()
                if index % 20 == 0:
                    assert (await bystander.ask({"op": "get"}))["generation"] == index + 1
            grown = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        # Unbounded buffering would hold every generation (~18 MB); the queue holds 4.
        assert publications * line_size > 15_000_000
        assert grown < 12 * line_size
        await harness.server.wait_closed()
        assert harness.server.subscribers == 0
        assert "dropped a subscriber that fell behind (it had stopped reading)" in caplog.text
        rest = await stuck.rest_until_eof()
        # What it got was at most the lines the kernel buffered before it stopped reading.
        assert rest.count(b"\n") < 10
        assert (await bystander.ask({"op": "get"}))["ok"] is True


# --- vanishing clients, limits, concurrency ----------------------------------------------------


@pytest.mark.anyio
async def test_a_client_vanishing_mid_reply_is_handled_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, big_map(1, count=5000)) as harness:
        assert len(harness.state.get_reply) > 1_000_000
        with caplog.at_level(logging.DEBUG, logger="watcher.server"):
            for _ in range(3):
                client = await harness.connect()
                await client.send(b'{"op":"get"}\n' * 20)
                await anyio.wait_all_tasks_blocked()
                await client.aclose()
            await harness.server.wait_closed(3)
        assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
        other = await harness.connect()
        await other.send(b'{"op":"get"}\n')
        assert await other.line() == harness.state.get_reply


@pytest.mark.anyio
async def test_clients_beyond_max_clients_get_busy(tmp_path: Path) -> None:
    async with serving(tmp_path, max_clients=2) as harness:
        first, second = await harness.connect(), await harness.connect()
        for client in (first, second):
            assert (await client.ask({"op": "get"}))["ok"] is True
        extra = await harness.connect()
        assert await extra.reply() == error(
            "busy", "too many clients (max_clients=2); try again later"
        )
        assert await extra.rest_until_eof() == b""
        await first.aclose()
        await harness.server.wait_closed()
        again = await harness.connect()
        assert (await again.ask({"op": "get"}))["ok"] is True
        assert (await second.ask({"op": "get"}))["ok"] is True


@pytest.mark.anyio
async def test_many_concurrent_clients_are_all_served(tmp_path: Path) -> None:
    async with serving(tmp_path) as harness:
        expected = harness.state.get_reply
        results: list[bool] = []

        async def one_client(number: int) -> None:
            client = await harness.connect()
            for _ in range(20):
                await client.send(b'{"op":"get"}\n')
                results.append(await client.line() == expected)
            reply = await client.ask({"op": "path", "name": "nvidiactl"})
            results.append(reply["path"] == "/dev/nvidiactl")

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as group:
                for number in range(50):
                    group.start_soon(one_client, number)
        assert len(results) == 50 * 21
        assert all(results)


# --- SO_PEERCRED -------------------------------------------------------------------------------

_CHILD = r"""
import os, socket, sys
uid, gid, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
groups = [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
assert (os.getuid(), os.geteuid()) == (uid, uid)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.settimeout(10)
client.connect("\0" + address)
try:
    client.sendall(b'{"op":"get"}\n')
    client.shutdown(socket.SHUT_WR)
except OSError:
    pass  # refused before the request went out
data = b""
try:
    while chunk := client.recv(65536):
        data += chunk
except ConnectionResetError:
    pass  # refused with the request unread
sys.stdout.buffer.write(data)
"""


def _abstract_listener() -> tuple[socket.socket, str]:
    name = f"gdw-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen()
    return listener, name


async def _as_user(name: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> bytes:
    """Connect from a child that dropped to `uid` first: SO_PEERCRED sees the real thing."""
    command = [sys.executable, "-I", "-c", _CHILD, str(uid), str(gid)]
    command += [",".join(map(str, groups)), name]
    with anyio.fail_after(TIMEOUT):
        result = await anyio.run_process(command)
    return result.stdout


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setuid() to nobody needs root")


@needs_root
@pytest.mark.anyio
async def test_a_peer_outside_allowed_uids_is_forbidden(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with serving(tmp_path, listener=listener, allowed_uids=frozenset({4242})) as harness:
        output = await _as_user(name, NOBODY, NOBODY)
        assert output == (
            b'{"ok":false,"error":{"code":"forbidden",'
            b'"message":"uid 65534 (gid 65534) is not in allowed_uids or allowed_gids"}}\n'
        )
        # Root is always allowed, whatever the lists say.
        client = await harness.connect()
        assert (await client.ask({"op": "get"}))["ok"] is True
        assert harness.server.clients == 1


@needs_root
@pytest.mark.anyio
async def test_allowed_uids_and_supplementary_gids_admit_a_peer(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with serving(
        tmp_path,
        listener=listener,
        allowed_uids=frozenset({4242}),
        allowed_gids=frozenset({4343}),
    ) as harness:
        expected = harness.state.get_reply
        assert await _as_user(name, 4242, NOBODY) == expected
        assert await _as_user(name, NOBODY, 4343) == expected
        assert await _as_user(name, NOBODY, NOBODY, groups=(4343,)) == expected
        assert b'"forbidden"' in await _as_user(name, NOBODY, NOBODY, groups=(4444,))


# --- shutdown ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shutdown_closes_every_client_and_the_caller_unlinks(tmp_path: Path) -> None:
    path = str(tmp_path / "gdw.sock")
    listener = bind_unix_socket(path, 0o660)
    state = MapState(BASE_MAP)
    server = TrackingServer(state, Counters(), make_settings(path), _no_rescan)
    clients: list[Client] = []
    try:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as group:
                await group.start(server.serve, listener)
                for request in (b'{"op":"get"}\n', b'{"op":"subscribe"}\n', b""):
                    client = Client(await anyio.connect_unix(path))
                    clients.append(client)
                    if request:
                        await client.send(request)
                        await client.line()
                    else:
                        await client.send(b'{"op":"wait","timeout":300}\n')
                await anyio.wait_all_tasks_blocked()
                assert (server.clients, server.subscribers) == (3, 1)
                group.cancel_scope.cancel()
            for client in clients:
                assert await client.rest_until_eof() == b""
        assert server.clients == 0
        with pytest.raises(ConnectionRefusedError):
            await anyio.connect_unix(path)
        assert unlink_socket(path, listener.inode)
        assert not os.path.exists(path)
        # Publishing after shutdown reaches no stale listener.
        assert state.publish(make_map()) is not None
    finally:
        for client in clients:
            await client.aclose()
        server.close_streams()


# --- the socket file ---------------------------------------------------------------------------


def test_bind_makes_the_path_appear_only_once_listening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "gdw.sock")
    seen: list[str] = []
    real_link, real_rename = os.link, os.rename

    def probe(source: str, src_dir_fd: int | None) -> None:
        # The socket is moved from its private directory by fd: reach it the same way.
        if src_dir_fd is not None:
            source = f"/proc/self/fd/{src_dir_fd}/{source}"
        assert not os.path.exists(path)
        assert stat.S_IMODE(os.stat(source).st_mode) == 0o640
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
            early.connect(source)  # already accepting, before the path exists
        seen.append(source)

    def link(source: str, target: str, *, src_dir_fd: int | None = None, **kw: Any) -> None:
        probe(source, src_dir_fd)
        real_link(source, target, src_dir_fd=src_dir_fd, **kw)

    def rename(source: str, target: str, *, src_dir_fd: int | None = None, **kw: Any) -> None:
        probe(source, src_dir_fd)
        real_rename(source, target, src_dir_fd=src_dir_fd, **kw)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    with bind_unix_socket(path, 0o640) as sock:
        assert len(seen) == 1
        assert isinstance(sock, UnixServerSocket)
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert (sock.inode, sock.path) == (info.st_ino, path)
        assert os.listdir(tmp_path) == ["gdw.sock"]  # no temporary name left behind


def test_bind_sets_the_group(tmp_path: Path) -> None:
    group = grp.getgrgid(NOBODY).gr_name
    for spelling in (group, NOBODY, str(NOBODY)):
        path = str(tmp_path / f"gdw-{spelling}.sock")
        with bind_unix_socket(path, 0o660, spelling):
            assert os.stat(path).st_gid == NOBODY


def test_bind_refuses_an_unknown_group_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(SocketSetupError, match="socket_group 'no-such-group-gdw': no such group"):
        bind_unix_socket(str(tmp_path / "gdw.sock"), 0o660, "no-such-group-gdw")
    assert os.listdir(tmp_path) == []


def test_bind_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "gdw.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # its daemon died: the file stays, nobody listens
    stale_inode = os.lstat(path).st_ino
    with bind_unix_socket(path, 0o660) as sock:
        assert os.lstat(path).st_ino == sock.inode != stale_inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
        assert os.listdir(tmp_path) == ["gdw.sock"]


def test_bind_refuses_a_live_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "gdw.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen()
        inode = os.lstat(path).st_ino
        with pytest.raises(SocketInUseError, match=f"another gpu-device-watcher is serving {path}"):
            bind_unix_socket(path, 0o660)
        assert os.lstat(path).st_ino == inode
        assert os.listdir(tmp_path) == ["gdw.sock"]


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_bind_refuses_a_non_socket_and_keeps_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gdw.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SocketSetupError, match=r"exists and is .*refusing to replace it"):
        bind_unix_socket(str(path), 0o660)
    assert os.path.lexists(path)
    if kind == "file":
        assert path.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["gdw.sock"]


def test_bind_refuses_a_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(SocketSetupError, match="too long"):
        bind_unix_socket(str(tmp_path / ("x" * 120)), 0o660)


def test_bind_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    # The socket's own directory is created (tests/server/test_socket_directory.py); its parent not.
    with pytest.raises(SocketSetupError, match="No such file or directory"):
        bind_unix_socket(str(tmp_path / "missing" / "sub" / "gdw.sock"), 0o660)


def test_unlink_socket_removes_only_our_own(tmp_path: Path) -> None:
    path = str(tmp_path / "gdw.sock")
    with bind_unix_socket(path, 0o660) as ours:
        inode = ours.inode
    # A successor replaced it (its predecessor's file looked stale): it keeps its socket.
    with bind_unix_socket(path, 0o660) as successor:
        assert not unlink_socket(path, inode)
        assert os.lstat(path).st_ino == successor.inode
        assert unlink_socket(path, successor.inode)
    assert not os.path.lexists(path)
    assert not unlink_socket(path, inode)
    Path(path).write_text("not a socket")
    assert not unlink_socket(path, os.lstat(path).st_ino)


# --- the decoder, pure ---------------------------------------------------------------------------


def test_every_op_decodes() -> None:
    assert decode_request(b'{"op":"get"}') == Get()
    assert decode_request(b'{"op":"path","name":"nvidiactl"}') == PathRequest(name="nvidiactl")
    assert decode_request(b'{"op":"wait","after":3,"timeout":5}') == Wait(after=3, timeout=5)
    assert decode_request(b'{"op":"subscribe"}') == Subscribe()
    assert decode_request(b'{"op":"rescan","extra":true}') == Rescan()
    assert decode_request(b' {"op":"status"}\r') == Status()
    assert set(KNOWN_OPS) == {"get", "path", "wait", "subscribe", "rescan", "status"}
    assert set(ERROR_CODES) == {
        "bad-request",
        "too-large",
        "not-found",
        "timeout",
        "forbidden",
        "busy",
        "internal",
    }


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.builds(
    lambda op, fields: json.dumps({"op": op, **fields}).encode(),
    st.sampled_from([*KNOWN_OPS, "", "GET", "nope"]) | st.text(max_size=10),
    st.dictionaries(
        st.sampled_from(["name", "after", "timeout", "op", "x"]), _json_values, max_size=3
    ),
)


def _check_one_reply(line: bytes) -> None:
    result = decode_request(line)
    if isinstance(result, ErrorReply):
        reply = encode(result)
        assert reply.endswith(b"\n")
        assert reply.count(b"\n") == 1
        parsed = json.loads(reply)
        assert parsed["ok"] is False
        assert parsed["error"]["code"] == "bad-request"
        assert isinstance(parsed["error"]["message"], str)
        assert parsed["error"]["message"]
    else:
        assert isinstance(result, Get | PathRequest | Wait | Subscribe | Rescan | Status)


@settings(max_examples=400)
@given(st.binary(max_size=200).filter(lambda data: b"\n" not in data))
def test_random_bytes_always_get_one_well_formed_reply(data: bytes) -> None:
    _check_one_reply(data)


@settings(max_examples=400)
@given(_requests)
def test_random_requests_always_get_one_well_formed_reply(line: bytes) -> None:
    _check_one_reply(line)
