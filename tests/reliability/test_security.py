"""Security: who may talk to the socket, what a request can make the daemon touch, symlinks,
the config file's safety check, and running as an unprivileged user.

Clients of another user are children that start as root (so the interpreter under /root
loads) and drop to the target uid before they connect: SO_PEERCRED then sees the real thing.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from watcher.config import ConfigError, check_file_safety, load_config_file
from watcher.contract import config_file_problem
from watcher.core.snapshot import HostView
from watcher.probe import scan

from .harness import (
    NOBODY,
    REPO,
    Client,
    Daemon,
    Host,
    content,
    daemon_env,
    mknod,
    reference_map,
    write_config,
)

pytestmark = pytest.mark.reliability
NOGROUP = next((g.gr_name for g in grp.getgrall() if g.gr_gid == NOBODY), None)

_CLIENT = r"""
import json, os, socket, sys
uid, gid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4]
groups = [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.settimeout(10)
try:
    client.connect(path)
except OSError as error:
    print(json.dumps({"connect": error.errno}))
    sys.exit()
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
    pass
print(json.dumps({"connect": 0, "lines": [json.loads(l) for l in data.splitlines()]}))
"""


def as_user(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            _CLIENT,
            str(uid),
            str(gid),
            ",".join(map(str, groups)),
            str(path),
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- who may connect ---------------------------------------------------------------------


def test_socket_file_mode_and_group(
    start_daemon: Callable[..., Daemon], base: Path, record: Callable[..., None]
) -> None:
    start_daemon(name="tight", socket_mode="0600")
    start_daemon(name="default")
    group = NOGROUP or str(NOBODY)
    start_daemon(name="group", socket_mode="0660", socket_group=group)
    start_daemon(name="open", socket_mode="0666")
    modes = {name: (base / f"{name}.sock").stat() for name in ("tight", "default", "group", "open")}
    assert {n: stat.S_IMODE(s.st_mode) for n, s in modes.items()} == {
        "tight": 0o600,
        "default": 0o660,
        "group": 0o660,
        "open": 0o666,
    }
    assert modes["group"].st_gid == NOBODY
    assert modes["default"].st_uid == 0
    # The file mode is enforced by the kernel at connect(): nobody is out unless let in.
    assert as_user(base / "tight.sock", NOBODY, NOBODY)["connect"] == errno.EACCES
    assert as_user(base / "default.sock", NOBODY, NOBODY)["connect"] == errno.EACCES
    in_group = as_user(base / "group.sock", 4242, 4242, groups=(NOBODY,))
    assert in_group["connect"] == 0 and in_group["lines"][0]["ok"], in_group
    anyone = as_user(base / "open.sock", NOBODY, NOBODY)
    assert anyone["connect"] == 0 and anyone["lines"][0]["ok"], anyone
    record(
        "socket file permissions (0600, 0660, 0660 + group, 0666), connects as other users", 4, 0
    )


def test_peer_credentials_allow_lists(
    start_daemon: Callable[..., Daemon], base: Path, record: Callable[..., None]
) -> None:
    start_daemon(socket_mode="0666", allowed_uids=[4242], allowed_gids=[4343])
    path = base / "gdw.sock"
    refused = {
        "nobody": as_user(path, NOBODY, NOBODY),
        "other supplementary group": as_user(path, NOBODY, NOBODY, groups=(4444,)),
    }
    admitted = {
        "allowed uid": as_user(path, 4242, NOBODY),
        "allowed primary gid": as_user(path, NOBODY, 4343),
        "allowed supplementary gid": as_user(path, NOBODY, NOBODY, groups=(4343,)),
        "root": as_user(path, 0, 0),
    }
    for who, result in refused.items():
        # One error line, then the end: the request is never read, nothing else is sent.
        assert result["connect"] == 0, who
        assert [line["error"]["code"] for line in result["lines"]] == ["forbidden"], (who, result)
    for who, result in admitted.items():
        assert result["lines"][0]["ok"], (who, result)
    record("SO_PEERCRED allow-lists (allowed_uids / allowed_gids)", 6, 0)


# --- a request never chooses a path ------------------------------------------------------

HOSTILE_NAMES = [
    "../../etc/passwd",
    "/etc/passwd",
    "nvidiactl/../../../../etc/passwd",
    "../../../../../../etc/shadow",
    "nvidia-caps/../../../../etc/shadow",
    "\x00/etc/passwd",
    "%2e%2e/%2e%2e/etc/passwd",
    "/proc/self/environ",
    "~root/.ssh/id_rsa",
]


@pytest.fixture
def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        pytest.skip("strace(1) not found")
    return found


def test_no_request_makes_the_daemon_touch_a_path(
    start_daemon: Callable[..., Daemon],
    base: Path,
    host: Host,
    strace: str,
    record: Callable[..., None],
) -> None:
    """Hostile names get `not-found` from the map alone; strace sees no file access for them."""
    daemon = start_daemon()
    trace = base / "strace.out"
    tracer = subprocess.Popen(
        [strace, "-f", "-s", "512", "-e", "trace=%file", "-o", str(trace), "-p", str(daemon.pid)],
        stderr=subprocess.PIPE,
    )
    try:
        assert tracer.stderr is not None
        ready, _, _ = select.select([tracer.stderr], [], [], 10)
        assert ready and b"attached" in tracer.stderr.readline()
        with Client(base / "gdw.sock") as client:
            replies = [client.ask({"op": "path", "name": name}) for name in HOSTILE_NAMES]
            replies += [
                client.ask({"op": "path", "name": name, "x": "../../etc/passwd"})
                for name in ("nvidiactl",)
            ]
            # Positive control: a rescan does open files, and the trace must show it.
            assert client.ask({"op": "rescan"})["ok"]
            assert client.ask({"op": "status"})["ok"]
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and exits
        tracer.wait(10)
        assert tracer.stderr is not None
        tracer.stderr.close()
    for name, reply in zip(HOSTILE_NAMES, replies, strict=False):
        assert reply["error"]["code"] == "not-found", (name, reply)
    assert replies[-1] == {
        "ok": True,
        "generation": replies[-1]["generation"],
        "path": "/run/nvidia/driver/dev/nvidiactl",
    }
    text = trace.read_text(errors="replace")
    assert f'"{host.proc}/devices"' in text, "the trace saw no file access at all"
    for needle in ("passwd", "shadow", "environ", "id_rsa", "%2e"):
        assert needle not in text, [line for line in text.splitlines() if needle in line]
    assert daemon.alive()
    record(
        "hostile `path` names (traversal, absolute, NUL, encoded) under strace",
        len(HOSTILE_NAMES),
        0,
        file_syscalls_for_them=0,
    )


# --- symlinks ------------------------------------------------------------------------------


def _a_host_and_a_decoy(base: Path) -> tuple[HostView, Path, Path]:
    """A host whose dev root holds nvidia-modeset, and a decoy directory with a valid-looking
    (0644) nvidiactl; returns the host's view, its dev root and the decoy directory."""
    root = base / "root"
    dev = root / "run/nvidia/driver/dev"
    decoy = base / "decoy"
    mknod(decoy / "nvidiactl", 195, 255, 0o644)  # what a followed link would find
    # Other nodes keep the dev root chosen while nvidiactl is a symlink (which is reported).
    mknod(dev / "nvidia-modeset", 195, 254)
    (root / "dev").mkdir()
    proc = base / "proc"
    (proc / "driver/nvidia").mkdir(parents=True)
    (proc / "devices").write_text("Character devices:\n195 nvidia\n")
    mountinfo = base / "mountinfo"
    mountinfo.write_text("1 0 0:1 / / rw - tmpfs tmpfs rw\n")
    view = HostView(root=str(root), proc=str(proc), mountinfo=str(mountinfo))
    return view, dev, decoy


def test_a_node_swapped_for_a_symlink_is_never_valid(
    base: Path, soak: int, record: Callable[..., None]
) -> None:
    """A thread flips nvidiactl between a char node (0600) and a symlink to a valid-looking
    node (0644) elsewhere, and the dev root between a directory and a symlink to a directory
    of valid nodes. A scan that followed either link would report a valid 0644 nvidiactl."""
    view, dev, decoy = _a_host_and_a_decoy(base)
    stop = threading.Event()
    flips = 0

    def flipper() -> None:
        nonlocal flips
        parent = dev.parent
        while not stop.is_set():
            node_tmp, link_tmp = dev / ".node", dev / ".link"
            mknod(node_tmp, 195, 255, 0o600)
            os.rename(node_tmp, dev / "nvidiactl")
            os.symlink(decoy / "nvidiactl", link_tmp)
            os.rename(link_tmp, dev / "nvidiactl")
            if flips % 8 == 7:
                # The dev root itself: a symlink to the decoy directory, then back.
                os.rename(dev, parent / "dev.real")
                os.symlink(decoy, dev)
                os.unlink(dev)
                os.rename(parent / "dev.real", dev)
            flips += 1

    outcomes = {"valid node": 0, "symlink reported": 0, "dev root refused": 0, "followed": 0}
    thread = threading.Thread(target=flipper)
    thread.start()
    scans = 3000 * soak
    try:
        for _ in range(scans):
            device_map = scan(view)
            control = device_map.device("nvidiactl")
            if control is not None and control.valid:
                if control.mode == "0600":
                    outcomes["valid node"] += 1
                else:
                    outcomes["followed"] += 1
            elif device_map.driver.dev_root is None:
                outcomes["dev root refused"] += 1
            elif any("a symlink to" in p.message for p in device_map.problems):
                outcomes["symlink reported"] += 1
            assert control is None or control.mode == "0600", control
    finally:
        stop.set()
        thread.join(10)
    record(
        "nvidiactl and its dev root flipped to symlinks while scanning",
        f"{scans} scans, {flips} flips",
        outcomes["followed"],
        **{key.replace(" ", "_"): value for key, value in outcomes.items() if key != "followed"},
    )
    assert outcomes["followed"] == 0
    # The race was really run: both shapes were seen.
    assert outcomes["valid node"] > 0
    assert outcomes["symlink reported"] > 0


# --- the config file -----------------------------------------------------------------------


_WRITABLE = "is writable by others .mode 0[0-7]+.: only its owner and root may write it"
_FOREIGN = "is owned by another user .uid 65534.: only root or uid 0 may own it"


@pytest.mark.parametrize(
    ("mode", "owner", "group", "refusal"),
    [
        (0o644, 0, 0, None),
        (0o600, 0, 0, None),
        (0o664, 0, 0, None),  # group root may write: root anyway
        (0o646, 0, 0, _WRITABLE),
        (0o666, 0, 0, _WRITABLE),
        (0o664, 0, NOBODY, _WRITABLE),
        # Another user's file, even one only it can write: that user could loosen the
        # daemon's access lists or the CRIU action's version check (run as root).
        (0o644, NOBODY, NOBODY, _FOREIGN),
        (0o620, NOBODY, NOBODY, _FOREIGN),
    ],
)
def test_config_file_safety(
    base: Path, mode: int, owner: int, group: int, refusal: str | None
) -> None:
    config = write_config(base / "config.toml", log_level="debug")
    os.chown(config, owner, group)
    config.chmod(mode)
    if refusal is not None:
        with pytest.raises(ConfigError, match=refusal):
            load_config_file(str(config), required=True)
        with pytest.raises(ConfigError, match=refusal):
            check_file_safety(str(config))
    else:
        assert load_config_file(str(config), required=True).log_level == "debug"


def test_a_config_owned_by_the_daemons_own_user_is_trusted(base: Path) -> None:
    """The daemon run as an unprivileged user may read the config that user owns."""
    config = write_config(base / "config.toml", log_level="debug")
    os.chown(config, NOBODY, NOBODY)
    config.chmod(0o600)
    assert config_file_problem(str(config), os.stat(config), own_uid=NOBODY) is None
    assert config_file_problem(str(config), os.stat(config), own_uid=0) is not None


def test_an_unsafe_config_is_refused_at_start_and_on_reload(
    base: Path, host: Host, record: Callable[..., None]
) -> None:
    config = write_config(base / "config.toml", log_level="info")
    config.chmod(0o666)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "scan",
            *host.view_options(config, "/proc/self/mountinfo"),
        ],
        capture_output=True,
        env=daemon_env(None),
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.decode().startswith("gpu-device-watcher: config ")
    assert b"writable by others" in done.stderr
    assert done.stderr.count(b"\n") == 1

    config.chmod(0o644)
    socket_path = base / "gdw.sock"
    daemon = Daemon(host.options(socket_path, config, "/proc/self/mountinfo"), base / "gdw.log")
    try:
        # Someone loosens the mode and asks for debug logging: the reload is refused.
        write_config(config, log_level="debug")
        config.chmod(0o666)
        os.kill(daemon.pid, signal.SIGHUP)
        daemon.notifications.wait_for("READY", daemon.pid)  # READY=1 ends every reload
        with Client(socket_path) as client:
            assert client.ask({"op": "get"})["ok"]
    finally:
        assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "reload refused" in log and "writable by others" in log, log
    assert " DEBUG " not in log
    record("unsafe config file (mode o+w / foreign group w): refused at start and on SIGHUP", 2, 0)


