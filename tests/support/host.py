"""The one builder of fake hosts, for every suite and the benchmarks.

A fake host is a root directory (`--root`), a fake `/proc` (`--proc`) and a fake sysfs
(`--sys`). `FakeHost` builds and changes one from the process it runs in: in a private mount
namespace (a child under `processes.PRIVATE_MOUNTS`, or the namespace host of tests/daemon)
it mounts, unmounts and moves tmpfs dev roots; anywhere it mknods nodes and writes the `/proc`
stand-ins (`devices`, `driver/nvidia/version`, `driver/nvidia/gpus/*/information`,
`driver/nvidia/capabilities`), the GPU Operator's `validations/driver-ready` and the AMD
family's sysfs (`class/drm/renderDN` linked as the kernel links it).

Paths: a `str` is a host path (inside the root, "/dev/nvidia0"); a `Path` is a path as this
process sees it (for the proc and sys trees, staging areas, the work directory).

`FakeHost.execute` runs one JSON command (`{"op": "mknod", "path": ..., ...}`, every path as
this process sees it): the namespace host of tests/daemon and the layout child of
tests/realfs speak it. Standard library only: `tests/daemon/nshost.py` imports this before
anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BUS_ID",
    "DRIVER_VERSION",
    "GPU_UUID",
    "H200",
    "MNT_DETACH",
    "MS_BIND",
    "MS_MOVE",
    "MS_PRIVATE",
    "MS_REC",
    "FakeHost",
    "drm_partition",
    "drm_render",
    "information_text",
    "kfd_node",
    "make_nodes",
    "mknod",
    "mount",
    "mounts_under",
    "partitioned_gpu",
    "proc_devices_text",
    "umount",
    "version_text",
    "write_text",
]

DRIVER_VERSION = "580.95.05"
BUS_ID = "0000:3b:00.0"
H200 = "NVIDIA H200"
GPU_UUID = "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f"

# --- mounts: the syscalls themselves, without spawning mount(8) for each ------------------

MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
_MOUNT_TIMEOUT = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def mount(
    source: str | bytes, target: str | Path, fstype: str | None, flags: int = 0, data: str = ""
) -> None:
    """mount(2): `fstype` None for a bind, a move or a propagation change."""
    _check(
        _libc.mount(
            source if isinstance(source, bytes) else source.encode(),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source!r} on {target}",
    )


def umount(target: str | Path, *, lazy: bool = True, flags: int | None = None) -> None:
    """umount2(2): detached (`lazy`) or at once, or with exactly `flags`."""
    chosen = flags if flags is not None else (MNT_DETACH if lazy else 0)
    _check(_libc.umount2(os.fsencode(target), chosen), f"umount {target}")


# --- the files --------------------------------------------------------------------------


def proc_devices_text(majors: Mapping[str, int], block: Mapping[str, int] | None = None) -> str:
    """`/proc/devices` with the usual neighbours and `majors` among the character devices
    (a neighbour whose major `majors` takes is left out)."""
    neighbours = {1: "mem", 5: "/dev/tty", 10: "misc"}
    taken = set(majors.values())
    lines = ["Character devices:"]
    lines += [f"{major:3d} {name}" for major, name in neighbours.items() if major not in taken]
    lines += [f"{major:3d} {name}" for name, major in majors.items()]
    lines += ["", "Block devices:", "  8 sd", "259 blkext"]
    lines += [f"{major:3d} {name}" for name, major in (block or {}).items()]
    return "\n".join(lines) + "\n"


def version_text(version: str = DRIVER_VERSION) -> str:
    """`/proc/driver/nvidia/version` of the open kernel module."""
    return (
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  "
        "(dvs-builder@U22-I3-AF03-09-1)  Thu Sep 25 01:23:45 UTC 2025\n"
        "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04) \n"
    )


def information_text(
    bus_id: str = BUS_ID, minor: int = 0, *, model: str = H200, uuid: str = GPU_UUID
) -> str:
    """`/proc/driver/nvidia/gpus/<bus id>/information` of one GPU."""
    return (
        f"Model: \t\t {model}\nIRQ:   \t\t 156\nGPU UUID: \t {uuid}\n"
        "Video BIOS: \t 96.00.89.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n"
        f"DMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus_id}\nDevice Minor: \t {minor}\n"
        "GPU Firmware: \t 580.95.05\nGPU Excluded:\t No\n"
    )


def write_text(path: str | Path, text: str | bytes, *, atomic: bool = False) -> None:
    """Write a file, parents made. `atomic`: through a temporary file and a rename, as the
    kernel's files change, so a running daemon never reads half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}") if atomic else target
    if isinstance(text, bytes):
        written.write_bytes(text)
    else:
        written.write_text(text)
    if atomic:
        os.replace(written, target)


