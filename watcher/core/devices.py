"""The device families (NVIDIA, AMD), as data, and the `/proc/devices` parser.

Adding a node type means adding a `NodeSpec`; adding a family means adding a `Family`: the
scanner (`core/scan.py`), the probe (`probe.py`) and the daemon's event filter only walk
these tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from watcher.core.names import FamilyName, Kind, Severity

__all__ = [
    "AMD",
    "FAMILIES",
    "KFD_TOPOLOGY_NODES",
    "NVIDIA",
    "Expected",
    "Family",
    "NodeSpec",
    "ProcDevicesError",
    "amd_unique_id",
    "parse_kfd_properties",
    "parse_proc_devices",
    "pci_address",
]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One kind of node: how its name looks, which major and minor the driver gives it.

    `pattern` matches the whole name relative to the dev root. When `minor` is None the
    expected minor is the number captured by the pattern's `n` group (`nvidia3` is 195:3).
    """

    kind: Kind
    pattern: re.Pattern[str]
    majors: tuple[str, ...]
    minor: int | None = None
    # Nodes that several drivers make (DRM render nodes): the node is the family's only when
    # <sys>/class/drm/<its basename>/device/driver is a directory of this name.
    sys_driver: str | None = None

    def expected_minor(self, match: re.Match[str]) -> int:
        if self.minor is not None:
            return self.minor
        return int(match.group("n"))


@dataclass(frozen=True, slots=True)
class Expected:
    """A node the driver should have made: `missing-node` at `severity` when it is absent.

    `when_major`: expected only while that name is registered in /proc/devices (None: always,
    once the driver is loaded). `why` ends the message "<path> is missing although <why>".
    """

    name: str
    severity: Literal["error", "warning"]
    why: str
    when_major: str | None = None


@dataclass(frozen=True, slots=True)
class Family:
    """A driver's node family, as data: the scanner, the probe and the daemon's event filter
    walk this and name nothing of their own. Adding a family is adding one of these.
    """

    specs: tuple[NodeSpec, ...]
    subdirs: tuple[str, ...]
    # Names in /proc/devices that prove the driver is loaded.
    core_majors: tuple[str, ...]
    # `family` of its devices, GPUs and problems, and the map's object that describes it
    # (`driver` for NVIDIA, as the contract has always had it; `amd`).
    name: FamilyName = "nvidia"
    section: Literal["driver", "amd"] = "driver"
    # None: the dev root is chosen among the driver roots and driver-ready (NVIDIA's GPU
    # Operator); a path: the family's nodes are always there (AMD: /dev, made by udev).
    fixed_dev_root: str | None = None
    # Where its GPUs are listed: one directory per GPU under `proc_gpus` ("proc"), or the
    # render nodes of `<sys>/class/drm` whose driver is `sys_driver` ("sys").
    gpus_from: Literal["proc", "sys"] = "proc"
    sys_driver: str | None = None
    # How loud `driver-not-loaded` is when the family is present but its driver is not.
    not_loaded_severity: Severity = "error"
    # The end of the `no-device-root` message: what to do.
    no_root_hint: str = "if the driver runs in a container, set driver_roots to its root"
    # How people call the driver in messages ("the NVIDIA kernel driver is not loaded").
    display: str = "NVIDIA"
    # The node whose validity picks the dev root (a valid one proves the root is live).
    control: str = "nvidiactl"
    # The node of GPU minor N, named from the driver's per-GPU /proc information.
    gpu_node: str = "nvidia{minor}"
    # Always expected once loaded, and expected while a module's major is registered.
    expected: tuple[Expected, ...] = ()
    # What re-creates missing or stale nodes, for messages.
    recreate: str = "nvidia-modprobe"
    # How to load the driver, for the driver-not-loaded message.
    load_hint: str = "modprobe nvidia"
    # The driver's files under --proc: its version line, and one directory per GPU.
    proc_version: str | None = "driver/nvidia/version"
    proc_gpus: str = "driver/nvidia/gpus"
    # driver-ready (GPU Operator) keys naming the driver root and the dev root's base.
    ready_root_key: str = "NVIDIA_DRIVER_ROOT"
    ready_dev_key: str = "NVIDIA_DEV_ROOT"
    # The tool that opens the control node and misses it outside /dev, for `not-in-dev`.
    opened_by: str = "CRIU's CUDA plugin"
    # Names in /proc/devices that are the driver's whatever spec knows them (NVIDIA's modules
    # all start `nvidia`): without the daemon, a tree holding one such node stops a dump.
    major_prefix: str | None = None
    # The devices of a GPU's compute partitions, which no driver is bound to (the pattern's
    # `k` group is the partition's number): a `sys_driver` node on one is the family's when
    # the driver's topology names its minor.
    partition_device: re.Pattern[str] | None = None

    def partition_of(self, device_name: str | None) -> int | None:
        """K when a device called `device_name` is one of the family's partitions."""
        if self.partition_device is None or device_name is None:
            return None
        found = self.partition_device.fullmatch(device_name)
        return int(found.group("k")) if found is not None else None

    # The kernel modules whose load or unload (a uevent, `DEVPATH=/module/<name>`) may
    # register or drop a major: a rescan follows each (watcher.sources.uevents).
    modules: tuple[str, ...] = ()

    def gpu_node_name(self, minor: int) -> str:
        return self.gpu_node.format(minor=minor)

    def names_entry(self, name: str) -> bool:
        """Whether a directory entry called `name` (in a dev root or one of the family's
        subdirectories) can be one of the family's nodes or subdirectories."""
        return (
            name in self.subdirs
            or self.match(name) is not None
            or any(self.match(f"{subdir}/{name}") is not None for subdir in self.subdirs)
        )

    def match(self, name: str) -> tuple[NodeSpec, int] | None:
        """The spec a name belongs to and the minor it should carry, or None."""
        for spec in self.specs:
            found = spec.pattern.fullmatch(name)
            if found is not None:
                return spec, spec.expected_minor(found)
        return None

    def registered_major(self, spec: NodeSpec, majors: dict[str, int]) -> int | None:
        for name in spec.majors:
            if name in majors:
                return majors[name]
        return None

    def loaded(self, majors: dict[str, int]) -> bool:
        return any(name in majors for name in self.core_majors)

    def wanted(self, name: str, sys_driver_of: dict[str, str]) -> bool:
        """Whether a node called `name` is the family's, given the driver of each DRM node
        by basename (`renderD128` -> `amdgpu`) as `<sys>/class/drm` tells it."""
        found = self.match(name)
        if found is None:
            return False
        spec = found[0]
        return spec.sys_driver is None or sys_driver_of.get(name.rpartition("/")[2]) == (
            spec.sys_driver
        )


