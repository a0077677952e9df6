"""Abuse of the socket: fuzzed lines, 1,000 connections, slow senders, stalled subscribers,
clients that vanish mid-reply. The daemon must answer every line with one well-formed reply,
stay up, serve other clients meanwhile, and give back every descriptor and its memory.

Descriptor counts are read from /proc/PID/fd after a round trip on a probe connection that
is open both times (so it counts in both), once every client of the test is gone: each one
either read the daemon's end of stream itself or was refused with one line, then closed.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.server.protocol import (
    ErrorReply,
    Get,
    Rescan,
    Status,
    Subscribe,
    Wait,
    decode_request,
    encode,
)
from watcher.server.protocol import Path as PathRequest

from .harness import Client, Daemon, Host, check_reply_shape, mknod

pytestmark = pytest.mark.reliability

VALID = [
    b'{"op":"get"}',
    b'{"op":"path","name":"nvidiactl"}',
    b'{"op":"path","name":"../../etc/passwd"}',
    b'{"op":"status"}',
    b'{"op":"wait","after":0,"timeout":0}',
    b'{"op":"rescan"}',
    b'{"op":"get","extra":[1,{"y":null}],"name":"x"}',
    b'{"op":"path","name":"nvidia-caps/nvidia-cap1"}',
    b'{"name":"nvidiactl","op":"path"}',
]
_MAX_WAIT = 0.02


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, byte in edits:
        if not out:
            out.append(byte)
            continue
        at = position % len(out)
        if kind == 0:
            out[at] = byte
        elif kind == 1:
            out.insert(at, byte)
        elif kind == 2:
            del out[at]
        elif kind == 3:
            del out[at:]
        else:
            out[at:at] = out[:at]
    return bytes(out)


_json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_requests = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["get", "path", "status", "wait", "rescan", "", "GET", "nope"])
        | st.text(max_size=6)
    },
    optional={
        "name": st.sampled_from(
            [
                "nvidiactl",
                "../../etc/passwd",
                "/etc/shadow",
                "",
                "\x00",
                "nvidia0/../../../../etc/passwd",
            ]
        )
        | _json_value,
        "after": st.integers(-(2**70), 2**70) | _json_value,
        "timeout": st.floats(0, _MAX_WAIT) | _json_value,
        "x": _json_value,
    },
).map(lambda request: json.dumps(request).encode())
LINES = st.one_of(
    st.binary(max_size=200),
    st.builds(
        _mutate,
        st.sampled_from(VALID),
        st.lists(
            st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
        ),
    ),
    _requests,
).map(lambda line: line.replace(b"\n", b" "))


def expected(line: bytes) -> str | None:
    """What the server must answer, by the decoder's own verdict; None: not sent."""
    request = decode_request(line)
    if isinstance(request, ErrorReply):
        return "bad-request"
    if isinstance(request, Subscribe):
        return None  # turns the connection into a stream; has its own tests
    if isinstance(request, Wait):
        return "wait" if request.bounded_timeout <= _MAX_WAIT else None
    return {Get: "map", Rescan: "map", Status: "status", PathRequest: "path"}[type(request)]


def check_answer(kind: str, reply: dict[str, Any]) -> None:
    if kind == "bad-request":
        assert reply["error"]["code"] == "bad-request", reply
    elif kind == "map":
        assert reply["ok"] and isinstance(reply["map"]["devices"], list), reply
    elif kind == "status":
        assert reply["ok"] and "uptime_s" in reply["status"], reply
    elif kind == "path":
        assert reply["ok"] or reply["error"]["code"] == "not-found", reply
    else:
        assert reply["ok"] or reply["error"]["code"] == "timeout", reply


# --- fuzzing -----------------------------------------------------------------------------------


