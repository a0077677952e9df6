"""The unit's sandbox with node labels and metrics configured (docs/monitoring.md).

The drop-in documented there adds `AF_INET AF_INET6` to RestrictAddressFamilies= (and a
writable features.d); the system-call filter stays the unit's. A whole life cycle with both
outputs on (start, scrapes, a bad request, a reload that moves both, shutdown) is traced:
every system call must be one the unit's filter allows, and every socket one of the
families the drop-in allows.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest

from watcher import client

from .support import (
    TIMEOUT,
    Daemon,
    Host,
    NotifyListener,
    child_env,
    daemon_command,
)
from .test_sandbox import REFUSAL_TOLERATED, SERVICE, _unit_filter

# RestrictAddressFamilies= of the unit plus the drop-in.
FAMILIES = {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int, path: str = "/metrics") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_labels_and_metrics_need_no_system_call_beyond_the_units_filter(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    allowed, _ = _unit_filter(SERVICE)
    trace = tmp_path / "strace"
    features = tmp_path / "features.d"
    features.mkdir()
    port, moved_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'nfd_features_file = "{features}/gdw"\nmetrics_listen = "127.0.0.1:{port}"\n'
    )
    sock = str(tmp_path / "gdw.sock")
    argv = [
        *("strace", "--follow-forks", "--quiet=all", "--output", str(trace), "--"),
        *daemon_command(),
        *("serve", *host.view_args(), "--config", str(config), "--socket", sock),
    ]
    env = child_env(NOTIFY_SOCKET=listener.address)
    with Daemon(argv, tmp_path / "stderr", env=env) as traced:
        pid = listener.until_field("READY", timeout=30).pid
        assert (
            (features / "gdw")
            .read_text()
            .startswith("gpu-device-watcher.feature.node.kubernetes.io/checkpoint-ready=")
        )
        for _ in range(3):
            assert scrape(port) == 200
        assert scrape(port, "/nowhere") == 404
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as bad:
            bad.sendall(b"nonsense\r\n\r\n")
            assert bad.recv(100).startswith(b"HTTP/1.1 400 ")
        client.request(sock, {"op": "rescan"})
        config.write_text(
            f'nfd_features_file = "{features}/moved"\nmetrics_listen = "[::1]:{moved_port}"\n'
            if socket.has_ipv6
            else f'nfd_features_file = "{features}/moved"\n'
        )
        os.kill(pid, signal.SIGHUP)
        listener.until_field("RELOADING")
        listener.until_field("READY")
        os.kill(pid, signal.SIGTERM)
        listener.until_field("STOPPING")
        assert traced.wait(30) == 0, traced.log()
    assert os.listdir(features) == []
    used: set[str] = set()
    families: set[str] = set()
    for line in trace.read_text().splitlines():
        if match := re.match(r"\d+\s+([a-z0-9_]+)\(", line):
            used.add(match.group(1))
        if match := re.match(r"\d+\s+socket\((AF_[A-Z0-9]+)", line):
            families.add(match.group(1))
    # renameat: the feature file is replaced relative to its directory fd (watcher.atomicfile).
    assert {"bind", "listen", "accept4", "renameat", "fsync", "unlink"} <= used, sorted(used)
    # The statmount judge's calls may be refused (EPERM): the daemon falls back to
    # rescanning at every mount-table wake-up (tests/daemon/test_statmount_judge.py).
    used -= REFUSAL_TOLERATED
    assert not used - allowed, f"blocked by SystemCallFilter=: {sorted(used - allowed)}"
    assert "AF_INET" in families
    assert families <= FAMILIES, f"beyond the drop-in's RestrictAddressFamilies=: {families}"
