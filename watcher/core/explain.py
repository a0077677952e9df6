"""Why a device of the family is not usable, in words a person can act on.

Pure: a map in, a sentence out. The server's `path` answer uses it; so can the CLI and the
CRIU action, which hold the same map.
"""

from __future__ import annotations

from watcher.core.model import DeviceMap

__all__ = ["why_unusable"]


def why_unusable(device_map: DeviceMap, name: str) -> str | None:
    """Why `name` has no valid node in `device_map` (absent, or present but not valid);
    None when it is there and valid."""
    device = device_map.device(name)
    if device is None:
        if device_map.driver.dev_root is None:
            why = "there is no device root"
            problems = [p.message for p in device_map.problems if p.code == "no-device-root"]
            if problems:
                why += f" ({problems[0]})"
        else:
            known = ", ".join(d.name for d in device_map.devices) or "none"
            why = f"{device_map.driver.dev_root} has no such node (present: {known})"
        return f"device {name!r} is absent: {why}"
    if not device.valid:
        reasons = [p.message for p in device_map.problems if p.path == device.path]
        why = "; ".join(reasons) or (
            f"{device.major}:{device.minor}, mode {device.mode}, does not match the driver"
        )
        return f"device {name!r} is present at {device.path} but not valid: {why}"
    return None
