"""The files of a fake host: what `/proc/devices` says, and character device nodes."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["make_nodes", "mknod", "proc_devices_text"]


def proc_devices_text(majors: Mapping[str, int]) -> str:
    """`/proc/devices` with the usual neighbours and `majors` among the character devices."""
    lines = ["Character devices:", "  1 mem", "  5 /dev/tty", " 10 misc"]
    lines += [f"{major:3d} {name}" for name, major in majors.items()]
    lines += ["", "Block devices:", "  8 sd", "259 blkext", ""]
    return "\n".join(lines)


def mknod(path: Path, major: int, minor: int, mode: int = 0o666) -> None:
    """A character node with exactly `mode` (the umask does not apply), parents made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
    os.chmod(path, mode)


def make_nodes(directory: Path, nodes: Mapping[str, tuple[int, int]], mode: int = 0o666) -> None:
    """`name: (major, minor)` nodes in `directory`, as the driver makes them."""
    for name, (major, minor) in nodes.items():
        mknod(directory / name, major, minor, mode)
