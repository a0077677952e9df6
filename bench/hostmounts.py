"""Build mount tables of a chosen size in a private mount namespace (root only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.hostfiles import make_nodes

__all__ = [
    "build_operator_host",
    "grow_mount_table",
    "in_private_namespace",
    "make_nodes",
    "mount_tmpfs",
    "move_mount",
    "reexec_unshared",
    "scratch_tmpfs",
    "umount",
]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def in_private_namespace() -> bool:
    return os.environ.get("GDW_BENCH_UNSHARED") == "1"


def reexec_unshared() -> None:
    """Run this same command again inside `unshare -m`, so no mount escapes to the host."""
    if in_private_namespace():
        return
    if os.geteuid() != 0:
        sys.exit("bench: needs root (it builds mount tables with unshare -m)")
    environment = {**os.environ, "GDW_BENCH_UNSHARED": "1"}
    command = ["unshare", "-m", "--propagation", "private", sys.executable, *sys.orig_argv[1:]]
    sys.exit(subprocess.call(command, env=environment))


def mount_tmpfs(target: str, options: str = "size=64k") -> None:
    if _libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, options.encode()) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount tmpfs on {target}: {os.strerror(error)}")


MNT_DETACH = 2


def umount(target: str, *, lazy: bool = False) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH if lazy else 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"umount {target}: {os.strerror(error)}")


def grow_mount_table(base: Path, total: int) -> int:
    """Mount tmpfs under `base` until /proc/self/mountinfo has `total` lines; returns count."""
    present = len(Path("/proc/self/mountinfo").read_text().splitlines())
    base.mkdir(parents=True, exist_ok=True)
    for index in range(max(0, total - present)):
        target = base / f"m{index}"
        target.mkdir(exist_ok=True)
        mount_tmpfs(str(target))
    return len(Path("/proc/self/mountinfo").read_text().splitlines())


@contextmanager
def scratch_tmpfs(prefix: str = "gdw-bench-") -> Iterator[Path]:
    """A tmpfs of our own to mount under; detached whole at the end, children and all."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        mount_tmpfs(directory, "size=16m")
        try:
            yield Path(directory)
        finally:
            umount(directory, lazy=True)


MS_MOVE = 0x2000


def move_mount(source: str, target: str) -> None:
    """Move the mount at `source` onto `target` in one step (mount --move)."""
    if _libc.mount(source.encode(), target.encode(), None, MS_MOVE, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"move {source} to {target}: {os.strerror(error)}")


OPERATOR_NODES = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-uvm": (509, 0),
    "nvidia-uvm-tools": (509, 1),
}


def build_operator_host(base: Path) -> tuple[Path, Path]:
    """A GPU-Operator-shaped host under `base`: (root, proc) for `--root` and `--proc`.

    The root holds an empty /dev and a tmpfs at /run/nvidia/driver (the driver container's
    root) whose dev/ has the usual nodes; proc has devices, the driver version and one GPU.
    """
    root, proc = base / "root", base / "proc"
    (root / "dev").mkdir(parents=True)
    driver = root / "run/nvidia/driver"
    driver.mkdir(parents=True)
    mount_tmpfs(str(driver), "size=1m,mode=755")
    make_nodes(driver / "dev", OPERATOR_NODES)
    gpu = proc / "driver/nvidia/gpus/0000:3b:00.0"
    gpu.mkdir(parents=True)
    (proc / "devices").write_text(
        "Character devices:\n  1 mem\n195 nvidia\n509 nvidia-uvm\n\nBlock devices:\n  8 sd\n"
    )
    (proc / "driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build\n"
    )
    (gpu / "information").write_text(
        "Model: \t\t NVIDIA H200\nBus Location: \t 0000:3b:00.0\nDevice Minor: \t 0\n"
    )
    return root, proc
