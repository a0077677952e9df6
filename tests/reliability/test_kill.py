"""SIGKILL and start again: the stale socket is replaced, clients reconnect, ready within 1 s.

Readiness is measured from the `Popen` of the new daemon to its sd_notify `READY=1` and to
the first `get` answered on a fresh connection (the socket path is in place before READY=1).
"""

from __future__ import annotations

import os
import random
import signal
import stat
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    Client,
    Daemon,
    Host,
    content,
    jitter,
    mknod,
    reference_map,
    write_config,
)

pytestmark = pytest.mark.reliability

KILLS = 20
READY_WITHIN_S = 1.0


def _clients_of_the_old_daemon(socket_path: Path) -> tuple[Client, Client, Client]:
    """Clients of the old daemon: one idle, one subscribed, one with a request in flight."""
    idle = Client(socket_path)
    assert idle.ask({"op": "get"})["ok"]
    subscriber = Client(socket_path)
    subscriber.send_raw(b'{"op":"subscribe"}\n')
    assert subscriber.line()
    busy = Client(socket_path)
    busy.send_raw(b'{"op":"rescan"}\n{"op":"get"}\n' * 5)
    return idle, subscriber, busy


def _nobody_answers_and_old_clients_learn_it(
    socket_path: Path, old_clients: tuple[Client, Client, Client]
) -> None:
    """The socket file is left behind, and nobody answers on it; old clients learn it at
    once: end of stream or a reset, never a hang."""
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)
    with pytest.raises(ConnectionRefusedError):
        Client(socket_path).close()
    for old in old_clients:
        _read_to_the_end(old)
        old.close()


def test_sigkill_and_restart(
    base: Path, host: Host, soak: int, seed: int, record: Callable[..., None]
) -> None:
    rng = random.Random(seed)
    config = write_config(base / "gdw.toml")
    socket_path = base / "gdw.sock"
    args = host.options(socket_path, config, "/proc/self/mountinfo")
    log = base / "gdw.log"
    dev = host.fs("/run/nvidia/driver/dev")
    daemon = Daemon(args, log)
    ready_s: list[float] = []
    served_s: list[float] = []
    lost = 0
    kills = KILLS * soak
    try:
        for number in range(kills):
            old_inode = socket_path.stat().st_ino
            old_clients = _clients_of_the_old_daemon(socket_path)
            # A change in flight when the kill lands, half of the time.
            if number % 2:
                mknod(dev / f"nvidia{number % 7 + 1}", 195, number % 7 + 1)
            jitter(rng, 0.02)
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.process.wait(10)
            daemon.notifications.close()

            _nobody_answers_and_old_clients_learn_it(socket_path, old_clients)

            daemon = Daemon(args, log)
            ready_s.append(daemon.ready_at - daemon.started)
            with Client(socket_path) as fresh:
                reply = fresh.ask({"op": "get"})
            served_s.append(time.monotonic() - daemon.started)
            assert reply["ok"], reply
            assert socket_path.stat().st_ino != old_inode
            if content(reply["map"]) != reference_map(host, "/proc/self/mountinfo", config):
                lost += 1
            if number % 2:
                (dev / f"nvidia{number % 7 + 1}").unlink()
        # Nothing left over from the temporary names the socket is bound under.
        assert sorted(p.name for p in base.iterdir() if p.name.startswith(".")) == []
    finally:
        daemon.stop()
    assert "Traceback" not in log.read_text(errors="replace"), daemon.log_tail()
    record(
        "daemon SIGKILLed (clients connected, rescan in flight) and started again",
        f"{kills} kills",
        lost,
        ready_p50_s=round(statistics.median(ready_s), 3),
        ready_max_s=round(max(ready_s), 3),
        first_get_max_s=round(max(served_s), 3),
    )
    assert lost == 0
    assert statistics.median(served_s) < READY_WITHIN_S, served_s
    assert max(served_s) < READY_WITHIN_S * 2, served_s


def _read_to_the_end(client: Client) -> None:
    """Read what is left until the peer's end: b"" or a reset. A timeout fails the test."""
    try:
        while client.line():
            pass
    except ConnectionResetError:
        pass


def test_a_live_daemon_is_never_replaced(start_daemon: Callable[..., Daemon], base: Path) -> None:
    """The other side of replacing a stale socket: a second daemon refuses a live one."""
    first = start_daemon()
    with pytest.raises(Exception, match="daemon not ready"):
        start_daemon()
    with Client(base / "gdw.sock") as client:
        assert client.ask({"op": "status"})["ok"]
    assert first.alive()
    assert "another gpu-device-watcher is serving" in (base / "gdw.log").read_text()