def random_line(rng: random.Random) -> bytes:
    """A seeded mutation fuzzer for bulk: hypothesis explores, this one adds volume cheaply."""
    pick = rng.random()
    if pick < 0.2:
        return rng.randbytes(rng.randrange(0, 200)).replace(b"\n", b" ")
    base = rng.choice(VALID)
    edits = [
        (rng.randrange(5), rng.randrange(10_000), rng.randrange(256))
        for _ in range(rng.randrange(0, 7))
    ]
    return _mutate(base, edits).replace(b"\n", b" ")


def _check_decoded(line: bytes) -> None:
    result = decode_request(line)
    if isinstance(result, ErrorReply):
        reply = check_reply_shape(encode(result))
        assert reply["error"]["code"] == "bad-request"
    else:
        assert isinstance(result, Get | PathRequest | Wait | Subscribe | Rescan | Status)


def test_fuzzed_lines_through_the_decoder(
    soak: int, seed: int, record: Callable[..., None]
) -> None:
    tried = 0

    @settings(max_examples=1500 * soak, deadline=None)
    @given(LINES)
    def one(line: bytes) -> None:
        nonlocal tried
        tried += 1
        _check_decoded(line)

    one()
    rng = random.Random(seed)
    bulk = 30_000 * soak
    for _ in range(bulk):
        line = random_line(rng)
        try:
            _check_decoded(line)
        except Exception as error:
            raise AssertionError(f"seed {seed}: {line!r}") from error
    record(
        "fuzzed request lines through protocol.decode_request",
        f"{tried} (hypothesis) + {bulk} (seeded mutations)",
        0,
    )


