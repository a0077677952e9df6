"""Whether a node is valid: its file type, major and minor against what the driver
registered, and the mount it lies on (`nodev`). Pure.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

from watcher.core.devices import (
    Family,
)
from watcher.core.model import (
    Device,
    Mount,
    ProblemCode,
)
from watcher.core.mountinfo import MountEntry, MountTable
from watcher.core.snapshot import DevRootListing, HostView, NodeEntry

__all__ = [
    "NodeCheck",
    "NodeVerdict",
    "host_mount",
    "mount_of",
]


def host_mount(view: HostView, entry: MountEntry) -> Mount:
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


def mount_of(view: HostView, mounts: MountTable, host_path: str) -> Mount | None:
    entry = mounts.resolve(view.table_path(host_path))
    return host_mount(view, entry) if entry is not None else None


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    device: Device
    problems: tuple[tuple[ProblemCode, str], ...]
    # Whether the node's driver is up, so that its problems are worth reporting (otherwise
    # driver-not-loaded says it all).
    live: bool


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """Decides whether nodes are valid, given what the driver registered and the mounts."""

    view: HostView
    family: Family
    majors: dict[str, int]
    loaded: bool
    mounts: MountTable

    def verdict(self, dev_root: str, entry: NodeEntry) -> NodeVerdict | None:
        """A node's Device record and what is wrong with it; None for names outside the family."""
        matched = self.family.match(entry.name)
        if matched is None or entry.file_type not in ("char", "block"):
            return None
        spec, expected_minor = matched
        path = posixpath.join(dev_root, entry.name)
        mount = mount_of(self.view, self.mounts, path)
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
        return NodeVerdict(device, tuple(problems), live)

    def verdicts(self, listing: DevRootListing) -> Iterator[NodeVerdict]:
        for entry in listing.entries:
            verdict = self.verdict(listing.dev_root, entry)
            if verdict is not None:
                yield verdict

    def has_valid_control(self, listing: DevRootListing) -> bool:
        control = listing.entry(self.family.control)
        if control is None:
            return False
        verdict = self.verdict(listing.dev_root, control)
        return verdict is not None and verdict.device.valid
