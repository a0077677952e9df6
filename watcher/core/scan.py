"""Build the map from one snapshot of the host: roots -> nodes -> mounts -> problems.

Pure: `build_map` takes what `watcher.probe` read (texts and lstat results) and returns a
`DeviceMap`. Nothing here touches the filesystem, so every decision is table-testable.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from watcher.core.devices import (
    FAMILIES,
    NVIDIA,
    Family,
    ProcDevicesError,
    amd_unique_id,
    parse_proc_devices,
    pci_address,
)
from watcher.core.model import (
    Amd,
    Device,
    DeviceMap,
    Driver,
    DriverSource,
    FamilyName,
    Gpu,
    Mount,
    Problem,
    ProblemCode,
    Severity,
)
from watcher.core.mountinfo import MountEntry, MountTable
from watcher.core.procfs import GpuInformation, parse_driver_version, parse_key_values

__all__ = [
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
    "build_map",
    "candidates_for",
    "dev_root_of",
    "printable",
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
    # watcher.hostview): its mount points are host paths already, while the files are still
    # reached under root. False: they are this process's paths, translated by removing root.
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


CUDA_CHECKPOINT_HOST_PATHS = ("/usr/local/bin/cuda-checkpoint", "/usr/bin/cuda-checkpoint")


def cuda_checkpoint_candidates(candidates: list[Candidate]) -> list[str]:
    """Where a cuda-checkpoint may be: each driver root's usr/bin, then the host's."""
    paths = [posixpath.join(c.driver_root, "usr/bin/cuda-checkpoint") for c in candidates]
    return list(dict.fromkeys([*paths, *CUDA_CHECKPOINT_HOST_PATHS]))


def _cuda_checkpoint(chosen: Candidate | None, found: frozenset[str]) -> str | None:
    first = [posixpath.join(chosen.driver_root, "usr/bin/cuda-checkpoint")] if chosen else []
    return next((path for path in (*first, *CUDA_CHECKPOINT_HOST_PATHS) if path in found), None)


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


class _Problems:
    def __init__(self, family: FamilyName) -> None:
        self.items: list[Problem] = []
        self.family: FamilyName = family  # of the problems added next

    def add(
        self, code: ProblemCode, severity: Severity, message: str, path: str | None = None
    ) -> None:
        self.items.append(
            Problem(code=code, severity=severity, message=message, path=path, family=self.family)
        )

    def sorted(self) -> tuple[Problem, ...]:
        rank = {"error": 0, "warning": 1, "info": 2}
        return tuple(
            sorted(self.items, key=lambda p: (rank[p.severity], p.code, p.path or "", p.message))
        )


def _host_mount(view: HostView, entry: MountEntry) -> Mount:
    # A mount point outside --root is the mount that holds root itself: "/" in host terms.
    mount_point = view.mount_point(entry.mount_point) or "/"
    return Mount(
        id=entry.id,
        mount_point=mount_point,
        fstype=entry.fstype,
        source=entry.source,
        options=entry.options,
        nodev=entry.nodev,
    )


def _mount_of(view: HostView, mounts: MountTable, host_path: str) -> Mount | None:
    entry = mounts.resolve(view.table_path(host_path))
    return _host_mount(view, entry) if entry is not None else None


@dataclass(frozen=True, slots=True)
class _Verdict:
    device: Device
    problems: tuple[tuple[ProblemCode, str], ...]
    # Whether the node's driver is up, so that its problems are worth reporting (otherwise
    # driver-not-loaded says it all).
    live: bool


@dataclass(frozen=True, slots=True)
class _Judge:
    """Decides whether nodes are valid, given what the driver registered and the mounts."""

    view: HostView
    family: Family
    majors: dict[str, int]
    loaded: bool
    mounts: MountTable

    def judge(self, dev_root: str, entry: NodeEntry) -> _Verdict | None:
        """A node's Device record and what is wrong with it; None for names outside the family."""
        matched = self.family.match(entry.name)
        if matched is None or entry.file_type not in ("char", "block"):
            return None
        spec, expected_minor = matched
        path = posixpath.join(dev_root, entry.name)
        mount = _mount_of(self.view, self.mounts, path)
        problems: list[tuple[ProblemCode, str]] = []
        if entry.file_type != "char":
            problems.append(
                (
                    "not-char-device",
                    f"{path} is a block device; the driver only makes character devices: remove "
                    f"it and let the driver (or {self.family.recreate}) recreate it",
                )
            )
        registered = self.family.registered_major(spec, self.majors)
        # A node of a major that every DRM driver shares (render nodes) lives and dies with
        # that major, not with the family's core driver (amdgpu renders without kfd).
        live = self.loaded or spec.sys_driver is not None
        if live and registered is None:
            problems.append(
                (
                    "wrong-major",
                    f"{path} has major {entry.major} but {'/'.join(spec.majors)} is not registered "
                    "in /proc/devices: the node is stale (its kernel module is not loaded)",
                )
            )
        elif registered is not None and entry.major != registered:
            problems.append(
                (
                    "wrong-major",
                    f"{path} has major {entry.major} but the driver registered {registered} for "
                    f"{spec.majors[0]}: the node is stale (left from an earlier driver load); "
                    "recreate it or restart the driver container",
                )
            )
        if entry.minor != expected_minor:
            problems.append(
                (
                    "wrong-minor",
                    f"{path} has minor {entry.minor}, expected {expected_minor}: recreate the node",
                )
            )
        if mount is not None and mount.nodev:
            problems.append(
                (
                    "nodev-mount",
                    f"{path} lies on {mount.mount_point}, mounted nodev: opening it fails with "
                    "EACCES; remount without nodev",
                )
            )
        device = Device(
            name=entry.name,
            path=path,
            kind=spec.kind,
            major=entry.major,
            minor=entry.minor,
            mode=f"{entry.mode & 0o7777:04o}",
            valid=live and registered is not None and not problems,
            mount=mount,
        )
        return _Verdict(device, tuple(problems), live)

    def verdicts(self, listing: DevRootListing) -> Iterator[_Verdict]:
        for entry in listing.entries:
            verdict = self.judge(listing.dev_root, entry)
            if verdict is not None:
                yield verdict

    def has_valid_control(self, listing: DevRootListing) -> bool:
        control = listing.entry(self.family.control)
        if control is None:
            return False
        verdict = self.judge(listing.dev_root, control)
        return verdict is not None and verdict.device.valid


