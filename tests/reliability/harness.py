"""Drive a real `gpu-device-watcher serve` process on a real host tree.

Everything here is plain stdlib (plus `watcher` for the reference scan) so the same code runs
in the pytest process and in a scenario child inside a private mount namespace
(`scenarios.py`). Every wait is bounded; readiness comes from the daemon's own sd_notify
`READY=1`, quiescence from the protocol's `wait` op, never from sleeping and looking again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from tests.support import host
from tests.support.daemonproc import DaemonProcess
from tests.support.hostfiles import mknod, proc_devices_text  # noqa: F401 (re-exported)
from tests.support.processes import PRIVATE_MOUNTS, REPO, child_env, die_with_parent

TIMEOUT = 10.0
NOBODY = 65534

MAJORS = {"nvidia": 195, "nvidia-caps": 234, "nvidia-uvm": 509}
BUS_ID = host.BUS_ID
VERSION_TEXT = host.version_text()
INFORMATION = host.information_text(BUS_ID, 0)
OPERATOR_ROOT = host.OPERATOR_ROOT


# --- mounts and files: tests.support.host, under the names the scenarios use ----------------

MNT_DETACH = host.MNT_DETACH
MS_NOSUID = 2


def mount(
    target: str | Path,
    fstype: str = "tmpfs",
    *,
    source: str | bytes = "tmpfs",
    flags: int = 0,
    data: str = "mode=755",
) -> None:
    host.mount(source, target, fstype, flags, data)


def umount(target: str | Path, flags: int = MNT_DETACH) -> None:
    host.umount(target, flags=flags)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace a file in one step, as the kernel's /proc files change: never half written."""
    host.write_text(path, text, atomic=True)


@dataclass
class Host:
    """A host as the daemon sees it: `root` (--root) and `proc` (--proc); host paths inside."""

    base: Path
    root: Path = field(init=False)
    proc: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.proc = self.base / "proc"
        self._fake = host.FakeHost(self.root, self.proc, self.base / "sys")

    def fs(self, host_path: str) -> Path:
        return self._fake.fs(host_path)

    def populate(self, majors: Mapping[str, int] = MAJORS) -> None:
        """A loaded driver with one GPU, an empty host /dev, and no driver root yet."""
        for directory in ("/dev", "/run/nvidia/validations", OPERATOR_ROOT):
            self._fake.mkdir(directory)
        self._fake.nvidia_proc(majors)

    def set_majors(self, majors: Mapping[str, int]) -> None:
        self._fake.proc_devices(majors)

    def nodes(self, dev: Path, uvm_major: int | None = None, *, uvm: bool = True) -> None:
        nodes = {"nvidiactl": (195, 255), "nvidia-modeset": (195, 254), "nvidia0": (195, 0)}
        if uvm and uvm_major is not None:
            nodes |= {"nvidia-uvm": (uvm_major, 0), "nvidia-uvm-tools": (uvm_major, 1)}
        self._fake.nodes(dev, nodes)

    def view_options(self, config: Path, mountinfo: str) -> list[str]:
        """The host-view options of both `serve` and `scan`."""
        return [
            "--root",
            str(self.root),
            "--proc",
            str(self.proc),
            "--mountinfo",
            mountinfo,
            "--config",
            str(config),
        ]

    def options(self, socket_path: Path, config: Path, mountinfo: str) -> list[str]:
        return [*self.view_options(config, mountinfo), "--socket", str(socket_path)]


def run_scan(
    host: Host, config: Path, mountinfo: str, *, prefix: tuple[str, ...] = (), timeout: float = 60
) -> tuple[int, bytes, str]:
    """`gpu-device-watcher scan` as a process: (exit code, stdout, stderr)."""
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "watcher", "scan", *host.view_options(config, mountinfo)],
        capture_output=True,
        timeout=timeout,
        env=daemon_env(None),
        check=False,
    )
    return done.returncode, done.stdout, done.stderr.decode(errors="replace")


def write_config(path: Path, **keys: Any) -> Path:
    """A TOML config (root-owned, 0644: passes the file-safety check)."""
    lines = []
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    return path


def reference_map(host: Host, mountinfo: str, config: Path) -> dict[str, Any]:
    """A fresh one-shot scan of the same host, with exactly the daemon's settings."""
    from watcher.config import resolve_settings
    from watcher.probe import scan

    settings = resolve_settings(
        {
            "root": str(host.root),
            "proc": str(host.proc),
            "mountinfo": mountinfo,
            "config": str(config),
            "socket": "/unused",
        }
    )
    return content(json.loads(msgspec.json.encode(scan(settings.view))))


