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


def drm_render(
    sys_dir: Path,
    minor: int,
    bus_id: str,
    *,
    driver: str = "amdgpu",
    product_name: str | None = None,
    unique_id: str | None = None,
) -> None:
    """A render node in a fake sysfs, linked as the kernel links it: class/drm/renderDN ->
    ../../devices/<bridge>/<bus>/drm/renderDN, whose `device` links to the PCI device, whose
    `driver` links to bus/pci/drivers/<driver>."""
    device = sys_dir / "devices/pci0000:80" / bus_id
    (device / f"drm/renderD{minor}").mkdir(parents=True)
    (sys_dir / "bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
    (sys_dir / "class/drm").mkdir(parents=True, exist_ok=True)
    (sys_dir / f"class/drm/renderD{minor}").symlink_to(
        f"../../devices/pci0000:80/{bus_id}/drm/renderD{minor}"
    )
    (device / f"drm/renderD{minor}/device").symlink_to(f"../../../{bus_id}")
    (device / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    for name, value in (("product_name", product_name), ("unique_id", unique_id)):
        if value is not None:
            (device / name).write_text(value + "\n")
