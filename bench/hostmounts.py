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
