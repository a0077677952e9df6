"""Run the real daemon against a simulated host in a private mount namespace.

- `Namespace` starts `nshost.py` under `unshare --mount --propagation private`. That process
  owns the namespace, builds the host (a tmpfs root R with mknod'ed nodes, a fake proc dir P)
  and applies every later change on request (`tests.support.host.FakeHost`, the one host
  builder), answering once the change is done.
- `Daemon` (a `tests.support.daemonproc.DaemonProcess`) runs `python -m watcher serve --root R
  --proc P --socket S` inside that same namespace through `nsenter -t <nshost pid> -m`, so
  the daemon's own /proc/self/mountinfo is the namespace's mount table. Its stderr (the log)
  and its sd_notify datagrams are collected by a reader thread; readiness is the `READY=1`
  datagram.
- The socket and the notify socket live outside the namespace's private tmpfs, on the file
  system both sides share, so the test process reaches them by path.

Every wait is bounded and woken by the thing it waits for (a reply line, a datagram, a log
line, a process exit): nothing sleeps and looks again.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.support.daemonproc import TIMEOUT, DaemonProcess, HarnessError, Subscription
from tests.support.host import information_text, mounts_under, proc_devices_text, version_text
from tests.support.maps import Map, device, names, problem_codes
from tests.support.processes import PRIVATE_MOUNTS, REPO

# device, names, problem_codes and proc_devices_text live in tests/support (shared by every
# suite and the benchmarks) and are still importable from here.
__all__ = [
    "BUS_ID",
    "DEV_ROOT",
    "DRIVER_ROOT",
    "NSHOST",
    "REPO",
    "TIMEOUT",
    "UVM_MAJOR",
    "VALIDATIONS",
    "VERSION",
    "Daemon",
    "HarnessError",
    "Map",
    "Namespace",
    "Subscription",
    "cli_command",
    "device",
    "mounts_under",
    "names",
    "operator_namespace",
    "problem_codes",
    "proc_devices_text",
    "scratch_base",
]

NSHOST = Path(__file__).resolve().with_name("nshost.py")

DRIVER_ROOT = "/run/nvidia/driver"
DEV_ROOT = "/run/nvidia/driver/dev"
VALIDATIONS = "/run/nvidia/validations"
VERSION = "580.95.05"
BUS_ID = "0000:3b:00.0"
UVM_MAJOR = 509
# The GPU Operator shape: the driver container's root is rbound at /run/nvidia/driver and
# its /dev is the container's own; the host's /dev holds no NVIDIA node.
NODES: dict[str, tuple[int, int]] = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-uvm": (UVM_MAJOR, 0),
    "nvidia-uvm-tools": (UVM_MAJOR, 1),
}


def cli_command() -> list[str]:
    """The installed console script, as a user runs it (or `python -m watcher`)."""
    script = Path(sys.executable).with_name("gpu-device-watcher")
    return [str(script)] if script.exists() else [sys.executable, "-m", "watcher"]


class _Lines:
    """Line reader over a pipe fd whose every read is bounded by a deadline."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            with selectors.DefaultSelector() as selector:
                selector.register(self._fd, selectors.EVENT_READ)
                if remaining <= 0 or not selector.select(remaining):
                    raise HarnessError(f"no reply within {timeout:g} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise HarnessError("the namespace host exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


class Namespace:
    """A private mount namespace holding a simulated host, changed on request.

    Methods take host paths (strings, inside the view's root R) or, as `Path`, paths as the
    namespace sees them (for staging areas outside R).
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.workdir = base / "w"
        self.root = self.workdir / "root"
        self.proc = self.workdir / "proc"
        # The daemon's --sys: a fake sysfs, so the machine's own GPUs never enter a test.
        self.sys = self.workdir / "sys"
        self.workdir.mkdir()
        self._stderr = base / "nshost.err"
        with open(self._stderr, "wb") as errors:
            self._process = subprocess.Popen(
                [
                    *PRIVATE_MOUNTS,
                    *(sys.executable, str(NSHOST), str(self.workdir)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        assert self._process.stdout is not None
        self._lines = _Lines(self._process.stdout.fileno())
        try:
            hello = self._receive()
        except BaseException:
            self.close()
            raise
        self.pid: int = hello["pid"]

    # -- talking to nshost -------------------------------------------------------------

    def _receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = json.loads(self._lines.readline(timeout))
        except HarnessError as error:
            raise HarnessError(f"{error}; nshost said: {self._stderr.read_text()!r}") from None
        return reply

    def call(self, op: str, **arguments: Any) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps({"op": op, **arguments}).encode() + b"\n")
        stdin.flush()
        reply = self._receive(TIMEOUT if op != "storm" else 60.0)
        if not reply["ok"]:
            raise HarnessError(f"{op} {arguments}: {reply['error']}")

    def fs(self, path: str | Path) -> str:
        if isinstance(path, Path):
            return str(path)
        assert path.startswith("/"), path
        return str(self.root) + path

    # -- changes -----------------------------------------------------------------------

    def tmpfs(self, path: str | Path, options: str = "mode=755") -> None:
        self.call("tmpfs", path=self.fs(path), options=options)

    def umount(self, path: str | Path, *, lazy: bool = True) -> None:
        self.call("umount", path=self.fs(path), lazy=lazy)

    def move(self, source: str | Path, target: str | Path) -> None:
        self.call("move", source=self.fs(source), target=self.fs(target))

    def bind(self, source: str | Path, target: str | Path) -> None:
        self.call("bind", source=self.fs(source), target=self.fs(target))

    def mkdir(self, path: str | Path) -> None:
        self.call("mkdir", path=self.fs(path))

    def mknod(
        self, path: str | Path, major: int, minor: int, mode: int = 0o666, *, block: bool = False
    ) -> None:
        self.call("mknod", path=self.fs(path), major=major, minor=minor, mode=mode, block=block)

    def chmod(self, path: str | Path, mode: int) -> None:
        self.call("chmod", path=self.fs(path), mode=mode)

    def rename(self, source: str | Path, target: str | Path) -> None:
        self.call("rename", source=self.fs(source), target=self.fs(target))

    def unlink(self, path: str | Path) -> None:
        self.call("unlink", path=self.fs(path))

    def symlink(self, path: str | Path, target: str) -> None:
        self.call("symlink", path=self.fs(path), target=target)

    def drm_render(
        self, minor: int, bus_id: str, *, driver: str = "amdgpu", unique_id: str | None = None
    ) -> None:
        """A render node in the fake sysfs, linked as the kernel links it
        (`tests.support.host.drm_render`)."""
        self.call("drm_render", minor=minor, bus_id=bus_id, driver=driver, unique_id=unique_id)

    def write(self, path: str | Path, text: str) -> None:
        """Write atomically (temporary file, rename): a rescan never reads half a file."""
        self.call("write", path=self.fs(path), text=text, atomic=True)

    def storm(self, path: str | Path, pairs: int) -> None:
        self.call("storm", path=self.fs(path), pairs=pairs)

    def write_proc(self, relative: str, text: str) -> None:
        self.call("proc_text", relative=relative, text=text)

    def proc_devices(self, majors: Mapping[str, int]) -> None:
        self.write_proc("devices", proc_devices_text(majors))

    # -- the standard host ---------------------------------------------------------------

    def populate_dev(self, dev: str | Path, nodes: Mapping[str, tuple[int, int]]) -> None:
        self.mkdir(dev)
        for name, (major, minor) in nodes.items():
            self.mknod(dev / name if isinstance(dev, Path) else f"{dev}/{name}", major, minor)

    def build_operator_host(self, uvm_major: int = UVM_MAJOR) -> None:
        """R with an empty /dev and the driver container's root (a tmpfs) at DRIVER_ROOT."""
        self.tmpfs(self.root)
        self.mkdir(self.sys)
        self.mkdir("/dev")
        self.tmpfs(DRIVER_ROOT, options="mode=755")
        nodes = {
            name: (uvm_major if name.startswith("nvidia-uvm") else major, minor)
            for name, (major, minor) in NODES.items()
        }
        self.populate_dev(DEV_ROOT, nodes)
        self.proc_devices({"nvidia": 195, "nvidia-uvm": uvm_major})
        self.write_proc("driver/nvidia/version", version_text(VERSION))
        self.write_proc(f"driver/nvidia/gpus/{BUS_ID}/information", information_text(BUS_ID, 0))

    def close(self) -> None:
        stdin = self._process.stdin
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        try:
            self._process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(TIMEOUT)
        if self._process.stdout is not None:
            self._process.stdout.close()


class Daemon(DaemonProcess):
    """One `gpu-device-watcher serve` process in the namespace."""

    _count = 0

    def __init__(
        self,
        namespace: Namespace,
        socket_path: Path,
        *,
        config: Path,
        extra: tuple[str, ...] = (),
    ) -> None:
        Daemon._count += 1
        super().__init__(
            [
                *("nsenter", "-t", str(namespace.pid), "-m", "--"),
                *(sys.executable, "-m", "watcher", "serve"),
                *("--root", str(namespace.root), "--proc", str(namespace.proc)),
                *("--sys", str(namespace.sys)),
                *("--socket", str(socket_path), "--config", str(config), *extra),
            ],
            socket_path=socket_path,
            notify_path=namespace.base / f"notify-{Daemon._count}",
        )


@contextlib.contextmanager
def scratch_base(prefix: str) -> Iterator[Path]:
    """A fresh directory for one test's namespace, sockets and an empty config.

    Short, under /tmp: socket paths must fit the 107 bytes of sun_path. Removed afterwards;
    the namespace dies with its processes, so no mount of it may show up here then.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    config = directory / "config.toml"
    config.write_text("")
    config.chmod(0o600)
    yield directory
    leaked = mounts_under(directory)
    shutil.rmtree(directory, ignore_errors=True)
    assert leaked == [], f"mounts leaked into the test's namespace: {leaked}"


@contextlib.contextmanager
def operator_namespace(base: Path) -> Iterator[Namespace]:
    """A `Namespace` holding a GPU-Operator-shaped host, closed afterwards."""
    namespace = Namespace(base)
    try:
        namespace.build_operator_host()
        yield namespace
    finally:
        namespace.close()
