"""The names the map's values take (node kinds, families, severities), standard library only.

The family table (`core/devices.py`) is built from these, and the CRIU action file, which
runs on the host's bare python3, walks that table when the daemon is down: so they live here,
apart from the msgspec model (`core/model.py`) that re-exports them.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["FamilyName", "Kind", "Severity"]

Severity = Literal["error", "warning", "info"]
Kind = Literal[
    "control",
    "modeset",
    "gpu",
    "uvm",
    "uvm-tools",
    "cap",
    "imex-channel",
    "nvswitch",
    "nvswitch-control",
    "kfd",
    "render",
]
# Which driver family a device, GPU or problem belongs to (watcher.core.devices).
FamilyName = Literal["nvidia", "amd"]