def test_fuzzed_lines_against_the_live_daemon(
    start_daemon: Callable[..., Daemon],
    base: Path,
    soak: int,
    seed: int,
    record: Callable[..., None],
) -> None:
    daemon = start_daemon(max_clients=64)
    socket_path = base / "gdw.sock"
    bystander = Client(socket_path)
    probe = Client(socket_path)
    probe.ask({"op": "status"})
    fds_before = daemon.fd_count()
    sent = skipped = connections = 0

    def exchange(lines: list[bytes]) -> None:
        nonlocal sent, skipped, connections
        kinds = [expected(line) for line in lines]
        batch = [(line, kind) for line, kind in zip(lines, kinds, strict=True) if kind]
        skipped += len(lines) - len(batch)
        connections += 1
        with Client(socket_path) as client:
            # Pipelined in one write: answers come back one line each, in order.
            client.send_raw(b"".join(line + b"\n" for line, _ in batch))
            for line, kind in batch:
                reply = check_reply_shape(client.line())
                check_answer(kind, reply)
                del line
            # Done talking: the daemon closes its end, and the fd count below cannot race
            # a close still on its way.
            client.sock.shutdown(socket.SHUT_WR)
            assert client.reader.read() == b""
        sent += len(batch)
        # Another client is served in between.
        assert bystander.ask({"op": "get"})["ok"]

    @settings(
        max_examples=150 * soak,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(LINES, min_size=10, max_size=40))
    def one(lines: list[bytes]) -> None:
        exchange(lines)

    one()
    from_hypothesis = sent
    rng = random.Random(seed)
    while sent < 12_000 * soak:
        exchange([random_line(rng) for _ in range(rng.randrange(20, 200))])
    probe.ask({"op": "status"})
    probe.ask({"op": "status"})
    fds_after = daemon.fd_count()
    bystander.close()
    probe.close()
    assert daemon.alive()
    record(
        "fuzzed request lines against the live daemon (hypothesis: random, mutated, JSON)",
        f"{sent} lines ({from_hypothesis} from hypothesis) on {connections} connections",
        0,
        skipped_subscribe_or_long_wait=skipped,
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert sent >= 10_000 * soak, sent
    assert fds_after == fds_before


# --- many clients --------------------------------------------------------------------------------


def _read_all_lines(sock: socket.socket, timeout: float = 10.0) -> list[bytes]:
    """Every line until the peer's end of stream (a reset counts as the end)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data.splitlines(keepends=True)


def _connect_all_asking(socket_path: str, count: int) -> list[socket.socket]:
    """COUNT connections, each sending one `get` at once, none read yet."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_path)
        sock.sendall(b'{"op":"get"}\n')
        sockets.append(sock)
    return sockets


def _first_lines(sockets: list[socket.socket], count: int) -> dict[socket.socket, bytes]:
    """Read the first line of each; busy ones end right after it."""
    selector = selectors.DefaultSelector()
    firsts: dict[socket.socket, bytes] = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    buffers: dict[socket.socket, bytes] = dict.fromkeys(sockets, b"")
    while len(firsts) < count and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            buffers[sock] += chunk
            if b"\n" in buffers[sock] or not chunk:
                firsts[sock] = buffers[sock].split(b"\n", 1)[0] + b"\n"
                selector.unregister(sock)
    selector.close()
    assert len(firsts) == count, f"only {len(firsts)} of {count} answered"
    return firsts


def _served_busy_other(
    firsts: dict[socket.socket, bytes],
) -> tuple[list[socket.socket], int, int]:
    """The sockets served, and how many were answered `busy` or with another error."""
    served, busy, other = [], 0, 0
    for sock, line in firsts.items():
        reply = check_reply_shape(line)
        if reply["ok"]:
            served.append(sock)
        elif reply["error"]["code"] == "busy":
            busy += 1
        else:
            other += 1
    return served, busy, other


def test_a_thousand_connections_at_once(
    start_daemon: Callable[..., Daemon], base: Path, soak: int, record: Callable[..., None]
) -> None:
    max_clients = 16
    daemon = start_daemon(max_clients=max_clients)
    socket_path = str(base / "gdw.sock")
    probe = Client(socket_path)
    probe.ask({"op": "status"})
    fds_before = daemon.fd_count()
    count = 1000 * soak
    probe.close()  # it would hold a slot
    sockets = _connect_all_asking(socket_path, count)
    firsts = _first_lines(sockets, count)
    served, busy, other = _served_busy_other(firsts)
    for sock in sockets:
        sock.setblocking(True)
        if sock not in served:
            sock.close()
    # Slots are taken while held: exactly max_clients served, every other one `busy`.
    assert len(served) == max_clients
    assert busy == count - max_clients
    assert other == 0
    # Give the slots back (the daemon closes: we read its end), then a new client is served.
    for sock in served:
        sock.shutdown(socket.SHUT_WR)
        _read_all_lines(sock)
        sock.close()
    with Client(socket_path) as probe:
        probe.ask({"op": "status"})
        status = probe.ask({"op": "status"})["status"]
        fds_after = daemon.fd_count()
    assert status["clients"] == 1
    record(
        f"{count} connections at once (max_clients={max_clients})",
        count,
        0,
        served=len(served),
        busy=busy,
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert fds_after == fds_before


def test_slow_senders_do_not_hold_up_others(
    start_daemon: Callable[..., Daemon], base: Path, record: Callable[..., None]
) -> None:
    start_daemon(max_clients=64)
    socket_path = base / "gdw.sock"
    slow_count, results = 40, []
    request = b'{"op":"path","name":"nvidiactl"}\n'

    def slow_sender() -> None:
        with Client(socket_path) as client:
            for byte in request:
                client.send_raw(bytes([byte]))
                time.sleep(0.005)  # the client under test is slow on purpose
            results.append(check_reply_shape(client.line()))

    threads = [threading.Thread(target=slow_sender) for _ in range(slow_count)]
    for thread in threads:
        thread.start()
    latencies = []
    with Client(socket_path) as fast:
        while any(thread.is_alive() for thread in threads):
            started = time.monotonic()
            assert fast.ask({"op": "get"})["ok"]
            latencies.append(time.monotonic() - started)
    for thread in threads:
        thread.join(30)
    assert len(results) == slow_count
    assert all(reply["ok"] and reply["path"].endswith("/nvidiactl") for reply in results)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    record(
        f"{slow_count} slow senders (1 byte / 5 ms) while another client asks",
        f"{len(latencies)} fast requests",
        0,
        fast_p99_ms=round(p99 * 1000, 2),
    )
    assert p99 < 0.1


def _big_host(host: Host, caps: int) -> None:
    for number in range(1, caps + 1):
        mknod(host.fs(f"/run/nvidia/driver/dev/nvidia-caps/nvidia-cap{number}"), 234, number, 0o444)


def test_subscribers_that_never_read(
    start_daemon: Callable[..., Daemon],
    base: Path,
    host: Host,
    soak: int,
    record: Callable[..., None],
) -> None:
    """Stalled subscribers are dropped after 64 generations; memory stays bounded."""
    _big_host(host, 400)  # a map of about 120 KiB: socket buffers fill after a few lines
    daemon = start_daemon(max_clients=128, debounce_ms=0)
    socket_path = base / "gdw.sock"
    control = Client(socket_path)
    size = len(json.dumps(control.ask({"op": "get"})))
    node = host.fs("/run/nvidia/driver/dev/nvidia-caps/nvidia-cap1")

    def generations(count: int) -> None:
        generation = control.ask({"op": "get"})["generation"]
        for number in range(count):
            node.chmod(0o444 if number % 2 else 0o400)  # created 0444: every chmod changes it
            reply = control.ask({"op": "wait", "after": generation, "timeout": 5})
            assert reply["ok"], reply
            generation = reply["generation"]

    generations(20)  # warm up: allocator and caches at their working size
    rss_before = daemon.rss_kib()
    stalled = []
    for _ in range(50):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(socket_path))
        sock.sendall(b'{"op":"subscribe"}\n')
        stalled.append(sock)
    count = 200 * soak
    generations(count)
    rss_after = daemon.rss_kib()
    # Every stalled subscriber was dropped: draining it now reaches the daemon's end.
    dropped = 0
    for sock in stalled:
        lines = _read_all_lines(sock)
        dropped += 1
        assert len(lines) < 80, len(lines)
        sock.close()
    status = control.ask({"op": "status"})["status"]
    control.close()
    growth_mib = (rss_after - rss_before) / 1024
    record(
        "50 subscribers that never read, through many generations of a 120 KiB map",
        f"{count} generations",
        0,
        dropped=dropped,
        rss_before_mib=round(rss_before / 1024, 1),
        rss_growth_mib=round(growth_mib, 1),
        map_kib=size // 1024,
    )
    assert dropped == len(stalled)
    assert status["clients"] == 1
    # Unbounded queues would hold every generation: count * size (about 30 MB at 200).
    assert growth_mib < min(24, count * size / (1 << 20) / 2), growth_mib


def test_clients_that_vanish_mid_reply(
    start_daemon: Callable[..., Daemon],
    base: Path,
    host: Host,
    soak: int,
    record: Callable[..., None],
) -> None:
    _big_host(host, 400)
    daemon = start_daemon(max_clients=64)
    socket_path = str(base / "gdw.sock")
    probe = Client(socket_path)
    probe.ask({"op": "status"})
    fds_before = daemon.fd_count()
    count = 300 * soak
    for number in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(socket_path)
        sock.sendall(b'{"op":"get"}\n' * 8 + (b'{"op":"subscribe"}\n' if number % 3 == 0 else b""))
        if number % 2:
            sock.recv(1000)  # took part of a reply
        # Gone with replies unread: a reset for the daemon, mid-send.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    # Every one of them is gone from the daemon once a new client's requests come back.
    probe.ask({"op": "status"})
    status = probe.ask({"op": "status"})["status"]
    fds_after = daemon.fd_count()
    probe.close()
    assert daemon.alive()
    record(
        "clients that vanish mid-reply (120 KiB replies, RST with replies unread)",
        count,
        0,
        fds_before=fds_before,
        fds_after=fds_after,
    )
    assert status["clients"] == 1
    assert fds_after == fds_before
