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

The host is built with `tests.support.host`, the daemon driven as a
`tests.support.daemonproc.DaemonProcess` (its log in `base/daemon.log`): readiness is the
daemon's own sd_notify `READY=1` (no polling for the socket file); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.criu.harness import stage_wrapper
from tests.support.daemonproc import DaemonProcess
from tests.support.host import (
    MS_PRIVATE,
    MS_REC,
    FakeHost,
    drm_render,
    mount,
    partitioned_gpu,
)
from tests.support.processes import PRIVATE_MOUNTS
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
    # MI300-class GPUs in compute partitions (`tests.support.host.partitioned_gpu` options).
    partitioned: list[dict[str, Any]] = field(default_factory=list)
    # A driver root (a host path, as the GPU Operator's /run/nvidia/driver): the nodes go to
    # its dev/ and it is the only root the daemon considers. `files`: host path -> text of
    # an executable written into the simulated root (a driver root's cuda-checkpoint).
    driver_root: str | None = None
    files: dict[str, str] = field(default_factory=dict)


class HostError(RuntimeError):
    pass


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
        self.process: subprocess.Popen[bytes] | None = None
        self._daemon: DaemonProcess | None = None
        if len(os.fsencode(self.socket)) > 100:
            raise HostError(f"socket path too long for AF_UNIX: {self.socket}")

    # ------------------------------------------------------------------ the host's files

    def write_proc(self) -> None:
        """(Re)write the whole simulated /proc from the spec."""
        spec = self.spec
        shutil.rmtree(self.proc, ignore_errors=True)
        self.proc.mkdir(parents=True)
        host = FakeHost(self.root, self.proc, self.sys)
        majors = {"nvidia": NVIDIA_MAJOR} if spec.driver_loaded else {}
        host.proc_devices({**majors, **spec.majors})
        if not spec.driver_loaded:
            return
        host.driver_version(spec.driver_version)
        for gpu in spec.gpus:
            host.gpu(gpu.bus_id, gpu.minor, model=gpu.model, uuid=gpu.uuid)

    def write_sys(self) -> None:
        """The fake sysfs: each render node linked to its PCI device and driver, as the
        kernel links them."""
        shutil.rmtree(self.sys, ignore_errors=True)
        (self.sys / "class/drm").mkdir(parents=True)
        for minor, bus_id, driver, product, unique_id in self.spec.renders:
            drm_render(
                self.sys, minor, bus_id, driver=driver, product_name=product, unique_id=unique_id
            )
        for options in self.spec.partitioned:
            partitioned_gpu(self.sys, **options)

    def write_config(self) -> None:
        lines = [
            f"root = {_toml_string(str(self.root))}",
            f"proc = {_toml_string(str(self.proc))}",
            f"sys = {_toml_string(str(self.sys))}",
        ]
        lines += [f"{key} = {_toml_string(value)}" for key, value in self.spec.config.items()]
        if self.spec.driver_root is not None:
            lines.append(f"driver_roots = [{_toml_string(self.spec.driver_root)}]")
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o644)

    # ------------------------------------------------------------------ the daemon

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.write_proc()
        self.write_sys()
        self.write_config()
        child = {
            "root": str(self.root),
            "proc": str(self.proc),
            "socket": str(self.socket),
            "config": str(self.config),
            "nodes": self.spec.nodes,
            "dev": f"{self.spec.driver_root or ''}/dev",
            "files": self.spec.files,
        }
        self.log.write_bytes(b"")
        # The daemon is this file's child side, which builds the root in its own namespace
        # and then becomes the daemon (same pid).
        self._daemon = DaemonProcess(
            [*PRIVATE_MOUNTS, sys.executable, str(Path(__file__).resolve()), json.dumps(child)],
            socket_path=self.socket,
            log_path=self.log,
        )
        self.process = self._daemon.process
        try:
            self._daemon.wait_ready(timeout)
        except AssertionError as error:
            self.stop()
            raise HostError(str(error)) from None
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        daemon, self._daemon, self.process = self._daemon, None, None
        if daemon is None:
            return
        with contextlib.suppress(AssertionError):  # it ignored SIGTERM and was killed
            daemon.stop(timeout=STOP_TIMEOUT)
        daemon.close()

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

    def env(
        self, *, cuda_checkpoint: bool = True, wrapper: bool = False, **extra: str
    ) -> dict[str, str]:
        """An environment for the action (and CRIU) that points at this daemon.

        With `cuda_checkpoint`, PATH starts with a directory holding a stand-in
        `cuda-checkpoint` (pre-dump checks that CRIU's CUDA plugin would find one). With
        `wrapper`, the project's cuda-checkpoint wrapper stands before everything on PATH
        (pre-restore lets a restore that needs a device map go on only then).
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
        if wrapper:
            staged = stage_wrapper(self.base / "wrapper")
            env["PATH"] = os.pathsep.join(filter(None, [str(staged.parent), env.get("PATH")]))
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


def _serve(spec: dict[str, Any]) -> None:
    # unshare(1) made every mount private already; say it again so that nothing mounted here
    # can ever propagate back to the test's namespace.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    host = FakeHost(Path(spec["root"]), Path(spec["proc"]))
    host.tmpfs(host.root, source="gdw-simhost")
    host.nodes(
        spec["dev"], {name: (major, minor) for name, (major, minor) in spec["nodes"].items()}
    )
    for path, text in spec["files"].items():
        target = host.fs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    root = spec["root"]
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