def content(device_map: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but generation and timestamp: what must agree between daemon and scan."""
    return {key: value for key, value in device_map.items() if key not in ("generation", "updated")}


# --- the daemon ------------------------------------------------------------------------------


class DaemonError(RuntimeError):
    pass


# What the daemon under test must not take from the test's environment: the socket and
# config overrides of a developer's shell.
_DROP = ("GPU_DEVICE_WATCHER",)


def daemon_env(notify: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = child_env(drop=_DROP)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    env.update(extra or {})
    return env


class Daemon(DaemonProcess):
    """One `serve` process (`tests.support.daemonproc.DaemonProcess`), its log appended to a
    file that outlives it; started ready (READY=1 received) or raising DaemonError."""

    instances: ClassVar[list[Daemon]] = []

    def __init__(
        self,
        args: list[str],
        log: Path,
        *,
        python: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log = log
        self.socket_path = args[args.index("--socket") + 1] if "--socket" in args else None
        super().__init__(
            [*(python or [sys.executable, "-m", "watcher"]), "serve", *args],
            socket_path=self.socket_path,
            env=env,
            drop=_DROP,
            log_path=log,
            cwd="/",
            die_with_parent=True,
        )
        Daemon.instances.append(self)
        try:
            self.ready_at = self.notifications.wait_for("READY")
        except AssertionError:
            self.stop()
            raise DaemonError(f"daemon not ready: {self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log_text.splitlines()[-lines:])

    def stop(self, timeout: float = TIMEOUT) -> int:  # type: ignore[override]
        """SIGTERM, then SIGKILL if it is ignored; the exit status either way."""
        with contextlib.suppress(AssertionError):
            super().stop(timeout=timeout)
        self.close()
        return self.process.returncode

    def kill(self) -> None:
        super().kill()
        self.close()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise DaemonError("no VmRSS")


# --- clients ---------------------------------------------------------------------------------


class Client:
    """A stdlib JSON Lines client; every read bounded by `timeout`."""

    def __init__(self, path: str | Path, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.reader.readline()

    def ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(line)
        return reply


def ask(path: str | Path, request: Mapping[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    with Client(path, timeout) as client:
        return client.ask(request)


def settle(client: Client, after: int, quiet: float) -> tuple[int, dict[str, Any] | None]:
    """Follow generations until none comes for `quiet` seconds: (last generation, its map).

    The map is None when no generation came after `after` at all.
    """
    latest: dict[str, Any] | None = None
    while True:
        reply = client.ask({"op": "wait", "after": after, "timeout": quiet})
        if reply["ok"]:
            after, latest = reply["generation"], reply["map"]
            continue
        if reply["error"]["code"] != "timeout":
            raise DaemonError(f"wait failed: {reply}")
        return after, latest


def check_reply_shape(line: bytes) -> dict[str, Any]:
    """One well-formed reply line: a JSON object with `ok`, and the error shape when false."""
    assert line.endswith(b"\n"), line[-200:]
    assert line.count(b"\n") == 1
    reply = json.loads(line)
    assert isinstance(reply, dict)
    assert isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert isinstance(reply.get("generation") or reply.get("status"), int | dict), reply
    else:
        error = reply["error"]
        assert set(error) == {"code", "message"}, reply
        assert error["code"] in {
            "bad-request",
            "too-large",
            "not-found",
            "timeout",
            "forbidden",
            "busy",
            "internal",
        }, reply
        assert isinstance(error["message"], str)
        assert error["message"]
    return reply


# --- a private mount namespace ---------------------------------------------------------------


def run_scenario(name: str, params: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Run `scenarios.NAME(params)` in a child inside its own private mount namespace."""
    env = daemon_env(None)
    done = subprocess.run(
        [*PRIVATE_MOUNTS, sys.executable, "-m", "tests.reliability.scenarios", name],
        input=json.dumps(dict(params)).encode(),
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
        preexec_fn=die_with_parent,  # unshare execs python: the setting survives exec
    )
    if done.returncode != 0:
        raise DaemonError(
            f"scenario {name} exited {done.returncode}:\n{done.stderr.decode(errors='replace')}"
        )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def jitter(rng: random.Random, upto: float) -> None:
    """A random pause of the *driver* under test (random timing), not a wait for a condition."""
    if upto > 0:
        time.sleep(rng.uniform(0, upto))
