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
from watcher.core.model import DeviceMap, Kind

__all__ = ["RECORD_NAME", "RECORD_VERSION", "Record", "UsedDevice", "Via", "schema", "schema_text"]

Via = Literal["fd", "maps"]


class UsedDevice(msgspec.Struct, frozen=True, kw_only=True):
    """An NVIDIA device of the map that the dumped process tree held open or mapped."""

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


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What `pre-dump` wrote: the GPU side of a checkpoint, checked again at `pre-restore`."""

    version: Annotated[Literal[1], msgspec.Meta(description="record format version")]
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
        msgspec.Meta(description="NVIDIA devices the tree used, sorted by name"),
    ]


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