@dataclass(frozen=True, slots=True)
class _FamilyScan:
    """What one family contributes to the map."""

    loaded: bool
    chosen: Candidate | None
    devices: list[Device]
    gpus: list[Gpu]


def build_map(
    view: HostView,
    snapshot: HostSnapshot,
    *,
    generation: int,
    updated: str,
    families: tuple[Family, ...] = FAMILIES,
) -> DeviceMap:
    """The map of one snapshot: each family adds its devices, GPUs and problems.

    A family that shows no sign of itself on the host (`_present`) adds nothing but its
    empty section: an AMD host is not told that NVIDIA's driver is missing, nor an NVIDIA
    host about AMD. When no family shows any sign, the first (NVIDIA) reports what it
    misses, as it always has: that is the host where something is wrong.
    """
    problems = _Problems(families[0].name)
    majors, unparsed = _majors(view, snapshot, problems)
    _mount_table_problems(view, snapshot, problems)
    present = [family for family in families if _present(snapshot, family, majors)]
    # What is about no family (the mount table, /proc/devices) goes with the first family the
    # host has: an AMD host's unreadable mount table is not an NVIDIA problem.
    owner = (present or [families[0]])[0].name
    problems.items = [msgspec.structs.replace(item, family=owner) for item in problems.items]
    scans: dict[str, _FamilyScan] = {}
    for family in families:
        problems.family = family.name
        scans[family.section] = _scan_family(
            view,
            snapshot,
            family,
            majors,
            problems,
            report=family in present or (not present and family is families[0]),
            unparsed=unparsed,
        )
    empty = _FamilyScan(False, None, [], [])
    nvidia, amd = scans.get("driver", empty), scans.get("amd", empty)
    return printable(
        DeviceMap(
            generation=generation,
            updated=updated,
            driver=Driver(
                loaded=nvidia.loaded,
                version=(
                    parse_driver_version(snapshot.driver_version_text)
                    if snapshot.driver_version_text is not None
                    else None
                ),
                root=nvidia.chosen.driver_root if nvidia.chosen else None,
                dev_root=nvidia.chosen.dev_root if nvidia.chosen else None,
                source=_source(view, nvidia.chosen),
                cuda_checkpoint=_cuda_checkpoint(nvidia.chosen, snapshot.cuda_checkpoints),
            ),
            devices=tuple(
                sorted(
                    (device for found in scans.values() for device in found.devices),
                    key=lambda device: device.name,
                )
            ),
            gpus=tuple(gpu for found in scans.values() for gpu in found.gpus),
            problems=problems.sorted(),
            amd=Amd(loaded=amd.loaded, dev_root=amd.chosen.dev_root if amd.chosen else None),
        )
    )


