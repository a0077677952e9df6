"""The CRIU record (`gpu-device-watcher.json` in the image directory), as msgspec Structs.

The action script writes and reads the record with the standard library's json (it must start
fast, and msgspec alone costs it tens of milliseconds); this model is the record's
specification: tests decode real records with it, and `docs/criu-record.schema.json` is
generated from it:

    python -m watcher.core.record > docs/criu-record.schema.json
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from watcher.contract import RECORD_NAME, RECORD_VERSION
from watcher.core.model import DeviceMap, FamilyName, Kind

__all__ = [
    "RECORD_NAME",
    "RECORD_VERSION",
    "Check",
    "Record",
    "UsedDevice",
    "UsedGpu",
    "Via",
    "schema",
    "schema_text",
]

Via = Literal["fd", "maps"]
CheckCode = Literal["mig-in-use", "cuda-checkpoint-missing"]


class UsedGpu(msgspec.Struct, frozen=True, kw_only=True):
    """Version 2: which GPU a used GPU node was, from the map's `gpus` at dump."""

    uuid: Annotated[
        str | None,
        msgspec.Meta(
            description="NVIDIA: the GPU UUID (`GPU-...`), what --device-map names; AMD: the "
            "device's unique_id"
        ),
    ]
    bus_id: Annotated[str, msgspec.Meta(description="PCI bus id at dump")]
    model: Annotated[str | None, msgspec.Meta(description="model name, e.g. NVIDIA H200")]
    minor: Annotated[int | None, msgspec.Meta(description="device minor at dump")]
    partition: Annotated[
        int | None,
        msgspec.Meta(
            description="AMD: the compute partition's number (amdgpu_xcp.K) when the render "
            "node was a partition of the GPU; absent for a whole GPU"
        ),
    ] = None


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """Version 2: something pre-dump found that makes this GPU checkpoint fail."""

    code: CheckCode
    severity: Literal["error", "warning"]
    message: str


class UsedDevice(msgspec.Struct, frozen=True, kw_only=True):
    """A device of the map (NVIDIA or AMD) that the dumped process tree held open or mapped."""

    name: Annotated[str, msgspec.Meta(description="device name, relative to the dev root")]
    path: Annotated[str, msgspec.Meta(description="its host path in the map at dump time")]
    kind: Kind
    major: Annotated[int, msgspec.Meta(ge=0, description="character-device major at dump")]
    minor: Annotated[int, msgspec.Meta(ge=0, description="character-device minor at dump")]
    valid: Annotated[bool, msgspec.Meta(description="whether the map found the node valid")]
    pids: Annotated[
        tuple[int, ...],
        msgspec.Meta(description="processes of the tree that held it (host pids, sorted)"),
    ]
    via: Annotated[
        tuple[Via, ...],
        msgspec.Meta(
            min_length=1,
            description='"fd": held open (/proc/PID/fd); "maps": mapped (/proc/PID/maps)',
        ),
    ]
    gpu: Annotated[
        UsedGpu | None,
        msgspec.Meta(
            description="version 2, on a used GPU's node only (NVIDIA nvidiaN, AMD render "
            "node): its UUID, bus id and model"
        ),
    ] = None
    family: Annotated[
        FamilyName,
        msgspec.Meta(description="the device's family; absent in records before AMD: nvidia"),
    ] = "nvidia"


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What `pre-dump` wrote: the GPU side of a checkpoint, checked again at `pre-restore`.

    Version 1 records lack `environment`, `libraries`, `checks` and `used[].gpu`; they are
    still read and checked.
    """

    version: Annotated[Literal[1, 2], msgspec.Meta(description="record format version")]
    generation: Annotated[
        int,
        msgspec.Meta(ge=0, description="the daemon's map generation; 0: a direct scan"),
    ]
    hostname: Annotated[str, msgspec.Meta(description="host name of the dumping host")]
    kernel: Annotated[str, msgspec.Meta(description="kernel release of the dumping host")]
    created: Annotated[str, msgspec.Meta(description="when the record was written (UTC)")]
    pid: Annotated[int, msgspec.Meta(ge=1, description="CRTOOLS_INIT_PID: the tree's root")]
    map: Annotated[DeviceMap, msgspec.Meta(description="the device map at dump time")]
    used: Annotated[
        tuple[UsedDevice, ...],
        msgspec.Meta(description="GPU devices the tree used, sorted by name"),
    ]
    environment: Annotated[
        dict[str, str],
        msgspec.Meta(
            description="version 2: those of NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES, "
            "CUDA_DEVICE_ORDER, NVIDIA_DRIVER_CAPABILITIES set for the tree's root"
        ),
    ] = {}
    libraries: Annotated[
        tuple[str, ...],
        msgspec.Meta(
            description="version 2: sorted file names of the driver's versioned libraries the "
            "tree maps (libcuda.so.580.95.05, ...)"
        ),
    ] = ()
    checks: Annotated[
        tuple[Check, ...],
        msgspec.Meta(description="version 2: what pre-dump found wrong for a GPU checkpoint"),
    ] = ()


def schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of the record."""
    generated: dict[str, Any] = msgspec.json.schema(Record)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"gpu-device-watcher CRIU record ({RECORD_NAME}), version {RECORD_VERSION}",
        **generated,
    }


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
