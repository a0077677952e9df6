"""A simulated GPU host served by the real daemon, for the CRIU tests and `bench.criu_cost`.

The host's `/proc` files are plain files under `base/proc`; its root `base/root` is a tmpfs in
a private mount namespace that only the daemon lives in: `unshare --mount --propagation
private` starts this file, which mounts the tmpfs, mknods the nodes and execs
`python -m watcher serve --root base/root --proc base/proc --socket base/gdw.sock`. The
daemon's namespace, its mounts and nodes die with it; the test's namespace never changes.

The nodes carry the numbers of real character devices of *this* machine, and the simulated
`proc/devices` declares their major (1, `mem`) as `nvidia`: a process that opens the real
`/dev/zero` (1:5) then holds what the map calls `nvidia5`, at host path `/dev/nvidia5`. That
is the point of matching by major:minor: the path the process used does not matter.

Readiness is the daemon's own sd_notify `READY=1` on a datagram socket the test owns (no
polling for the socket file); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.processes import PRIVATE_MOUNTS, child_env
from watcher import client

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Real character devices whose numbers the simulated NVIDIA nodes carry.
DEV_ZERO = (1, 5)  # /dev/zero: held by the test trees; the map's nvidia5
DEV_FULL = (1, 7)  # /dev/full: the map's nvidia7, a second GPU nobody holds
NVIDIA_MAJOR = 1  # the major of /dev/null, /dev/zero, /dev/full: declared `nvidia` here
H200 = "NVIDIA H200"


@dataclass(frozen=True)
class Gpu:
    bus_id: str
    minor: int
    model: str = H200
    uuid: str = "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f"


@dataclass
class HostSpec:
    """What the simulated host holds. Nodes: name -> (major, minor) under `/dev`."""

    driver_version: str = "580.95.05"
    driver_loaded: bool = True
    nodes: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {
            "nvidiactl": (NVIDIA_MAJOR, 255),
            "nvidia5": DEV_ZERO,
            "nvidia7": DEV_FULL,
        }
    )
    gpus: list[Gpu] = field(
        default_factory=lambda: [
            Gpu("0000:3b:00.0", 5),
            Gpu("0000:5d:00.0", 7, uuid="GPU-0b2d4e6f-8a1c-3e5f-7a9b-1c3d5e7f9a2b"),
        ]
    )
    # Extra config.toml keys (the daemon validates them; the action reads its own key).
    config: dict[str, str] = field(default_factory=dict)
    # More character majors for /proc/devices (AMD: `kfd`, `drm`), and render nodes of the
    # fake sysfs (`--sys`, always set: the machine's own GPUs stay out) as
    # (minor, bus id, driver, product_name, unique_id).
    majors: dict[str, int] = field(default_factory=dict)
    renders: list[tuple[int, str, str, str | None, str | None]] = field(default_factory=list)


class HostError(RuntimeError):
    pass


def _version_text(version: str) -> str:
    return (
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  "
        "(dvs-builder@U22-I3-AF03-09-1)  Thu Sep 25 01:23:45 UTC 2025\n"
        "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04) \n"
    )


def _gpu_text(gpu: Gpu) -> str:
    return (
        f"Model: \t\t {gpu.model}\nIRQ:   \t\t 156\nGPU UUID: \t {gpu.uuid}\n"
        "Video BIOS: \t 96.00.89.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n"
        f"DMA Mask: \t 0xfffffffffffff\nBus Location: \t {gpu.bus_id}\n"
        f"Device Minor: \t {gpu.minor}\nGPU Excluded:\t No\n"
    )


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string without control characters is a TOML string


class SimHost:
    """The simulated host and its daemon. Use as a context manager (start, then stop)."""

    def __init__(self, base: Path, spec: HostSpec | None = None) -> None:
        self.base = base
        self.spec = spec or HostSpec()
        self.root = base / "root"
        self.proc = base / "proc"
        self.sys = base / "sys"
        self.socket = base / "gdw.sock"
        self.config = base / "config.toml"
        self.log = base / "daemon.log"
        self._notify_path = base / "notify.sock"
        self.process: subprocess.Popen[bytes] | None = None
        if len(os.fsencode(self.socket)) > 100:
            raise HostError(f"socket path too long for AF_UNIX: {self.socket}")

    # ------------------------------------------------------------------ the host's files

    def write_proc(self) -> None:
        """(Re)write the whole simulated /proc from the spec."""
        spec = self.spec
        driver = self.proc / "driver" / "nvidia"
        shutil.rmtree(self.proc, ignore_errors=True)
        self.proc.mkdir(parents=True)
        majors = "" if not spec.driver_loaded else f"{NVIDIA_MAJOR:3d} nvidia\n"
        majors += "".join(f"{major:3d} {name}\n" for name, major in spec.majors.items())
        (self.proc / "devices").write_text(
            "Character devices:\n  4 /dev/vc/0\n  5 /dev/tty\n"
            f"{majors} 10 misc\n\nBlock devices:\n  8 sd\n259 blkext\n"
        )
        if not spec.driver_loaded:
            return
        (driver / "gpus").mkdir(parents=True)
        (driver / "version").write_text(_version_text(spec.driver_version))
        for gpu in spec.gpus:
            (driver / "gpus" / gpu.bus_id).mkdir()
            (driver / "gpus" / gpu.bus_id / "information").write_text(_gpu_text(gpu))

    def write_sys(self) -> None:
        """The fake sysfs: each render node linked to its PCI device and driver, as the
        kernel links them."""
        shutil.rmtree(self.sys, ignore_errors=True)
        (self.sys / "class/drm").mkdir(parents=True)
        for minor, bus_id, driver, product, unique_id in self.spec.renders:
            device = self.sys / "devices/pci0000:80" / bus_id
            (device / f"drm/renderD{minor}").mkdir(parents=True)
            (self.sys / "bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
            (self.sys / f"class/drm/renderD{minor}").symlink_to(
                f"../../devices/pci0000:80/{bus_id}/drm/renderD{minor}"
            )
            (device / f"drm/renderD{minor}/device").symlink_to(f"../../../{bus_id}")
            (device / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
            for name, value in (("product_name", product), ("unique_id", unique_id)):
                if value is not None:
                    (device / name).write_text(value + "\n")

    def write_config(self) -> None:
        lines = [
            f"root = {_toml_string(str(self.root))}",
            f"proc = {_toml_string(str(self.proc))}",
            f"sys = {_toml_string(str(self.sys))}",
        ]
        lines += [f"{key} = {_toml_string(value)}" for key, value in self.spec.config.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o644)

    # ------------------------------------------------------------------ the daemon

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.write_proc()
        self.write_sys()
        self.write_config()
        env = child_env({"NOTIFY_SOCKET": str(self._notify_path)}, drop=(client.SOCKET_ENV,))
        child = {
            "root": str(self.root),
            "proc": str(self.proc),
            "socket": str(self.socket),
            "config": str(self.config),
            "nodes": self.spec.nodes,
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
            notify.bind(str(self._notify_path))
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(
                    [
                        *PRIVATE_MOUNTS,
                        sys.executable,
                        str(Path(__file__).resolve()),
                        json.dumps(child),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            try:
                self._wait_ready(notify, timeout)
            except BaseException:
                self.stop()
                raise
            finally:
                self._notify_path.unlink(missing_ok=True)

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.process is not None
        pidfd = os.pidfd_open(self.process.pid)
        try:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([notify.fileno(), pidfd], [], [], left)
                if pidfd in readable:
                    self.process.wait(timeout=STOP_TIMEOUT)
                    raise HostError(
                        f"the daemon exited {self.process.returncode} before READY=1:\n"
                        + self.log_text()
                    )
                if notify.fileno() in readable and b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            raise HostError(f"no READY=1 from the daemon in {timeout} s:\n{self.log_text()}")
        finally:
            os.close(pidfd)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> SimHost:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ talking to it

    def env(self, *, cuda_checkpoint: bool = True, **extra: str) -> dict[str, str]:
        """An environment for the action (and CRIU) that points at this daemon.

        With `cuda_checkpoint`, PATH starts with a directory holding a stand-in
        `cuda-checkpoint` (pre-dump checks that CRIU's CUDA plugin would find one).
        """
        env = dict(os.environ)
        env[client.SOCKET_ENV] = str(self.socket)
        env.pop("GPU_DEVICE_WATCHER_CONFIG", None)
        if cuda_checkpoint:
            tools = self.base / "bin"
            tools.mkdir(exist_ok=True)
            stand_in = tools / "cuda-checkpoint"
            stand_in.write_text("#!/bin/sh\nexit 0\n")
            stand_in.chmod(0o755)
            env["PATH"] = os.pathsep.join(filter(None, [str(tools), env.get("PATH")]))
        else:
            env["PATH"] = os.pathsep.join(
                part
                for part in env.get("PATH", "").split(os.pathsep)
                if part and not os.path.exists(os.path.join(part, "cuda-checkpoint"))
            )
        env.update(extra)
        return env

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return client.request(str(self.socket), payload, timeout=10.0)

    def get(self) -> dict[str, Any]:
        return self.request({"op": "get"})

    def rescan(self) -> dict[str, Any]:
        """Rescan now (proc files are not watched); the new `get` reply."""
        return self.request({"op": "rescan"})

    # ------------------------------------------------------------------ changing it

    def set_driver_version(self, version: str) -> None:
        self.spec.driver_version = version
        self.write_proc()

    def set_gpu_model(self, minor: int, model: str) -> None:
        self.spec.gpus = [
            Gpu(g.bus_id, g.minor, model, g.uuid) if g.minor == minor else g for g in self.spec.gpus
        ]
        self.write_proc()

    def unload_driver(self) -> None:
        self.spec.driver_loaded = False
        self.write_proc()

    def _in_namespace(self, *command: str) -> None:
        assert self.process is not None, "the host is not running"
        subprocess.run(
            ["nsenter", f"--target={self.process.pid}", "--mount", "--", *command],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def remove_node(self, name: str) -> None:
        self._in_namespace("rm", "-f", "--", str(self.root / "dev" / name))

    def replace_node(self, name: str, major: int, minor: int) -> None:
        path = str(self.root / "dev" / name)
        self._in_namespace("rm", "-f", "--", path)
        self._in_namespace("mknod", "-m", "0666", path, "c", str(major), str(minor))

    def run_inside(
        self, command: list[str], env: Mapping[str, str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` in the daemon's mount namespace (where the host's nodes are)."""
        assert self.process is not None, "the host is not running"
        return subprocess.run(
            ["nsenter", f"--target={self.process.pid}", "--mount", "--", *command],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def describe(self) -> dict[str, Any]:
        return asdict(self.spec)


# ---------------------------------------------------------------------- the namespace side


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


def _serve(spec: dict[str, Any]) -> None:
    # unshare(1) made every mount private already; say it again so that nothing mounted here
    # can ever propagate back to the test's namespace.
    _mount("--make-rprivate", "/")
    root = spec["root"]
    _mount("-t", "tmpfs", "-o", "mode=755", "gdw-simhost", root)
    os.mkdir(f"{root}/dev", 0o755)
    for name, (major, minor) in spec["nodes"].items():
        path = f"{root}/dev/{name}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # noqa: S103 (device nodes as the driver makes them; umask)
    os.execv(  # noqa: S606 (becomes the daemon: same pid, same namespace)
        sys.executable,
        [
            sys.executable,
            "-m",
            "watcher",
            "serve",
            "--root",
            root,
            "--proc",
            spec["proc"],
            "--socket",
            spec["socket"],
            "--config",
            spec["config"],
        ],
    )


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
