"""Build the map from one snapshot of the host: roots -> nodes -> mounts -> problems.

Pure: `build_map` takes what `watcher.probe` read (texts and lstat results) and returns a
`DeviceMap`. Nothing here touches the filesystem, so every decision is table-testable.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from watcher.core.devices import (
    FAMILIES,
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
    Gpu,
)
from watcher.core.nodes import NodeCheck
from watcher.core.problems import (
    Problems,
    check_validations,
    driver_root_problems,
    missing_nodes,
    mount_table_problems,
    no_device_root,
    not_in_dev,
    not_loaded,
)
from watcher.core.procfs import GpuInformation, parse_driver_version
from watcher.core.snapshot import (
    CUDA_CHECKPOINT_HOST_PATHS,
    Candidate,
    DevRootListing,
    HostSnapshot,
    HostView,
    family_listing,
    partitions,
)

__all__ = [
    "build_map",
    "devices_of",
    "printable",
]


def _cuda_checkpoint(chosen: Candidate | None, found: frozenset[str]) -> str | None:
    first = [posixpath.join(chosen.driver_root, "usr/bin/cuda-checkpoint")] if chosen else []
    return next((path for path in (*first, *CUDA_CHECKPOINT_HOST_PATHS) if path in found), None)


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
    problems = Problems(families[0].name)
    majors, unparsed = _majors(view, snapshot, problems)
    mount_table_problems(view, snapshot, problems)
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
    problems: Problems,
    *,
    report: bool,
    unparsed: bool,
) -> _FamilyScan:
    """One family's devices and GPUs; its problems when `report` (it is on this host)."""
    loaded = family.loaded(majors)
    if not report:
        problems = Problems(family.name)  # a family that is not here says nothing
    elif not loaded and not unparsed:
        not_loaded(view, snapshot, family, problems)
    nodes = NodeCheck(view, family, majors, loaded, snapshot.mounts)
    candidates = _candidates(snapshot, family)
    listings = {
        candidate.dev_root: family_listing(snapshot, family, candidate.dev_root)
        for candidate in [*candidates, Candidate("/", "/dev", False)]
    }
    chosen = _choose_dev_root(candidates, listings, nodes)
    chosen_listing = listings.get(chosen.dev_root) if chosen else None
    devices = devices_of(chosen_listing, nodes, problems) if chosen_listing is not None else []
    devices = [msgspec.structs.replace(device, family=family.name) for device in devices]
    if chosen is None:
        no_device_root(snapshot, candidates, family, problems)
    if family.fixed_dev_root is None:
        driver_root_problems(snapshot, chosen, family, problems)
        if chosen is not None and chosen.dev_root != "/dev":
            not_in_dev(listings.get("/dev"), chosen, nodes, problems)
        if snapshot.driver_ready is not None:
            check_validations(view, snapshot, chosen, problems, family)
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
        missing_nodes(
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
    for node, number, kfd in partitions(snapshot, family):
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
        family_listing(snapshot, family, candidate.dev_root).entries
        for candidate in [*_candidates(snapshot, family), Candidate("/", "/dev", False)]
    ):
        return True
    return family.fixed_dev_root is None and (
        snapshot.driver_ready is not None
        or any(root != "/" for root in snapshot.driver_roots_existing)
    )


def _majors(
    view: HostView, snapshot: HostSnapshot, problems: Problems
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


def _choose_dev_root(
    candidates: list[Candidate], listings: dict[str, DevRootListing], nodes: NodeCheck
) -> Candidate | None:
    """The first candidate with a valid control node, else the first with any node."""
    for candidate in candidates:
        listing = listings.get(candidate.dev_root)
        if listing is not None and nodes.has_valid_control(listing):
            return candidate
    for candidate in candidates:
        listing = listings.get(candidate.dev_root)
        if listing is not None and listing.has_nodes:
            return candidate
    return None


def devices_of(listing: DevRootListing, nodes: NodeCheck, problems: Problems) -> list[Device]:
    """Every node of the chosen dev root, sorted by name, with what is wrong with each."""
    devices: list[Device] = []
    for verdict in nodes.verdicts(listing):
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
