"""A reload as an operator does it: edit the config, `systemctl reload` (SIGHUP), and check
that the running daemon acts on it. The case the second review reproduced: `allowed_uids`
added and the log saying "config reloaded" while uid 65534 was still served.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from .harness import NOBODY, Client, Daemon, write_config
from .test_security import as_user


def _reload(daemon: Daemon) -> None:
    os.kill(daemon.pid, signal.SIGHUP)
    daemon.notifications.wait_for("READY", daemon.pid)  # READY=1 ends every reload


def test_a_reload_reaches_access_lists_and_limits(
    start_daemon: Callable[..., Daemon], base: Path, record: Callable[..., None]
) -> None:
    daemon = start_daemon(socket_mode="0666")
    socket_path = base / "gdw.sock"
    config = base / "gdw.toml"
    served = as_user(socket_path, NOBODY, NOBODY)
    assert served["lines"][0]["ok"], served

    write_config(config, socket_mode="0666", allowed_uids=[0])
    _reload(daemon)
    refused = as_user(socket_path, NOBODY, NOBODY)
    assert refused["lines"][0]["error"]["code"] == "forbidden", refused

    write_config(config, socket_mode="0666", max_clients=1, socket_group="root")
    _reload(daemon)
    with Client(socket_path) as held:
        assert held.ask({"op": "status"})["ok"]
        with Client(socket_path) as extra:
            assert extra.ask({"op": "get"})["error"]["code"] == "busy"
    log = daemon.log.read_text()
    assert "socket_group changes only on restart" in log, log
    record("reload (SIGHUP) of allowed_uids, max_clients; socket_group kept", 3, 0)