# --- as an unprivileged user ---------------------------------------------------------------


def _python_for(uid: int) -> list[str] | None:
    """An interpreter of our Python version that `uid` can run, importing `watcher` and its
    dependencies from this checkout and this venv (both world-readable here)."""
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    code = (
        "import sys; sys.path[:0] = [" + repr(str(REPO)) + ", " + repr(site) + "]; "
        "from watcher.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if candidate is None or not os.path.exists(candidate):
            continue
        command = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--",
            candidate,
            "-I",
            "-c",
            code,
        ]
        probe = subprocess.run(
            [*command, "--version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return command
    return None


def test_the_daemon_runs_as_nobody(base: Path, host: Host, record: Callable[..., None]) -> None:
    """Read access to the host view and a socket directory it may write: nothing more."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) not found")
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no interpreter nobody can run (the venv's lives under /root)")
    run_dir = base / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    config = write_config(base / "config.toml")
    socket_path = run_dir / "gdw.sock"
    daemon = Daemon(
        host.options(socket_path, config, "/proc/self/mountinfo"),
        base / "gdw.log",
        python=python,
    )
    dev = host.fs("/run/nvidia/driver/dev")
    try:
        uid_line = next(
            line
            for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert uid_line.split()[1:] == [str(NOBODY)] * 4
        info = socket_path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY, 0o660)
        with Client(socket_path) as client:
            first = client.ask({"op": "get"})
            assert content(first["map"]) == reference_map(host, "/proc/self/mountinfo", config)
            assert all(device["valid"] for device in first["map"]["devices"])
            # Events work unprivileged: a node appears.
            mknod(dev / "nvidia1", 195, 1)
            second = client.ask({"op": "wait", "after": first["generation"], "timeout": 5})
            assert "nvidia1" in {device["name"] for device in second["map"]["devices"]}
            # What it cannot read, it says so: a dev root it may not search.
            dev.chmod(0o700)
            third = client.ask({"op": "wait", "after": second["generation"], "timeout": 5})
            messages = [p["message"] for p in third["map"]["problems"]]
            assert any("cannot be read (EACCES" in message for message in messages), messages
    finally:
        dev.chmod(0o755)
        assert daemon.stop() == 0, daemon.log_tail()
    assert not socket_path.exists()  # it removed its own socket
    assert "Traceback" not in daemon.log.read_text()
    record("daemon as nobody (read-only host view, own socket directory)", 3, 0)
