"""Starting and stopping: signals, the socket file, a second daemon, a stale socket."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from watcher import client

from .harness import DEV_ROOT, TIMEOUT, Daemon

pytestmark = pytest.mark.realfs


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_exits_0_and_removes_the_socket(
    start_daemon: Callable[..., Daemon], socket_path: Path, number: int
) -> None:
    daemon = start_daemon()
    daemon.wait_log(
        rf"serving generation 1 on {socket_path}: driver 580\.95\.05, 4 devices in {DEV_ROOT}"
    )
    with daemon.subscribe() as subscription:
        assert stat.S_ISSOCK(socket_path.lstat().st_mode)
        assert daemon.stop(number) == 0
        # A subscriber is let go, not left hanging.
        with pytest.raises(client.Unreachable, match="closed the connection"):
            subscription.connection.receive()
    assert not socket_path.exists()
    daemon.wait_log(rf"{signal.Signals(number).name}: shutting down")
    assert "STOPPING=1" in daemon.notifications


def test_a_second_daemon_on_a_live_socket_refuses(
    start_daemon: Callable[..., Daemon], socket_path: Path
) -> None:
    first = start_daemon()
    inode = socket_path.lstat().st_ino
    second = start_daemon(ready=False)
    assert second.wait_exit() != 0
    message = second.wait_log(r"another gpu-device-watcher is serving")
    assert str(socket_path) in message
    assert "Traceback" not in second.log_text
    # The first one is untouched and still serving.
    assert socket_path.lstat().st_ino == inode
    assert first.get()["map"]["driver"]["dev_root"] == DEV_ROOT


def test_a_stale_socket_from_a_killed_daemon_is_replaced(
    start_daemon: Callable[..., Daemon], socket_path: Path
) -> None:
    killed = start_daemon()
    killed.send_signal(signal.SIGKILL)
    assert killed.wait_exit() == -signal.SIGKILL
    # SIGKILL leaves the socket file behind, with nobody listening.
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)
    with pytest.raises(client.Unreachable, match="refused"):
        client.request(str(socket_path), {"op": "get"}, timeout=TIMEOUT)

    successor = start_daemon()
    assert successor.get()["map"]["driver"]["dev_root"] == DEV_ROOT
    assert successor.stop() == 0
    assert not socket_path.exists()


def test_a_socket_path_that_is_not_a_socket_is_left_alone(
    start_daemon: Callable[..., Daemon], socket_path: Path
) -> None:
    socket_path.write_text("precious\n")
    daemon = start_daemon(ready=False)
    assert daemon.wait_exit() != 0
    daemon.wait_log(r"exists and is not a socket; refusing to replace it")
    assert socket_path.read_text() == "precious\n"


def test_the_socket_file_mode_is_0660_by_default(daemon: Daemon, socket_path: Path) -> None:
    assert stat.S_IMODE(socket_path.lstat().st_mode) == 0o660
    assert os.access(socket_path, os.R_OK | os.W_OK)


def test_serve_with_a_missing_root_is_a_usage_error(base: Path, socket_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "watcher", "serve"),
            *("--root", str(base / "nowhere"), "--socket", str(socket_path)),
            *("--config", str(base / "config.toml")),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gpu-device-watcher: --root ")
    assert not socket_path.exists()
