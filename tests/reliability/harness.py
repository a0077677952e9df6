"""Drive a real `gpu-device-watcher serve` process on a real host tree.

Everything here is plain stdlib (plus `watcher` for the reference scan) so the same code runs
in the pytest process and in a scenario child inside a private mount namespace
(`scenarios.py`). Every wait is bounded; readiness comes from the daemon's own sd_notify
`READY=1`, quiescence from the protocol's `wait` op, never from sleeping and looking again.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from tests.support.hostfiles import mknod, proc_devices_text
from tests.support.processes import PRIVATE_MOUNTS, REPO, child_env

TIMEOUT = 10.0
NOBODY = 65534

MAJORS = {"nvidia": 195, "nvidia-caps": 234, "nvidia-uvm": 509}
BUS_ID = "0000:3b:00.0"
VERSION_TEXT = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
    "(dvs-builder@U22-I3-AF03-09-1)  Thu Sep 25 01:23:45 UTC 2025\n"
)
INFORMATION = (
    "Model: \t\t NVIDIA H200\nIRQ:   \t\t 156\n"
    "GPU UUID: \t GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f\n"
    f"Bus Type: \t PCIe\nBus Location: \t {BUS_ID}\nDevice Minor: \t 0\n"
)
OPERATOR_ROOT = "/run/nvidia/driver"


# --- mounts, without spawning mount(8) for each --------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
MS_NOSUID = 2


def mount(
    target: str | Path,
    fstype: str = "tmpfs",
    *,
    source: str | bytes = "tmpfs",
    flags: int = 0,
    data: str = "mode=755",
) -> None:
    src = source if isinstance(source, bytes) else source.encode()
    if _libc.mount(src, os.fsencode(target), fstype.encode(), flags, data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the process that started it dies.

    A daemon or scenario must never outlive a test run that was killed or timed out (a
    leftover daemon keeps its private mount namespace alive).
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def umount(target: str | Path, flags: int = MNT_DETACH) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


# --- a host tree ---------------------------------------------------------------------------


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace a file in one step, as the kernel's /proc files change: never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    if isinstance(text, bytes):
        temporary.write_bytes(text)
    else:
        temporary.write_text(text)
    os.replace(temporary, path)


@dataclass
class Host:
    """A host as the daemon sees it: `root` (--root) and `proc` (--proc); host paths inside."""

    base: Path
    root: Path = field(init=False)
    proc: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.proc = self.base / "proc"

    def fs(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def populate(self, majors: Mapping[str, int] = MAJORS) -> None:
        """A loaded driver with one GPU, an empty host /dev, and no driver root yet."""
        self.fs("/dev").mkdir(parents=True, exist_ok=True)
        self.fs("/run/nvidia/validations").mkdir(parents=True, exist_ok=True)
        self.fs(OPERATOR_ROOT).mkdir(parents=True, exist_ok=True)
        self.set_majors(majors)
        write_atomic(self.proc / "driver/nvidia/version", VERSION_TEXT)
        write_atomic(self.proc / f"driver/nvidia/gpus/{BUS_ID}/information", INFORMATION)

    def set_majors(self, majors: Mapping[str, int]) -> None:
        write_atomic(self.proc / "devices", proc_devices_text(majors))

    def nodes(self, dev: Path, uvm_major: int | None = None, *, uvm: bool = True) -> None:
        mknod(dev / "nvidiactl", 195, 255)
        mknod(dev / "nvidia-modeset", 195, 254)
        mknod(dev / "nvidia0", 195, 0)
        if uvm and uvm_major is not None:
            mknod(dev / "nvidia-uvm", uvm_major, 0)
            mknod(dev / "nvidia-uvm-tools", uvm_major, 1)

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


def daemon_env(notify: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = child_env(drop=("GPU_DEVICE_WATCHER",))
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    env.update(extra or {})
    return env


class Notifications:
    """An sd_notify receiver (abstract socket): READY=1 is the daemon's readiness signal."""

    def __init__(self) -> None:
        self.name = f"gdw-rel-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)

    @property
    def address(self) -> str:
        return "@" + self.name

    def wait_for(self, field_name: str, pid: int, timeout: float = TIMEOUT) -> float:
        """Block until a datagram with `field_name=` arrives; returns its arrival time.

        Woken as well by the exit of process `pid` (a pidfd), which then raises at once.
        """
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(pid)
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock, pidfd], [], [], left)
                if self.sock in ready:
                    data = self.sock.recv(65536).decode()
                    if any(line.split("=", 1)[0] == field_name for line in data.splitlines()):
                        return time.monotonic()
                elif pidfd in ready:
                    raise DaemonError(f"the daemon exited before {field_name}=")
                else:
                    break
        finally:
            os.close(pidfd)
        raise DaemonError(f"no {field_name}= from the daemon within {timeout:g} s")

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One `serve` process; started ready (READY=1 received) or raising DaemonError."""

    instances: ClassVar[list[Daemon]] = []

    def __init__(
        self,
        args: list[str],
        log: Path,
        *,
        python: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.notifications = Notifications()
        self.log = log
        command = [*(python or [sys.executable, "-m", "watcher"]), "serve", *args]
        self.socket_path = args[args.index("--socket") + 1] if "--socket" in args else None
        self.started = time.monotonic()
        Daemon.instances.append(self)
        with open(log, "ab") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=daemon_env(self.notifications.address, env),
                preexec_fn=die_with_parent,  # noqa: PLW1509 (only a prctl, no locks taken)
                cwd="/",
            )
        try:
            self.ready_at = self.notifications.wait_for("READY", self.process.pid)
        except DaemonError:
            self.stop()
            raise DaemonError(f"daemon not ready: {self.log_tail()}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = TIMEOUT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.notifications.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(TIMEOUT)
        self.notifications.close()

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
