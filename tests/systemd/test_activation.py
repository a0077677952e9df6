"""Socket activation: the socket exists before the daemon, outlives it, and loses no client.

`systemd-socket-activate` (the real binary from Debian's systemd package) binds the socket,
waits for the first connection, and only then execs the command in its own process (so
LISTEN_PID is the daemon's pid).
"""

from __future__ import annotations

import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from watcher import client

from .support import (
    SYSEXEC,
    TIMEOUT,
    Daemon,
    Host,
    NotifyListener,
    child_env,
    daemon_command,
    passes_fd,
    without_traceback,
)

SOCKET_ACTIVATE = Path("/usr/bin/systemd-socket-activate")


def _wait_for_socket(path: Path, daemon: Daemon) -> None:
    # systemd-socket-activate 252 says it listens only on stderr, so look for the path.
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and stat.S_ISSOCK(path.lstat().st_mode)):
        assert daemon.process.poll() is None, daemon.log()
        assert time.monotonic() < deadline, f"{path} never appeared; {daemon.log()}"
        time.sleep(0.01)


@pytest.mark.skipif(
    not SOCKET_ACTIVATE.exists(), reason=f"{SOCKET_ACTIVATE} (Debian package systemd) is missing"
)
def test_a_client_that_connects_before_the_daemon_starts_is_served(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    sock = tmp_path / "activated.sock"
    ignored = tmp_path / "ignored.sock"
    config = tmp_path / "config.toml"
    config.write_text("")
    # A pause between the connection and the daemon's exec, so the request provably waits
    # in the socket's backlog while no daemon exists (sh execs the daemon in its own pid).
    env = child_env(NOTIFY_SOCKET=listener.address, GPU_DEVICE_WATCHER_SOCKET=str(ignored))
    # It hands the child a fresh environment (PATH, HOME, ...): the rest goes by -E.
    passed = ("NOTIFY_SOCKET", "GPU_DEVICE_WATCHER_SOCKET", "PYTHONPATH")
    argv = [
        *(str(SOCKET_ACTIVATE), "-l", str(sock), "--fdname=gpu-device-watcher"),
        *(f"--setenv={key}={env[key]}" for key in passed),
        *("/bin/sh", "-c", 'sleep 0.5 && exec "$@"', "sh"),
        *(*daemon_command(), "serve", *host.view_args()),
        # The activated socket wins over --socket, the environment and the config.
        *("--config", str(config), "--socket", str(ignored)),
    ]
    with Daemon(argv, tmp_path / "stderr", env=env) as daemon:
        _wait_for_socket(sock, daemon)
        with client.Connection(str(sock), timeout=TIMEOUT) as early:
            early.send({"op": "status"})
            sent_at = listener.now()
            reply = early.receive()
        assert reply["ok"] is True
        assert reply["status"]["generation"] >= 1
        ready = listener.until_field("READY", "READY=1 from the daemon")
        assert ready.pid == daemon.pid
        # Sent before the daemon was ready (it was still sleeping in sh), served all the same.
        assert sent_at < ready.at
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        log = daemon.log()
    # Not the daemon's to remove: systemd owns it and hands it to the next start.
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert not ignored.exists()
    assert f"using the socket passed by systemd (gpu-device-watcher): {sock}" in log
    assert f"serving generation 1 on {sock}" in log
    without_traceback(log)


def test_a_restart_loses_no_connection(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    """The socket stays with the manager (here: the test) while the daemon restarts.

    A client that connects while no daemon runs waits in the backlog and is answered by the
    next daemon; the first one's exit must leave the shared listening socket usable.
    """
    path = tmp_path / "gdw.sock"
    config = tmp_path / "config.toml"
    config.write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as manager_socket:
        manager_socket.bind(str(path))
        manager_socket.listen()
        argv = [
            *(sys.executable, str(SYSEXEC), *passes_fd(manager_socket), "--"),
            *(*daemon_command(), "serve", *host.view_args(), "--config", str(config)),
        ]
        env = child_env(NOTIFY_SOCKET=listener.address)
        fds = (manager_socket.fileno(),)

        with Daemon(argv, tmp_path / "stderr-1", env=env, pass_fds=fds) as first:
            listener.until(lambda m: "READY" in m.fields and m.pid == first.pid, "first READY")
            assert client.request(str(path), {"op": "get"})["generation"] == 1
            first.signal(signal.SIGTERM)
            listener.until_field("STOPPING")
            assert first.wait() == 0
        assert stat.S_ISSOCK(path.lstat().st_mode)

        # Nobody serves now; the connection is queued all the same.
        with client.Connection(str(path), timeout=TIMEOUT) as waiting:
            waiting.send({"op": "get"})
            with Daemon(argv, tmp_path / "stderr-2", env=env, pass_fds=fds) as second:
                reply = waiting.receive()
                assert reply["map"]["driver"]["dev_root"] == "/dev"
                listener.until(
                    lambda m: "READY" in m.fields and m.pid == second.pid, "second READY"
                )
                assert second.stop() == 0
                without_traceback(second.log())
    assert stat.S_ISSOCK(path.lstat().st_mode)