def _scan_family(
    view: HostView,
    snapshot: HostSnapshot,
    family: Family,
    majors: dict[str, int],
    problems: _Problems,
    *,
    report: bool,
    unparsed: bool,
) -> _FamilyScan:
    """One family's devices and GPUs; its problems when `report` (it is on this host)."""
    loaded = family.loaded(majors)
    if not report:
        problems = _Problems(family.name)  # a family that is not here says nothing
    elif not loaded and not unparsed:
        _not_loaded(view, snapshot, family, problems)
    judge = _Judge(view, family, majors, loaded, snapshot.mounts)
    candidates = _candidates(snapshot, family)
    listings = {
        candidate.dev_root: _family_listing(snapshot, family, candidate.dev_root)
        for candidate in [*candidates, Candidate("/", "/dev", False)]
    }
    chosen = _choose_dev_root(candidates, listings, judge)
    chosen_listing = listings.get(chosen.dev_root) if chosen else None
    devices = _devices(chosen_listing, judge, problems) if chosen_listing is not None else []
    devices = [msgspec.structs.replace(device, family=family.name) for device in devices]
    if chosen is None:
        _no_device_root(snapshot, candidates, family, problems)
    if family.fixed_dev_root is None:
        _driver_root_problems(snapshot, chosen, family, problems)
        if chosen is not None and chosen.dev_root != "/dev":
            _not_in_dev(listings.get("/dev"), chosen, judge, problems)
        if snapshot.driver_ready is not None:
            _check_validations(view, snapshot, chosen, problems, family)
        elif snapshot.driver_ready_error is not None:
            ready_path = posixpath.join(view.validations_dir, "driver-ready")
            problems.add(
                "validations-mismatch",
                "warning",
                f"{ready_path} cannot be read ({snapshot.driver_ready_error}); it was ignored "
                "(the GPU Operator writes a small regular file there, which the daemon must be "
                "able to read: replace what is there, or restart the driver validation)",
                ready_path,
            )
    information = _gpu_information(snapshot, family)
    gpus = _gpus(information, devices, family)
    if loaded and chosen is not None:
        _missing_nodes(
            family,
            chosen,
            chosen_listing,
            majors=majors,
            information=information,
            problems=problems,
        )
    return _FamilyScan(loaded, chosen, devices, gpus)


def _candidates(snapshot: HostSnapshot, family: Family) -> list[Candidate]:
    if family.fixed_dev_root is not None:
        return [Candidate("/", family.fixed_dev_root, False)]
    return snapshot.candidates


def _sys_drivers(snapshot: HostSnapshot) -> dict[str, str]:
    """The driver of each render node by basename; a compute partition's node, which has no
    driver link, is its family's driver's when KFD names its minor."""
    drivers = {node.name: node.driver for node in snapshot.sys_drm if node.driver is not None}
    for family in FAMILIES:
        if family.sys_driver is not None:
            for node, _, _ in _partitions(snapshot, family):
                drivers[node.name] = family.sys_driver
    return drivers


def _partitions(snapshot: HostSnapshot, family: Family) -> list[tuple[DrmNode, int, KfdNode]]:
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


def _family_listing(snapshot: HostSnapshot, family: Family, dev_root: str) -> DevRootListing:
    """The dev root's entries that are this family's (the probe lists every family's)."""
    listing = snapshot.listings.get(dev_root)
    if listing is None:
        return DevRootListing(dev_root, exists=False)
    drivers = _sys_drivers(snapshot)
    return DevRootListing(
        listing.dev_root,
        listing.exists,
        tuple(entry for entry in listing.entries if family.wanted(entry.name, drivers)),
        listing.error,
    )