# Drivers before 550.40 registered 195 as "nvidia-frontend"; later ones as "nvidia".
_CORE = ("nvidia", "nvidia-frontend")
_NUMBER = r"(?P<n>0|[1-9][0-9]{0,5})"

NVIDIA = Family(
    specs=(
        NodeSpec("control", re.compile(r"nvidiactl"), _CORE, 255),
        NodeSpec("modeset", re.compile(r"nvidia-modeset"), _CORE, 254),
        NodeSpec("gpu", re.compile(rf"nvidia{_NUMBER}"), _CORE),
        NodeSpec("uvm", re.compile(r"nvidia-uvm"), ("nvidia-uvm",), 0),
        NodeSpec("uvm-tools", re.compile(r"nvidia-uvm-tools"), ("nvidia-uvm",), 1),
        NodeSpec("cap", re.compile(rf"nvidia-caps/nvidia-cap{_NUMBER}"), ("nvidia-caps",)),
        NodeSpec(
            "imex-channel",
            re.compile(rf"nvidia-caps-imex-channels/channel{_NUMBER}"),
            ("nvidia-caps-imex-channels",),
        ),
        NodeSpec("nvswitch-control", re.compile(r"nvidia-nvswitchctl"), ("nvidia-nvswitch",), 255),
        NodeSpec("nvswitch", re.compile(rf"nvidia-nvswitch{_NUMBER}"), ("nvidia-nvswitch",)),
    ),
    subdirs=("nvidia-caps", "nvidia-caps-imex-channels"),
    core_majors=_CORE,
    major_prefix="nvidia",
    expected=(
        Expected("nvidiactl", "error", "every CUDA process opens it"),
        Expected("nvidia-uvm", "error", "the nvidia-uvm module is loaded", "nvidia-uvm"),
        Expected("nvidia-uvm-tools", "warning", "the nvidia-uvm module is loaded", "nvidia-uvm"),
    ),
    modules=("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm", "nvidia_peermem"),
)


