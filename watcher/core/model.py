"""The map of the contract, as msgspec Structs.

These types are the JSON the daemon serves, `scan` prints and CRIU records. Field names
are the public contract; new fields may be added, none renamed.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from watcher.core.names import FamilyName, Kind, Severity

__all__ = [
    "Amd",
    "Device",
    "DeviceMap",
    "Driver",
    "DriverSource",
    "FamilyName",
    "Gpu",
    "Kind",
    "Mount",
    "Problem",
    "ProblemCode",
    "Severity",
]

DriverSource = Literal["validations", "config", "detected"]
ProblemCode = Literal[
    "driver-not-loaded",
    "no-device-root",
    "not-in-dev",
    "driver-root-empty",
    "missing-node",
    "wrong-major",
    "wrong-minor",
    "not-char-device",
    "nodev-mount",
    "validations-mismatch",
]


class Mount(msgspec.Struct, frozen=True, kw_only=True):
    """The mount that holds a node, as the host sees it."""

    id: int
    mount_point: str
    fstype: str
    source: str
    options: tuple[str, ...]
    nodev: bool


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """One node of a family found in its dev root, valid or not."""

    name: str
    path: str
    kind: Kind
    major: int
    minor: int
    mode: str
    valid: bool
    mount: Mount | None
    family: FamilyName = "nvidia"


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    minor: int | None
    bus_id: str
    model: str | None
    uuid: str | None
    device: str | None
    family: FamilyName = "nvidia"
    # A compute partition of an AMD GPU (amdgpu_xcp.K): K, with the physical GPU's bus_id,
    # model and uuid. Left out of the JSON for a whole GPU, which looks as it always did.
    partition: int | msgspec.UnsetType = msgspec.UNSET


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    code: ProblemCode
    severity: Severity
    message: str
    path: str | None = None
    family: FamilyName = "nvidia"


class Driver(msgspec.Struct, frozen=True, kw_only=True):
    loaded: bool
    version: str | None
    root: str | None
    dev_root: str | None
    source: DriverSource
    # Host path of an executable cuda-checkpoint: the driver root's usr/bin, else the host's
    # /usr/local/bin or /usr/bin; None when there is none.
    cuda_checkpoint: str | None = None


class Amd(msgspec.Struct, frozen=True, kw_only=True):
    """The AMD family: `loaded` when /proc/devices lists `kfd`; `dev_root` is /dev when it
    holds AMD nodes (`kfd`, amdgpu render nodes), else None."""

    loaded: bool = False
    dev_root: str | None = None


class DeviceMap(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    updated: str
    # NVIDIA's driver (the contract keeps `driver` for NVIDIA; AMD has its own object).
    driver: Driver
    devices: tuple[Device, ...]
    gpus: tuple[Gpu, ...]
    problems: tuple[Problem, ...]
    amd: Amd = msgspec.field(default_factory=Amd)

    def same_content(self, other: DeviceMap) -> bool:
        """True when only the generation and timestamp differ: no new generation is due."""
        return (
            self.driver == other.driver
            and self.amd == other.amd
            and self.devices == other.devices
            and self.gpus == other.gpus
            and self.problems == other.problems
        )

    def device(self, name: str) -> Device | None:
        for device in self.devices:
            if device.name == name:
                return device
        return None