def _gpu_information(snapshot: HostSnapshot, family: Family) -> list[GpuInformation]:
    if family.gpus_from == "proc":
        return snapshot.gpu_information
    whole = [
        GpuInformation(
            bus_id=node.bus_id or "", model=node.product_name, uuid=node.unique_id, minor=node.minor
        )
        for node in snapshot.sys_drm
        if node.driver is not None and node.driver == family.sys_driver
    ]
    return whole + _partition_information(snapshot, family, whole)


def _partition_information(
    snapshot: HostSnapshot, family: Family, whole: list[GpuInformation]
) -> list[GpuInformation]:
    """A GPU entry per compute partition, with the identity of the physical GPU it belongs
    to: the PCI address KFD gives, and that GPU's model and unique id from its own render
    node (KFD's unique id where sysfs has none)."""
    by_bus = {gpu.bus_id: gpu for gpu in whole}
    found: list[GpuInformation] = []
    for node, number, kfd in _partitions(snapshot, family):
        bus_id = pci_address(kfd.domain, kfd.location_id)
        physical = by_bus.get(bus_id)
        found.append(
            GpuInformation(
                bus_id=bus_id,
                model=physical.model if physical is not None else None,
                uuid=(physical.uuid if physical is not None else None)
                or amd_unique_id(kfd.unique_id),
                minor=node.minor,
                partition=number,
            )
        )
    return found


def _present(snapshot: HostSnapshot, family: Family, majors: dict[str, int]) -> bool:
    """Whether the host shows any sign of the family: its driver registered, its GPUs
    listed, its nodes in a dev root, or (driver roots) a driver root or driver-ready file."""
    if family.loaded(majors) or _gpu_information(snapshot, family):
        return True
    if any(
        _family_listing(snapshot, family, candidate.dev_root).entries
        for candidate in [*_candidates(snapshot, family), Candidate("/", "/dev", False)]
    ):
        return True
    return family.fixed_dev_root is None and (
        snapshot.driver_ready is not None
        or any(root != "/" for root in snapshot.driver_roots_existing)
    )


def _majors(
    view: HostView, snapshot: HostSnapshot, problems: _Problems
) -> tuple[dict[str, int], bool]:
    """The registered majors; True when /proc/devices could not be parsed (said once)."""
    if snapshot.proc_devices is None:
        return {}, False
    try:
        return parse_proc_devices(snapshot.proc_devices), False
    except ProcDevicesError as error:
        problems.add(
            "driver-not-loaded",
            "error",
            f"{view.proc}/devices could not be parsed ({error}); is --proc right?",
            f"{view.proc}/devices",
        )
        return {}, True


def _not_loaded(
    view: HostView, snapshot: HostSnapshot, family: Family, problems: _Problems
) -> None:
    why = (
        f"cannot read {view.proc}/devices ({snapshot.proc_devices_error})"
        if snapshot.proc_devices_error
        else f"{view.proc}/devices lists {_neither(family.core_majors)}"
    )
    problems.add(
        "driver-not-loaded",
        family.not_loaded_severity,
        f"the {family.display} kernel driver is not loaded: {why}; load it "
        f"({family.load_hint}) or wait for the driver container to finish starting",
    )


def _mount_table_problems(view: HostView, snapshot: HostSnapshot, problems: _Problems) -> None:
    if snapshot.mounts_error is not None:
        problems.add(
            "nodev-mount",
            "warning",
            f"cannot read the mount table {view.mountinfo} ({snapshot.mounts_error}): which "
            "mount holds each node, and whether it is nodev (opening fails then), is unknown; "
            "is --mountinfo right?",
        )
    elif snapshot.mounts.errors:
        errors = snapshot.mounts.errors
        problems.add(
            "nodev-mount",
            "warning",
            f"{len(errors)} line{'s' if len(errors) > 1 else ''} of the mount table "
            f"{view.mountinfo} could not be parsed and were skipped (first: {errors[0]}); a "
            "node on a skipped mount is attributed to the mount below it, nodev unnoticed",
        )