# AMD, for CRIU's amdgpu plugin: it opens /dev/kfd and /dev/dri/renderD<minor> (no driver
# root: udev makes these in the host's /dev). `drm` is the DRM core's major (226), which
# every DRM driver's render nodes share: the sysfs driver link tells amdgpu's apart.
AMD = Family(
    specs=(
        NodeSpec("kfd", re.compile(r"kfd"), ("kfd",), 0),
        NodeSpec(
            "render", re.compile(r"dri/renderD(?P<n>[1-9][0-9]{0,5})"), ("drm",), None, "amdgpu"
        ),
    ),
    subdirs=("dri",),
    core_majors=("kfd",),
    name="amd",
    section="amd",
    fixed_dev_root="/dev",
    gpus_from="sys",
    sys_driver="amdgpu",
    # amdgpu without kfd still drives displays; only compute (and CRIU's plugin) needs kfd.
    not_loaded_severity="warning",
    no_root_hint=(
        "udev makes /dev/kfd and /dev/dri/renderD* when amdgpu loads (is --root right? "
        "run `udevadm trigger` to have them made again)"
    ),
    display="AMD",
    control="kfd",
    gpu_node="dri/renderD{minor}",
    expected=(Expected("kfd", "error", "the kfd driver is registered in /proc/devices", "kfd"),),
    recreate="`udevadm trigger` (or reload amdgpu)",
    load_hint="modprobe amdgpu, on a kernel built with CONFIG_HSA_AMD",
    proc_version=None,
    proc_gpus="",
    ready_root_key="",
    ready_dev_key="",
    opened_by="CRIU's amdgpu plugin",
    # MI300-class GPUs split into compute partitions (CPX and other modes) give each extra
    # partition a render node on a platform device: `amdgpu_xcp.K` (amdgpu_xcp_drv.c calls
    # platform_device_register_simple("amdgpu_xcp", K)); newer kernels name it
    # `amdgpu_xcp_K` (registered with id -1). Neither has a `driver` link.
    partition_device=re.compile(r"amdgpu_xcp[._](?P<k>0|[1-9][0-9]{0,3})"),
    # kfd is part of amdgpu: its major comes and goes with the module.
    modules=("amdgpu",),
)

# KFD's topology (<sys>/class/kfd/kfd/topology/nodes/N/properties, one `name value` line per
# property, values in decimal): a GPU node names its render minor (`drm_render_minor`; a
# partition's own), the PCI address of the physical GPU (`domain`, and `location_id`, i.e.
# bus << 8 | devfn) and that GPU's `unique_id`. CPU nodes say `drm_render_minor 0`.
KFD_TOPOLOGY_NODES = "class/kfd/kfd/topology/nodes"


def parse_kfd_properties(text: str) -> dict[str, int]:
    """The integer properties of one KFD topology node; lines of another shape are skipped
    (a newer kernel may add some)."""
    properties: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isascii() and fields[1].isdigit():
            properties.setdefault(fields[0], int(fields[1]))
    return properties


def pci_address(domain: int, location_id: int) -> str:
    """`0000:c1:00.0` from KFD's `domain` and `location_id`, as sysfs names PCI devices."""
    bus, slot, function = location_id >> 8 & 0xFF, location_id >> 3 & 0x1F, location_id & 0x7
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


def amd_unique_id(value: int) -> str | None:
    """KFD's decimal `unique_id` as amdgpu's sysfs `unique_id` writes it (16 hex digits);
    None for 0, which both use for "unknown"."""
    return f"{value:016x}" if 0 < value < 1 << 64 else None


# Every family the scanner, the probe and the event filter walk, NVIDIA first: it is the
# one reported when no family shows any sign of life on the host.
FAMILIES = (NVIDIA, AMD)


class ProcDevicesError(ValueError):
    pass


def parse_proc_devices(text: str) -> dict[str, int]:
    """Character-device majors by name from `/proc/devices`.

    Only the "Character devices:" section counts: a block driver of the same name must not
    lend its major. Names are whole tokens, so `nvidia-caps` never matches
    `nvidia-caps-imex-channels`. A name registered twice keeps its first major.
    """
    majors: dict[str, int] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            section = line[:-1].strip().lower()
            continue
        if section != "character devices":
            continue
        fields = line.split(None, 1)
        if len(fields) != 2 or not (fields[0].isascii() and fields[0].isdigit()):
            shown = raw if len(raw) <= 120 else raw[:117] + "..."  # a line may be 1 MiB
            raise ProcDevicesError(f"line {number}: expected '<major> <name>', got {shown!r}")
        majors.setdefault(fields[1].strip(), int(fields[0]))
    return majors
