"""What changed between two maps, by device name (for subscribers and logs)."""

from __future__ import annotations

from typing import Literal

import msgspec

from watcher.contract import CHANGE_WORDS
from watcher.core.model import Device, DeviceMap

__all__ = ["Change", "ChangeKind", "describe", "diff_maps"]

ChangeKind = Literal["added", "removed", "changed"]


class Change(msgspec.Struct, frozen=True, kw_only=True):
    change: ChangeKind
    name: str
    path: str
    before: Device | None = None
    after: Device | None = None


def diff_maps(old: DeviceMap, new: DeviceMap) -> list[Change]:
    before = {device.name: device for device in old.devices}
    after = {device.name: device for device in new.devices}
    changes: list[Change] = []
    for name in sorted(before.keys() | after.keys()):
        old_device, new_device = before.get(name), after.get(name)
        if old_device is None and new_device is not None:
            changes.append(
                Change(change="added", name=name, path=new_device.path, after=new_device)
            )
        elif new_device is None and old_device is not None:
            changes.append(
                Change(change="removed", name=name, path=old_device.path, before=old_device)
            )
        elif old_device != new_device and old_device is not None and new_device is not None:
            changes.append(
                Change(
                    change="changed",
                    name=name,
                    path=new_device.path,
                    before=old_device,
                    after=new_device,
                )
            )
    return changes


def describe(change: Change) -> str:
    """One line a person reads in the journal."""
    if change.change == "added" and change.after is not None:
        device = change.after
        state = "" if device.valid else " (not valid)"
        return (
            f"{change.name} {CHANGE_WORDS['added']} {device.path}"
            f" ({device.major}:{device.minor}){state}"
        )
    if change.change == "removed":
        return f"{change.name} {CHANGE_WORDS['removed']} {change.path}"
    before, after = change.before, change.after
    if before is None or after is None:
        return f"{change.name} {CHANGE_WORDS['changed']} {change.path}"
    parts = []
    if before.path != after.path:
        parts.append(f"moved {before.path} -> {after.path}")
    if (before.major, before.minor) != (after.major, after.minor):
        parts.append(f"{before.major}:{before.minor} -> {after.major}:{after.minor}")
    if before.mode != after.mode:
        parts.append(f"mode {before.mode} -> {after.mode}")
    if before.valid != after.valid:
        parts.append("now valid" if after.valid else "no longer valid")
    if before.mount != after.mount:
        parts.append("mount changed")
    details = ", ".join(parts) or "details changed"
    return f"{change.name} {CHANGE_WORDS['changed']} {change.path}: {details}"
