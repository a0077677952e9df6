"""What the unit's sandbox leaves the daemon, checked without systemd as PID 1.

- Mount propagation: the namespace systemd gives the service (ProtectSystem=, PrivateTmp=,
  PrivateMounts=, ...) is a slave of the host's, so a driver root mounted on the host after
  the service started reaches the daemon and fires its mount-table event.
- SystemCallFilter=: every system call the daemon makes through a whole life cycle (start,
  queries, a subscription, a reload, an event, shutdown) is one the unit's filter allows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from watcher import client

from .support import (
    HERE,
    TIMEOUT,
    UNITS,
    Daemon,
    Host,
    NotifyListener,
    child_env,
    daemon_command,
    mknod,
)

SERVICE = UNITS / "gpu-device-watcher.service"
# statmount (457) and listmount (458), by name or as strace writes calls it has no name for:
# the statmount judge tolerates their refusal (the unit's filter predates them).
REFUSAL_TOLERATED = frozenset({"statmount", "listmount", "syscall_0x1c9", "syscall_0x1ca"})


# --- mount propagation -------------------------------------------------------------------


@pytest.fixture
def namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: unshare --mount, tmpfs mounts, mknod")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool}(8) is not installed")


def _propagation(propagation: str, base: Path, wait: float) -> dict[str, Any]:
    spec = {"base": str(base), "propagation": propagation, "daemon": daemon_command(), "wait": wait}
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "--"),
            *(sys.executable, str(HERE / "mountns.py"), json.dumps(spec)),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.realfs
def test_mounts_made_on_the_host_propagate_into_the_service_namespace(
    namespaces: None, tmp_path: Path
) -> None:
    base = tmp_path / "ns"
    base.mkdir()
    report = _propagation("slave", base, wait=TIMEOUT)
    assert report["before"]["driver"]["dev_root"] is None, report["before"]
    after = report["after"]
    assert after is not None, report["log"]
    assert after["driver"]["dev_root"] == "/run/nvidia/driver/dev"
    control = next(d for d in after["devices"] if d["name"] == "nvidiactl")
    assert control["valid"] is True, control
    assert control["mount"]["mount_point"] == "/run/nvidia/driver"
    assert control["mount"]["fstype"] == "tmpfs"
    # The daemon's copies of the mount are slaves ("master:N") of the host's. Two copies:
    # one under its slave of the work tmpfs, one under the read-only bind over /run on top
    # of it (the one it sees), as under ProtectSystem=strict.
    lines = report["daemon_mounts"]
    assert lines, report
    assert all(re.search(r" master:\d+", line) for line in lines), lines
    # Woken by the mount table, not by luck: an inotify watch is blind to a mount over it.
    # The mount table's wake-up, in the words of the judge in use (every wake-up, or the
    # statmount judge naming the mount that appeared).
    assert re.search(r"event: (mount table changed|mount on \S+ appeared)", report["log"]), report[
        "log"
    ]
    assert report["returncode"] == 0, report["log"]


@pytest.mark.realfs
def test_control_nothing_propagates_into_a_private_namespace(
    namespaces: None, tmp_path: Path
) -> None:
    """Why MountFlags=private must never be set: the daemon would not see the driver arrive."""
    base = tmp_path / "ns"
    base.mkdir()
    report = _propagation("private", base, wait=1.5)
    assert report["after"] is None, report["after"]
    assert report["daemon_mounts"] == []
    assert report["returncode"] == 0, report["log"]


# --- the system call filter ----------------------------------------------------------------


@cache
def _syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (syscalls and @groups)."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif not line.startswith(" "):
            members = None  # a blank line or a trailing note ends the group
        elif members is not None and not line.strip().startswith("#"):
            members.append(line.strip())
    return groups


def _expand(name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(_expand(member) for member in _syscall_groups()[name]))


def _unit_filter(unit: Path) -> tuple[set[str], set[str]]:
    """The allowed and denied system calls of a unit's SystemCallFilter= lines."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in unit.read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        target = denied if value.startswith("~") else allowed
        for name in value.lstrip("~").split():
            target |= _expand(name)
    # systemd always allows @default in an allow list.
    return (allowed | _expand("@default")) - denied, denied


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_every_system_call_is_allowed_by_the_units_filter(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    allowed, denied = _unit_filter(SERVICE)
    assert "fanotify_init" in denied, "sanity: ~@privileged is in the unit"
    trace = tmp_path / "strace"
    config = tmp_path / "config.toml"
    config.write_text("")
    sock = str(tmp_path / "gdw.sock")
    argv = [
        *("strace", "--follow-forks", "--quiet=all", "--output", str(trace), "--"),
        *daemon_command(),
        *("serve", *host.view_args(), "--config", str(config), "--socket", sock),
    ]
    env = child_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="200000")
    with Daemon(argv, tmp_path / "stderr", env=env) as traced:
        ready = listener.until_field("READY", timeout=30)
        pid = ready.pid  # the daemon, strace's child
        with client.Connection(sock, timeout=TIMEOUT) as subscriber:
            subscriber.send({"op": "subscribe"})
            subscriber.receive()
            for op in ("get", "status", "rescan"):
                client.request(sock, {"op": op})
            mknod(host.root / "dev/nvidia1", 195, 1)
            subscriber.receive()
            config.write_text('log_level = "debug"\n')
            os.kill(pid, signal.SIGHUP)
            listener.until_field("RELOADING")
            listener.until_field("READY")
            listener.until_field("WATCHDOG")
        os.kill(pid, signal.SIGTERM)
        listener.until_field("STOPPING")
        assert traced.wait(30) == 0, traced.log()
    used = set()
    families = set()
    for line in trace.read_text().splitlines():
        if match := re.match(r"\d+\s+([a-z0-9_]+)\(", line):
            used.add(match.group(1))
        if match := re.match(r"\d+\s+socket\((AF_[A-Z0-9]+)", line):
            families.add(match.group(1))
    assert {"inotify_add_watch", "epoll_wait", "accept4", "sendto"} <= used, sorted(used)
    # The uevent socket (netlink) and the filter it carries; the unit's
    # RestrictAddressFamilies= names every family the daemon opens.
    assert {"bind", "setsockopt"} <= used, sorted(used)
    assert families == {"AF_UNIX", "AF_NETLINK"}, families
    assert "uevents are unavailable" not in traced.log(), traced.log()
    # The statmount judge's calls may be refused (EPERM): the daemon falls back to
    # rescanning at every mount-table wake-up (tests/daemon/test_statmount_judge.py).
    used -= REFUSAL_TOLERATED
    assert not used - allowed, f"blocked by SystemCallFilter=: {sorted(used - allowed)}"