def _choose_dev_root(
    candidates: list[Candidate], listings: dict[str, DevRootListing], judge: _Judge
) -> Candidate | None:
    """The first candidate with a valid control node, else the first with any node."""
    for candidate in candidates:
        listing = listings.get(candidate.dev_root)
        if listing is not None and judge.has_valid_control(listing):
            return candidate
    for candidate in candidates:
        listing = listings.get(candidate.dev_root)
        if listing is not None and listing.has_nodes:
            return candidate
    return None


def _devices(listing: DevRootListing, judge: _Judge, problems: _Problems) -> list[Device]:
    """Every node of the chosen dev root, sorted by name, with what is wrong with each."""
    devices: list[Device] = []
    for verdict in judge.verdicts(listing):
        devices.append(verdict.device)
        if verdict.live:
            for code, message in verdict.problems:
                problems.add(code, "error", message, verdict.device.path)
    for entry in listing.entries:
        if entry.file_type not in ("char", "block"):
            path = posixpath.join(listing.dev_root, entry.name)
            what = (
                f"a symlink to {entry.link_target!r} (not followed)"
                if entry.file_type == "symlink"
                else f"a {'directory' if entry.file_type == 'dir' else entry.file_type}"
            )
            problems.add(
                "not-char-device",
                "error",
                f"{path} is {what}, not a character device: remove it so the driver's own "
                "node can be created",
                path,
            )
    devices.sort(key=lambda device: device.name)
    return devices


def _no_device_root(
    snapshot: HostSnapshot, candidates: list[Candidate], family: Family, problems: _Problems
) -> None:
    unreadable = "".join(
        f"; cannot read {listing.dev_root} ({listing.error})"
        for candidate in candidates
        if (listing := snapshot.listings.get(candidate.dev_root)) is not None
        and listing.error is not None
    )
    where = (
        family.fixed_dev_root
        if family.fixed_dev_root is not None
        else "any driver root (" + ", ".join(candidate.dev_root for candidate in candidates) + ")"
    )
    problems.add(
        "no-device-root",
        "error",
        f"no {family.display} device nodes in {where}{unreadable}; {family.no_root_hint}",
    )


def _driver_root_problems(
    snapshot: HostSnapshot, chosen: Candidate | None, family: Family, problems: _Problems
) -> None:
    """Driver roots that exist but hold no readable nodes."""
    for candidate in snapshot.candidates:
        if (
            candidate.driver_root == "/"
            or candidate.driver_root not in snapshot.driver_roots_existing
            # driver-ready may keep the nodes apart from the driver root (NVIDIA_DEV_ROOT):
            # the root that was chosen is not empty, whichever candidate names it.
            or (chosen is not None and candidate.driver_root == chosen.driver_root)
        ):
            continue
        listing = _family_listing(snapshot, family, candidate.dev_root)
        if listing.error is not None:
            # Unreadable is not empty: say so rather than blame the driver pod.
            problems.add(
                "driver-root-empty",
                "warning" if chosen else "error",
                f"driver root {candidate.driver_root} exists but {candidate.dev_root} cannot be "
                f"read ({listing.error}): gpu-device-watcher needs read and search permission "
                "on it (and every directory above it)",
                candidate.driver_root,
            )
        elif not listing.has_nodes:
            problems.add(
                "driver-root-empty",
                "warning" if chosen else "error",
                f"driver root {candidate.driver_root} exists but {candidate.dev_root} holds no "
                f"{family.display} device nodes: the driver container may still be starting, or "
                "its root was left behind by an earlier driver pod (check the driver pod)",
                candidate.driver_root,
            )


def _not_in_dev(
    in_dev: DevRootListing | None, chosen: Candidate, judge: _Judge, problems: _Problems
) -> None:
    family = judge.family
    # A stale or planted control node in /dev does not help a tool that opens it.
    if in_dev is None or not judge.has_valid_control(in_dev):
        problems.add(
            "not-in-dev",
            "warning",
            f"{family.display} device nodes are in {chosen.dev_root}, not /dev: tools that "
            f"open /dev/{family.control} ({family.opened_by} among them) will not find them;"
            " ask gpu-device-watcher for the paths (`gpu-device-watcher path "
            f"{family.control}`)",
            chosen.dev_root,
        )


