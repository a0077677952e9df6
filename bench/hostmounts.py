"""Build mount tables of a chosen size in a private mount namespace (root only).

The mounts and the host are `tests.support.host`'s, under the names the benchmarks use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import host
from tests.support.host import (  # noqa: F401 (re-exported)
    MNT_DETACH,
    MS_MOVE,
    MS_PRIVATE,
    MS_REC,
    OPERATOR_NODES,
    OPERATOR_ROOT,
    FakeHost,
    mount,
)
from tests.support.hostfiles import make_nodes

__all__ = [
    "OPERATOR_NODES",
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
    mount("tmpfs", target, "tmpfs", 0, options)


def umount(target: str, *, lazy: bool = False) -> None:
    host.umount(target, lazy=lazy)


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


def move_mount(source: str, target: str) -> None:
    """Move the mount at `source` onto `target` in one step (mount --move)."""
    mount(source, target, None, MS_MOVE)


def build_operator_host(base: Path) -> tuple[Path, Path]:
    """A GPU-Operator-shaped host under `base`: (root, proc) for `--root` and `--proc`.

    The root holds an empty /dev and a tmpfs at /run/nvidia/driver (the driver container's
    root) whose dev/ has the usual nodes; proc has devices, the driver version and one GPU.
    """
    fake = FakeHost.under(base)
    fake.mkdir("/dev")
    fake.tmpfs(OPERATOR_ROOT, "size=1m,mode=755")
    fake.nodes(f"{OPERATOR_ROOT}/dev", OPERATOR_NODES)
    fake.nvidia_proc({"nvidia": 195, "nvidia-uvm": 509})
    return fake.root, fake.proc
