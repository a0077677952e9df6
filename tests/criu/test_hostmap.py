"""`watcher.criu.hostmap.MapRequest`: the map asked for at once, read when needed.

A small Unix-socket server stands in for the daemon, one scripted answer per test: the request
must reach it before `result()` is called (the stage works while the daemon answers), and
every answer that is not a map makes the action scan directly, saying why in one line.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.criu import hostmap

WAIT_S = 10.0
SCANNED = (0, {"scanned": "directly"})


class FakeDaemon:
    """Accepts one connection, records the request line, then does what `answer` says."""

    def __init__(self, path: Path, answer: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.request = b""
        self.got_request = threading.Event()
        self._answer = answer
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(WAIT_S)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            connection.settimeout(WAIT_S)
            while not self.request.endswith(b"\n"):
                chunk = connection.recv(4096)
                if not chunk:
                    break
                self.request += chunk
            self.got_request.set()
            self._answer(connection)

    def close(self) -> None:
        self._thread.join(WAIT_S)
        self._listener.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], FakeDaemon]]:
    started: list[FakeDaemon] = []

    def start(answer: Callable[[socket.socket], None]) -> FakeDaemon:
        started.append(FakeDaemon(tmp_path / "daemon.sock", answer))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The direct scans asked for (none is run: this machine's own devices are not the point)."""
    asked: list[object] = []

    def direct_scan(environ: Any) -> tuple[int, dict[str, str]]:
        asked.append(environ)
        return SCANNED

    monkeypatch.setattr(hostmap, "direct_scan", direct_scan)
    return asked


def replying(line: bytes) -> Callable[[socket.socket], None]:
    return lambda connection: connection.sendall(line)


def test_the_request_is_sent_before_the_reply_is_wanted(
    daemon: Callable[..., FakeDaemon], scans: list[object]
) -> None:
    fake = daemon(replying(b'{"ok":true,"generation":7,"map":{"devices":[]}}\n'))
    asked = hostmap.MapRequest({"GPU_DEVICE_WATCHER_SOCKET": str(fake.path)})
    assert fake.got_request.wait(WAIT_S), "nothing reached the daemon before result()"
    assert fake.request == b'{"op":"get"}\n'
    assert asked.result() == (7, {"devices": []})
    assert scans == []


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (replying(b'{"ok":true,"generation":"7","map":{}}\n'), "sent a reply that is not a map"),
        (replying(b'{"ok":true,"generation":7}\n'), "sent a reply that is not a map"),
        (replying(b"not json\n"), "sent a reply that is not a map"),
        (
            replying(b'{"ok":false,"error":{"code":"busy","message":"64 clients already"}}\n'),
            "64 clients already",
        ),
        (lambda connection: None, "the daemon closed the connection"),
    ],
    ids=["generation-text", "no-map", "not-json", "busy", "closed"],
)
def test_anything_but_a_map_makes_the_action_scan_directly(
    daemon: Callable[..., FakeDaemon],
    scans: list[object],
    capsys: pytest.CaptureFixture[str],
    answer: Callable[[socket.socket], None],
    why: str,
) -> None:
    fake = daemon(answer)
    environ = {"GPU_DEVICE_WATCHER_SOCKET": str(fake.path)}
    assert hostmap.MapRequest(environ).result() == SCANNED
    assert scans == [environ]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("gpu-device-watcher: ") and why in line, line
    assert "scanning" in line


def test_no_daemon_at_all_scans_directly_at_result(
    tmp_path: Path, scans: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    asked = hostmap.MapRequest({"GPU_DEVICE_WATCHER_SOCKET": str(tmp_path / "nobody.sock")})
    assert scans == []  # nothing is scanned until the map is wanted
    assert asked.result() == SCANNED
    [line] = capsys.readouterr().err.splitlines()
    assert "cannot reach the daemon at" in line
    assert line.endswith("scanning this host directly instead")


def test_a_request_closed_unread_leaves_the_daemon_an_ended_connection(
    daemon: Callable[..., FakeDaemon], scans: list[object]
) -> None:
    """pre-dump stops before it needs the map (the root exited): the connection is closed,
    and the daemon's write meets a closed peer, which it survives (its own tests)."""
    seen: list[bytes] = []

    def wait_for_close(connection: socket.socket) -> None:
        seen.append(connection.recv(1))

    fake = daemon(wait_for_close)
    asked = hostmap.MapRequest({"GPU_DEVICE_WATCHER_SOCKET": str(fake.path)})
    asked.close()
    fake.close()
    assert seen == [b""]
    assert scans == []