def mknod(
    path: str | Path, major: int, minor: int, mode: int = 0o666, *, block: bool = False
) -> None:
    """A device node with exactly `mode` (the umask does not apply), parents made."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = stat.S_IFBLK if block else stat.S_IFCHR
    os.mknod(target, kind | mode, os.makedev(major, minor))
    # Under a umask the node is made with less; with none (the namespace host) it is whole
    # already, and a chmod would only be one more event for a watching daemon.
    if stat.S_IMODE(os.lstat(target).st_mode) != mode:
        os.chmod(target, mode)


def make_nodes(directory: Path, nodes: Mapping[str, tuple[int, int]], mode: int = 0o666) -> None:
    """`name: (major, minor)` nodes in `directory`, as the driver makes them."""
    for name, (major, minor) in nodes.items():
        mknod(directory / name, major, minor, mode)


def mounts_under(path: Path) -> list[str]:
    """The mount points at or below `path` in this process's mount table."""
    prefix = str(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text(errors="replace").splitlines():
        point = line.split(" ")[4]
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _sys_link(sys_dir: Path, relative: str, target: str) -> None:
    """A link at `relative` as sysfs writes them: relative to its directory when `target` is
    a path inside the sysfs (no leading /), else as given."""
    path = sys_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if not target.startswith("/"):
        target = os.path.relpath(sys_dir / target, path.parent)
    os.symlink(target, path)


def drm_render(
    sys_dir: Path,
    minor: int,
    bus_id: str,
    *,
    driver: str = "amdgpu",
    product_name: str | None = None,
    unique_id: str | None = None,
    bridge: str = "pci0000:80",
    dev_file: bool = False,
) -> None:
    """A render node in a fake sysfs, linked as the kernel links it: class/drm/renderDN ->
    devices/<bridge>/<bus>/drm/renderDN, whose `device` links to the PCI device, whose
    `driver` links to bus/pci/drivers/<driver>. Its attribute files are written last, each
    in one step."""
    device = f"devices/{bridge}/{bus_id}"
    node = f"{device}/drm/renderD{minor}"
    (sys_dir / node).mkdir(parents=True)
    if dev_file:
        write_text(sys_dir / node / "dev", f"226:{minor}\n")
    (sys_dir / "bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
    _sys_link(sys_dir, f"class/drm/renderD{minor}", node)
    _sys_link(sys_dir, f"{node}/device", device)
    _sys_link(sys_dir, f"{device}/driver", f"bus/pci/drivers/{driver}")
    for name, value in (("product_name", product_name), ("unique_id", unique_id)):
        if value is not None:
            write_text(sys_dir / device / name, value + "\n", atomic=True)


def drm_partition(sys_dir: Path, minor: int, number: int, *, separator: str = ".") -> None:
    """The render node of a compute partition, as amdgpu makes it for an MI300-class GPU in
    CPX (and other) modes: class/drm/renderDN -> devices/platform/amdgpu_xcp.K/drm/renderDN,
    whose `device` is the platform device, which has no `driver` link (newer kernels name it
    amdgpu_xcp_K: `separator="_"`)."""
    device = f"devices/platform/amdgpu_xcp{separator}{number}"
    node = f"{device}/drm/renderD{minor}"
    (sys_dir / node).mkdir(parents=True)
    _sys_link(sys_dir, f"class/drm/renderD{minor}", node)
    _sys_link(sys_dir, f"{node}/device", device)


def kfd_node(sys_dir: Path, index: int, properties: Mapping[str, int]) -> None:
    """KFD topology node `index` (class/kfd/kfd/topology/nodes/N/properties): one
    `name value` line per property, values in decimal, as the kernel writes them."""
    text = "".join(f"{name} {value}\n" for name, value in properties.items())
    write_text(sys_dir / f"class/kfd/kfd/topology/nodes/{index}/properties", text, atomic=True)


def _kfd_gpu(render_minor: int, domain: int, location_id: int, unique_id: int) -> dict[str, int]:
    # The properties of an MI300X node as KFD writes them (those around the four the map
    # reads, in the kernel's order, so that the parser meets a real file's shape).
    return {
        "cpu_cores_count": 0,
        "simd_count": 1216,
        "gfx_target_version": 90402,
        "vendor_id": 4098,
        "device_id": 29857,
        "location_id": location_id,
        "domain": domain,
        "drm_render_minor": render_minor,
        "hive_id": 0,
        "num_sdma_engines": 2,
        "unique_id": unique_id,
        "num_xcc": 1,
    }


def partitioned_gpu(
    sys_dir: Path,
    *,
    bus_id: str,
    minors: tuple[int, ...],
    first_partition: int,
    unique_id: int,
    product_name: str | None = "AMD Instinct MI300X",
    kfd_names_partitions: bool = True,
    first_kfd_node: int = 1,
) -> None:
    """One MI300-class GPU as a CPX host shows it: its PCI device's render node (`minors[0]`,
    driver amdgpu, the first partition) and one platform device amdgpu_xcp.K per other
    partition (K from `first_partition` on: the kernel numbers them across all GPUs). With
    `kfd_names_partitions`, KFD lists one topology node per partition, each naming its render
    minor with the GPU's PCI address and unique id; without, the GPU is not split (SPX) and
    KFD names its PCI render node alone, while the platform devices linger."""
    drm_render(
        sys_dir,
        minors[0],
        bus_id,
        product_name=product_name,
        unique_id=f"{unique_id:016x}",
    )
    for offset, minor in enumerate(minors[1:]):
        drm_partition(sys_dir, minor, first_partition + offset)
    domain, bus, slot_function = bus_id.split(":")
    slot, function = slot_function.split(".")
    location_id = int(bus, 16) << 8 | int(slot, 16) << 3 | int(function)
    named = minors if kfd_names_partitions else minors[:1]
    for offset, minor in enumerate(named):
        properties = _kfd_gpu(minor, int(domain, 16), location_id, unique_id)
        kfd_node(sys_dir, first_kfd_node + offset, properties)


# --- the builder ------------------------------------------------------------------------

# The GPU Operator's shape: the driver container's root at /run/nvidia/driver, its /dev the
# container's own.
OPERATOR_ROOT = "/run/nvidia/driver"
OPERATOR_NODES: dict[str, tuple[int, int]] = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-uvm": (509, 0),
    "nvidia-uvm-tools": (509, 1),
}


class FakeHost:
    """A fake host: `root` (--root), `proc` (--proc) and `sys` (--sys), built and changed from
    this process. Mounting needs a private mount namespace of this process's own."""

    def __init__(self, root: Path, proc: Path, sys: Path | None = None) -> None:
        self.root = root
        self.proc = proc
        self.sys = sys if sys is not None else root.parent / "sys"

    @classmethod
    def under(cls, base: Path) -> FakeHost:
        """The usual shape: base/root, base/proc, base/sys."""
        return cls(base / "root", base / "proc", base / "sys")

    def fs(self, path: str | Path) -> Path:
        """A host path (str) inside the root, or a `Path` as it is."""
        if isinstance(path, Path):
            return path
        return self.root / path.lstrip("/")

    # -- mounts ----------------------------------------------------------------------------

    def tmpfs(self, path: str | Path, options: str = "mode=755", source: str = "tmpfs") -> None:
        target = self.fs(path)
        target.mkdir(parents=True, exist_ok=True)
        mount(source, target, "tmpfs", 0, options)

    def mount(self, path: str | Path, fstype: str, source: str, options: str = "") -> None:
        """Any file system, through mount(8): it turns words such as `nosuid` or `ro` into
        flags."""
        target = self.fs(path)
        target.mkdir(parents=True, exist_ok=True)
        flags = ["-o", options] if options else []
        command = ["mount", "-t", fstype, *flags, source, str(target)]
        subprocess.run(command, check=True, timeout=_MOUNT_TIMEOUT, capture_output=True)

    def remount(self, path: str | Path, options: str) -> None:
        """Change a mount's flags (`nodev`, `ro`, ...) in place, through mount(8)."""
        command = ["mount", "-o", f"remount,{options}", str(self.fs(path))]
        subprocess.run(command, check=True, timeout=_MOUNT_TIMEOUT, capture_output=True)

    def bind(self, source: str | Path, target: str | Path) -> None:
        mount(str(self.fs(source)), self.fs(target), None, MS_BIND)

    def move(self, source: str | Path, target: str | Path) -> None:
        """Move the mount at `source` onto `target` in one step (mount --move)."""
        mount(str(self.fs(source)), self.fs(target), None, MS_MOVE)

    def umount(self, path: str | Path, *, lazy: bool = True) -> None:
        umount(self.fs(path), lazy=lazy)

    def bind_file(self, path: str | Path, text: str, staging: Path) -> None:
        """Bind a file written at `staging` (outside the root) over `path`."""
        write_text(staging, text)
        target = self.fs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        mount(str(staging), target, None, MS_BIND)

    # -- files and nodes -------------------------------------------------------------------

    def mkdir(self, path: str | Path) -> None:
        self.fs(path).mkdir(parents=True, exist_ok=True)

    def mknod(
        self, path: str | Path, major: int, minor: int, mode: int = 0o666, *, block: bool = False
    ) -> None:
        mknod(self.fs(path), major, minor, mode, block=block)

    def nodes(
        self, dev: str | Path, nodes: Mapping[str, tuple[int, int]], mode: int = 0o666
    ) -> None:
        """A dev root holding `name: (major, minor)` nodes."""
        directory = self.fs(dev)
        directory.mkdir(parents=True, exist_ok=True)
        make_nodes(directory, nodes, mode)

    def chmod(self, path: str | Path, mode: int) -> None:
        os.chmod(self.fs(path), mode)

    def rename(self, source: str | Path, target: str | Path) -> None:
        os.rename(self.fs(source), self.fs(target))

    def unlink(self, path: str | Path) -> None:
        os.unlink(self.fs(path))

    def symlink(self, path: str | Path, target: str) -> None:
        link = self.fs(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)

    def write(self, path: str | Path, text: str, *, atomic: bool = True) -> None:
        write_text(self.fs(path), text, atomic=atomic)

    def fifo(self, path: str | Path) -> None:
        target = self.fs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(target)

    def storm(self, path: str | Path, pairs: int) -> None:
        """Two inotify events per pair (IN_CREATE, IN_DELETE), as fast as the kernel takes
        them."""
        directory = self.fs(path)
        for index in range(pairs):
            entry = directory / f"s{index}"
            os.symlink("x", entry)
            os.unlink(entry)

    # -- /proc, the GPU Operator's files, the fake sysfs -----------------------------------

    def proc_text(self, relative: str, text: str, *, atomic: bool = True) -> None:
        write_text(self.proc / relative, text, atomic=atomic)

    def proc_devices(
        self, majors: Mapping[str, int], block: Mapping[str, int] | None = None
    ) -> None:
        self.proc_text("devices", proc_devices_text(majors, block))

    def driver_version(self, version: str = DRIVER_VERSION) -> None:
        self.proc_text("driver/nvidia/version", version_text(version))

    def gpu(
        self, bus_id: str = BUS_ID, minor: int = 0, *, model: str = H200, uuid: str = GPU_UUID
    ) -> None:
        self.proc_text(
            f"driver/nvidia/gpus/{bus_id}/information",
            information_text(bus_id, minor, model=model, uuid=uuid),
        )

    def nvidia_proc(
        self,
        majors: Mapping[str, int] | None = None,
        gpus: tuple[tuple[str, int], ...] = ((BUS_ID, 0),),
        version: str = DRIVER_VERSION,
    ) -> None:
        """A loaded NVIDIA driver: /proc/devices, the version and each (bus id, minor) GPU."""
        self.proc_devices({"nvidia": 195} if majors is None else majors)
        self.driver_version(version)
        for bus_id, minor in gpus:
            self.gpu(bus_id, minor)

    def driver_ready(self, text: str, validations: str = "/run/nvidia/validations") -> None:
        self.write(f"{validations}/driver-ready", text)

    def drm_render(self, minor: int, bus_id: str, **options: Any) -> None:
        """A render node in the fake sysfs (see `drm_render`)."""
        drm_render(self.sys, minor, bus_id, **options)

    def drm_partition(self, minor: int, number: int, **options: Any) -> None:
        """A compute partition's render node in the fake sysfs (see `drm_partition`)."""
        drm_partition(self.sys, minor, number, **options)

    def kfd_node(self, index: int, properties: Mapping[str, int]) -> None:
        kfd_node(self.sys, index, properties)

    def partitioned_gpu(self, **options: Any) -> None:
        """An MI300-class GPU split into partitions (see `partitioned_gpu`)."""
        partitioned_gpu(self.sys, **options)

    def sys_link(self, relative: str, target: str) -> None:
        _sys_link(self.sys, relative, target)

    def operator_host(
        self, nodes: Mapping[str, tuple[int, int]] = OPERATOR_NODES, *, mounted: bool = True
    ) -> None:
        """An empty host /dev and the driver container's root at /run/nvidia/driver (a tmpfs
        when `mounted`) whose dev/ holds `nodes`."""
        self.mkdir("/dev")
        self.mkdir(self.sys)
        if mounted:
            self.tmpfs(OPERATOR_ROOT)
        self.nodes(f"{OPERATOR_ROOT}/dev", nodes)

    # -- one JSON command --------------------------------------------------------------------

    def execute(self, command: Mapping[str, Any]) -> None:
        """`{"op": NAME, ...}`: the method NAME with the other keys as arguments; the paths
        (`path`, `source`, `staging`) are paths as this process sees them."""
        arguments = dict(command)
        op = arguments.pop("op")
        if op.startswith("_") or op in _NOT_COMMANDS or not hasattr(self, op):
            raise ValueError(f"unknown op {op!r}")
        paths = ("path", "source", "staging", *(("target",) if op in _MOVES else ()))
        for key in paths:
            if key in arguments:
                arguments[key] = Path(arguments[key])
        getattr(self, op)(**arguments)


# The commands whose `target` is a path (for the others it is a link's text).
_MOVES = frozenset({"bind", "move", "rename"})
# Public names that are no commands.
_NOT_COMMANDS = frozenset({"execute", "fs", "under", "root", "proc", "sys"})
