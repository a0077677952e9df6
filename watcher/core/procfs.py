"""Parsers for the driver's `/proc` files and the GPU Operator's `driver-ready` file."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["GpuInformation", "parse_driver_version", "parse_gpu_information", "parse_key_values"]

# "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build ..."
# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023"
_VERSION = re.compile(r"\b(\d+\.\d+(?:\.\d+)*)\b")


def parse_driver_version(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            found = _VERSION.search(line, len("NVRM version:"))
            return found.group(1) if found else None
    return None


@dataclass(frozen=True, slots=True)
class GpuInformation:
    bus_id: str
    model: str | None
    uuid: str | None
    minor: int | None
    # A compute partition of an AMD GPU: its number (amdgpu_xcp.K); None for a whole GPU.
    partition: int | None = None


def parse_gpu_information(text: str, bus_dir: str) -> GpuInformation:
    """One `/proc/driver/nvidia/gpus/<bus>/information` file.

    Lines are `Key: <spaces or tabs> value`. The directory name is the bus id when the file
    has no `Bus Location` (older drivers).
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            values[key.strip()] = value.strip()
    minor_text = values.get("Device Minor", "")
    return GpuInformation(
        bus_id=values.get("Bus Location") or bus_dir,
        model=values.get("Model") or None,
        uuid=values.get("GPU UUID") or None,
        minor=int(minor_text) if minor_text.isascii() and minor_text.isdigit() else None,
    )


def parse_key_values(text: str) -> dict[str, str]:
    """KEY=VALUE lines as the GPU Operator writes them; blank and `#` lines are skipped.

    Values may be quoted with single or double quotes, as in an env file.
    """
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values