def _gpus(information: list[GpuInformation], devices: list[Device], family: Family) -> list[Gpu]:
    listed = {device.name: device for device in devices}
    gpus: list[Gpu] = []
    for info in sorted(information, key=lambda gpu: (gpu.minor is None, gpu.minor, gpu.bus_id)):
        node = listed.get(family.gpu_node_name(info.minor)) if info.minor is not None else None
        gpus.append(
            Gpu(
                minor=info.minor,
                bus_id=info.bus_id,
                model=info.model,
                uuid=info.uuid,
                device=node.path if node is not None else None,
                family=family.name,
                partition=msgspec.UNSET if info.partition is None else info.partition,
            )
        )
    return gpus


def _source(view: HostView, chosen: Candidate | None) -> DriverSource:
    if chosen is not None and chosen.from_validations:
        return "validations"
    if view.driver_roots_configured:
        return "config"
    return "detected"


def _neither(names: tuple[str, ...]) -> str:
    """ "neither 'a' nor 'b'" (or "no 'a'" for one name)."""
    quoted = [f"'{name}'" for name in names]
    if len(quoted) == 1:
        return f"no {quoted[0]}"
    return "neither " + " nor ".join(quoted)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        # surrogateescape turned byte 0xNN into U+DCNN; anything else is shown as \uXXXX.
        return _SURROGATE.sub(
            lambda found: (
                f"\\x{ord(found[0]) - 0xDC00:02x}"
                if 0xDC80 <= ord(found[0]) <= 0xDCFF
                else f"\\u{ord(found[0]):04x}"
            ),
            value,
        )
    if isinstance(value, dict):
        return {key: _escape_surrogates(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_surrogates(item) for item in value]
    return value


def printable(device_map: DeviceMap) -> DeviceMap:
    """`device_map` with every string valid Unicode, so that it always encodes as JSON.

    Paths and texts read from the host keep bytes that are not UTF-8 as lone surrogates
    (surrogateescape), so that they still name the right file; JSON cannot carry those, and
    encoding them raised in the daemon (a mount point or driver root named with such bytes
    killed it). In the map each such byte is written `\\xNN`: the map stays well formed and
    tells a person where the node is, though such a path no longer opens by that name.
    """
    try:
        msgspec.json.encode(device_map)
    except UnicodeEncodeError:
        return msgspec.convert(_escape_surrogates(msgspec.to_builtins(device_map)), DeviceMap)
    return device_map


def _missing_nodes(
    family: Family,
    chosen: Candidate,
    listing: DevRootListing | None,
    *,
    majors: Mapping[str, int],
    information: list[GpuInformation],
    problems: _Problems,
) -> None:
    expected: list[tuple[str, Severity, str]] = [
        (node.name, node.severity, node.why)
        for node in family.expected
        if node.when_major is None or node.when_major in majors
    ]
    listed_in = "/proc" if family.gpus_from == "proc" else "/sys/class/drm"
    for info in information:
        if info.minor is not None:
            expected.append(
                (
                    family.gpu_node_name(info.minor),
                    "error",
                    f"GPU {info.bus_id} is listed in {listed_in}",
                )
            )
    for name, severity, why in expected:
        if listing is None or listing.entry(name) is None:
            path = posixpath.join(chosen.dev_root, name)
            problems.add(
                "missing-node",
                severity,
                f"{path} is missing although {why}: run {family.recreate} (or restart the driver "
                "container) to create it",
                path,
            )


def _check_validations(
    view: HostView,
    snapshot: HostSnapshot,
    chosen: Candidate | None,
    problems: _Problems,
    family: Family,
) -> None:
    ready_path = posixpath.join(view.validations_dir, "driver-ready")
    named = next((c for c in snapshot.candidates if c.from_validations), None)
    if named is None:
        problems.add(
            "validations-mismatch",
            "warning",
            f"{ready_path} has no absolute {family.ready_root_key}; it was ignored (is the GPU "
            "Operator's driver validation healthy?)",
            ready_path,
        )
    elif chosen is not None and chosen != named:
        problems.add(
            "validations-mismatch",
            "warning",
            f"{ready_path} names {named.dev_root}, but it holds no valid {family.control}; using "
            f"{chosen.dev_root} instead (the driver-ready file may be stale after a driver pod "
            "restart)",
            ready_path,
        )
