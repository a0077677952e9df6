"""What one scan reads of the host, as plain values: the host view (where the host is
visible), the lstat results of the dev roots, the driver-root candidates, the sysfs and KFD
entries. `watcher.probe` fills a `HostSnapshot`; `watcher.core.scan` decides from it.

Pure: no filesystem access here.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Literal

from watcher.core.devices import (
    FAMILIES,
    NVIDIA,
    Family,
)
from watcher.core.mountinfo import MountTable, PathFilter
from watcher.core.procfs import GpuInformation, parse_key_values

__all__ = [
    "CUDA_CHECKPOINT_HOST_PATHS",
    "DEFAULT_DRIVER_ROOTS",
    "DEFAULT_VALIDATIONS_DIR",
    "Candidate",
    "DevRootListing",
    "DrmNode",
    "FileType",
    "HostSnapshot",
    "HostView",
    "KfdNode",
    "NodeEntry",
    "candidates_for",
    "cuda_checkpoint_candidates",
    "dev_root_of",
    "family_listing",
    "partitions",
    "sys_drivers",
]

DEFAULT_DRIVER_ROOTS = ("/", "/run/nvidia/driver")


DEFAULT_VALIDATIONS_DIR = "/run/nvidia/validations"


FileType = Literal["char", "block", "symlink", "dir", "file", "other"]


@dataclass(frozen=True, slots=True)
class HostView:
    """Where the host is visible and which driver roots to consider (all host paths)."""

    root: str = "/"
    proc: str = "/proc"
    mountinfo: str = "/proc/self/mountinfo"
    driver_roots: tuple[str, ...] = DEFAULT_DRIVER_ROOTS
    driver_roots_configured: bool = False
    validations_dir: str = DEFAULT_VALIDATIONS_DIR
    # Where sysfs is read (`class/drm`, for the AMD family); not under root, as proc is not.
    sys: str = "/sys"
    # The mount table is another process's (`/proc/PID/mountinfo`, PID not us: see
    # watcher.config.foreign_mount_table): its mount points are host paths already, while
    # the files are still reached under root. False: they are this process's paths,
    # translated by removing root.
    foreign_table: bool = False

    def fs_path(self, host_path: str) -> str:
        """Where a host path is visible to this process."""
        if self.root == "/":
            return host_path
        return self.root.rstrip("/") + host_path if host_path != "/" else self.root

    def host_path(self, fs_path: str) -> str | None:
        """The host path of a path seen by this process, or None when it lies outside root."""
        if self.root == "/":
            return fs_path
        root = self.root.rstrip("/")
        if fs_path == root:
            return "/"
        if fs_path.startswith(root + "/"):
            return fs_path[len(root) :]
        return None

    def table_path(self, host_path: str) -> str:
        """How a host path is written in the mount table."""
        return host_path if self.foreign_table else self.fs_path(host_path)

    def mount_point(self, table_path: str) -> str | None:
        """The host path of a mount point in the table, or None when it lies outside root."""
        return table_path if self.foreign_table else self.host_path(table_path)


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One lstat result in a dev root, for a name that belongs to the family."""

    name: str
    file_type: FileType
    major: int = 0
    minor: int = 0
    mode: int = 0
    link_target: str | None = None


@dataclass(frozen=True, slots=True)
class DevRootListing:
    dev_root: str
    exists: bool
    entries: tuple[NodeEntry, ...] = ()
    error: str | None = None

    def entry(self, name: str) -> NodeEntry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    @property
    def has_nodes(self) -> bool:
        return any(entry.file_type in ("char", "block") for entry in self.entries)


@dataclass(frozen=True, slots=True)
class Candidate:
    driver_root: str
    dev_root: str
    from_validations: bool


@dataclass(frozen=True, slots=True)
class DrmNode:
    """One render node of `<sys>/class/drm` (`renderD128`): its driver's name (the
    directory `device/driver` links to), and its device's PCI address, product name and
    unique id (None where sysfs does not say)."""

    name: str
    minor: int
    driver: str | None
    bus_id: str | None = None
    product_name: str | None = None
    unique_id: str | None = None


@dataclass(frozen=True, slots=True)
class KfdNode:
    """One GPU node of KFD's topology: the render minor it names (a partition's own) and the
    physical GPU's PCI domain, `location_id` (bus << 8 | devfn) and unique id (0: unknown)."""

    render_minor: int
    domain: int
    location_id: int
    unique_id: int = 0


@dataclass(slots=True)
class HostSnapshot:
    """Everything one scan read, gathered before any decision is made."""

    proc_devices: str | None
    proc_devices_error: str | None
    driver_version_text: str | None
    gpu_information: list[GpuInformation]
    mounts: MountTable
    mounts_error: str | None
    driver_ready: str | None
    candidates: list[Candidate]
    listings: dict[str, DevRootListing]
    # What this scan read, for the daemon's watches and mount judge (`scan_paths`).
    paths: ScanPaths
    # Why a driver-ready that is there could not be read (a FIFO, a link, too large).
    driver_ready_error: str | None = None
    driver_roots_existing: set[str] = field(default_factory=set)
    # Host paths of the cuda-checkpoint candidates (`cuda_checkpoint_candidates`) that are
    # executable files.
    cuda_checkpoints: frozenset[str] = frozenset()
    # The render nodes <sys>/class/drm lists, whatever their driver.
    sys_drm: tuple[DrmNode, ...] = ()
    # KFD's GPU nodes, read only when a render node sits on a compute partition's device.
    kfd_nodes: tuple[KfdNode, ...] = ()


