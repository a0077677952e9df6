"""One scan of the host as the daemon runs it, and what the daemon derives from a scan:
the directories to watch, the mounts that matter, which entry names are worth a rescan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from watcher.contract import summary_line, utc_timestamp
from watcher.core.devices import FAMILIES, Family
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import PathFilter
from watcher.core.scan import build_map
from watcher.core.snapshot import HostView, ScanPaths
from watcher.probe import MountCache, read_host
from watcher.sources.uevents import UeventInterest

__all__ = [
    "Scanned",
    "event_filter",
    "matters",
    "mount_filter",
    "scan_host",
    "summary",
    "uevent_interest",
    "watch_targets",
    "watched_subdirs",
]


def summary(device_map: DeviceMap) -> str:
    """The one-line STATUS= text: driver version, where the nodes are, what is wrong."""
    driver, amd = device_map.driver, device_map.amd
    # Each device counts with the family whose map object (`driver`, `amd`) describes it.
    section = {family.name: family.section for family in FAMILIES}
    nvidia = [device for device in device_map.devices if section[device.family] == "driver"]
    others = [device for device in device_map.devices if section[device.family] == "amd"]
    return summary_line(
        loaded=driver.loaded,
        version=driver.version,
        dev_root=driver.dev_root,
        devices=len(nvidia),
        invalid=sum(1 for device in nvidia if not device.valid),
        severities=(problem.severity for problem in device_map.problems),
        amd_loaded=amd.loaded,
        amd_dev_root=amd.dev_root,
        amd_devices=len(others),
        amd_invalid=sum(1 for device in others if not device.valid),
    )


def watch_targets(view: HostView, paths: ScanPaths) -> list[str]:
    """The directories to watch, as this process sees them."""
    return [view.fs_path(path) for path in paths.watched()]


def mount_filter(view: HostView, paths: ScanPaths) -> PathFilter:
    """Which mount points (as this process sees them) can change the map: on, above or below
    what a scan lists, watches or reads (proc and sys included), and on or above the driver
    roots (a scan only asks whether those exist). A superset only costs rescans."""
    watched = {view.fs_path(path) for path in paths.watched()}
    watched.add(os.path.abspath(view.proc))
    watched.add(os.path.abspath(view.sys))  # class/drm is read there (the AMD family)
    return PathFilter(sorted(watched), sorted({view.fs_path(path) for path in paths.driver_roots}))


# What the GPU Operator writes into the validations directory; the rest of it is noise.
_VALIDATION_FILES = frozenset({"driver-ready", ".driver-ctr-ready"})


def event_filter(families: tuple[Family, ...] = FAMILIES) -> Callable[[str], bool]:
    """Whether an entry with a given name, in a dev root or a family subdirectory or the
    validations directory, can change the map (the families' tables decide)."""

    def matters(name: str) -> bool:
        return name in _VALIDATION_FILES or any(family.names_entry(name) for family in families)

    return matters


def watched_subdirs(families: tuple[Family, ...] = FAMILIES) -> tuple[str, ...]:
    """The subdirectories of a dev root that are watched too."""
    return tuple(dict.fromkeys(subdir for family in families for subdir in family.subdirs))


def uevent_interest(families: tuple[Family, ...] = FAMILIES) -> UeventInterest:
    """The uevents worth a rescan: the families' modules, and DRM render nodes where a
    family owns some (AMD's, told apart from others' by sysfs at scan time)."""
    return UeventInterest.of(
        (module for family in families for module in family.modules),
        render_nodes=any(spec.kind == "render" for family in families for spec in family.specs),
    )


matters = event_filter()


@dataclass(frozen=True, slots=True)
class Scanned:
    map: DeviceMap
    # What the scan read: the daemon watches and judges mounts by it.
    paths: ScanPaths
    milliseconds: float


def scan_host(
    view: HostView,
    generation: int,
    mount_cache: MountCache | None = None,
    families: tuple[Family, ...] = FAMILIES,
) -> Scanned:
    started = time.perf_counter()
    snapshot = read_host(view, families, mount_cache=mount_cache)
    device_map = build_map(
        view, snapshot, generation=generation, updated=utc_timestamp(), families=families
    )
    return Scanned(
        map=device_map,
        paths=snapshot.paths,
        milliseconds=round((time.perf_counter() - started) * 1000, 3),
    )