@dataclass(frozen=True, slots=True)
class ScanPaths:
    """The host paths one scan reads, derived once from the view and the candidates: what
    the probe lists, what the daemon watches, which mounts can change the map."""

    # The candidates' dev roots, then /dev and the families' fixed dev roots (AMD's).
    dev_roots: tuple[str, ...]
    driver_roots: tuple[str, ...]
    validations_dir: str

    def watched(self) -> tuple[str, ...]:
        """The directories watched for nodes and driver-ready (host paths)."""
        return tuple(dict.fromkeys([*self.dev_roots, self.validations_dir]))

    def listed_mounts(self, view: HostView) -> PathFilter:
        """The mount-table lines a scan needs: on, above or below a dev root, as the table
        writes them."""
        return PathFilter(view.table_path(dev_root) for dev_root in self.dev_roots)


def scan_paths(
    view: HostView, candidates: list[Candidate], families: tuple[Family, ...]
) -> ScanPaths:
    dev_roots = [candidate.dev_root for candidate in candidates]
    # /dev is always looked at: `not-in-dev` is about /dev, and it is AMD's dev root.
    for fixed in ["/dev", *(family.fixed_dev_root for family in families)]:
        if fixed is not None and fixed not in dev_roots:
            dev_roots.append(fixed)
    return ScanPaths(
        dev_roots=tuple(dev_roots),
        driver_roots=tuple(candidate.driver_root for candidate in candidates),
        validations_dir=view.validations_dir,
    )


CUDA_CHECKPOINT_HOST_PATHS = ("/usr/local/bin/cuda-checkpoint", "/usr/bin/cuda-checkpoint")


def cuda_checkpoint_candidates(candidates: list[Candidate]) -> list[str]:
    """Where a cuda-checkpoint may be: each driver root's usr/bin, then the host's."""
    paths = [posixpath.join(c.driver_root, "usr/bin/cuda-checkpoint") for c in candidates]
    return list(dict.fromkeys([*paths, *CUDA_CHECKPOINT_HOST_PATHS]))


def dev_root_of(driver_root: str) -> str:
    return posixpath.join(driver_root, "dev")


def _usable_path(path: str) -> bool:
    return path.startswith("/") and "\0" not in path


def candidates_for(
    view: HostView, driver_ready: str | None, family: Family = NVIDIA
) -> list[Candidate]:
    """Candidate roots in order: the one named by driver-ready first, then `driver_roots`."""
    found: list[Candidate] = []
    if driver_ready is not None:
        values = parse_key_values(driver_ready)
        driver_root = values.get(family.ready_root_key, "")
        # A NUL cannot be in a path: passed on, it raised ValueError in every scan.
        if _usable_path(driver_root):
            dev_base = values.get(family.ready_dev_key, "")
            if not _usable_path(dev_base):  # absent, empty or relative: the driver root
                dev_base = driver_root
            found.append(
                Candidate(
                    posixpath.normpath(driver_root),
                    dev_root_of(posixpath.normpath(dev_base)),
                    True,
                )
            )
    for root in view.driver_roots:
        normal = posixpath.normpath(root)
        if all(candidate.dev_root != dev_root_of(normal) for candidate in found):
            found.append(Candidate(normal, dev_root_of(normal), False))
    return found


def sys_drivers(snapshot: HostSnapshot) -> dict[str, str]:
    """The driver of each render node by basename; a compute partition's node, which has no
    driver link, is its family's driver's when KFD names its minor."""
    drivers = {node.name: node.driver for node in snapshot.sys_drm if node.driver is not None}
    for family in FAMILIES:
        if family.sys_driver is not None:
            for node, _, _ in partitions(snapshot, family):
                drivers[node.name] = family.sys_driver
    return drivers


def partitions(snapshot: HostSnapshot, family: Family) -> list[tuple[DrmNode, int, KfdNode]]:
    """(render node, K, KFD node) of each compute partition of the family's GPUs that KFD's
    topology names; a partition device no KFD node names (the GPU is not split) is left out."""
    if family.partition_device is None or not snapshot.kfd_nodes:
        return []
    by_minor = {kfd.render_minor: kfd for kfd in snapshot.kfd_nodes}
    found: list[tuple[DrmNode, int, KfdNode]] = []
    for node in snapshot.sys_drm:
        number = family.partition_of(node.bus_id) if node.driver is None else None
        kfd = by_minor.get(node.minor)
        if number is not None and kfd is not None:
            found.append((node, number, kfd))
    return found


def family_listing(snapshot: HostSnapshot, family: Family, dev_root: str) -> DevRootListing:
    """The dev root's entries that are this family's (the probe lists every family's)."""
    listing = snapshot.listings.get(dev_root)
    if listing is None:
        return DevRootListing(dev_root, exists=False)
    drivers = sys_drivers(snapshot)
    return DevRootListing(
        listing.dev_root,
        listing.exists,
        tuple(entry for entry in listing.entries if family.wanted(entry.name, drivers)),
        listing.error,
    )
