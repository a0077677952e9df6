"""Reading the record from an image directory that may have been crafted.

Checkpoint images are copied between hosts, and the action that reads them runs as root.
So the record is opened without following a symlink (a link to `/dev/zero` or to a root-only
file is refused, never read), and only if it is a regular file: `lstat` first, then `open`
with `O_NOFOLLOW | O_NONBLOCK` (a FIFO swapped in cannot block the open) and `fstat` of what
was opened, which must be the same file. It is read in chunks up to 16 MiB and refused
beyond. Before `json` sees it, a count of its brackets and commas bounds what decoding can
allocate (16 MiB of `[{},{},...]` would be 5 million dicts, several hundred MB), and nesting
beyond Python's recursion limit is a refusal, not a crash.

Then `validate` checks the shape of every field the gate reads, so that no content of the
record can raise in the gate: a field of the wrong type is a `record-unreadable` refusal.
"""

from __future__ import annotations

import os
import stat

from watcher.contract import file_kind
from watcher.criu import RECORD_NAME
from watcher.criu.text import shown
from watcher.leanjson import loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_RECORD_BYTES = 16 * 1024 * 1024
# A record of a host with 10,000 device nodes holds about 30,000 objects and lists and
# 200,000 values; these bounds are several times that and keep what decoding the worst
# input allows them to hold under about 100 MB (measured: tests/criu/test_record_hostile.py).
MAX_CONTAINERS = 300_000
MAX_COMMAS = 1_000_000
_CHUNK = 1024 * 1024
READ_VERSIONS = (1, 2)

UNREADABLE = "record-unreadable"
WRONG_VERSION = "record-version"


class RecordError(Exception):
    """The record cannot be used; `code` is the gate's reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unreadable(message: str) -> RecordError:
    return RecordError(UNREADABLE, message)


def read_bytes(image_dir: str) -> bytes | None:
    """The record's bytes; None when the image directory holds none. Raises RecordError."""
    try:
        dir_fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise _unreadable(
            f"cannot open the image directory: {shown(error.strerror or error)}"
        ) from None
    try:
        try:
            before = os.stat(RECORD_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(before.st_mode):
            raise _unreadable(f"{RECORD_NAME} is {file_kind(before.st_mode)}, not a regular file")
        if before.st_size > MAX_RECORD_BYTES:
            raise _unreadable(
                f"{RECORD_NAME} holds {before.st_size} bytes, more than the "
                f"{MAX_RECORD_BYTES} a record may have"
            )
        fd = os.open(
            RECORD_NAME,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
                before.st_dev,
                before.st_ino,
            ):
                raise _unreadable(f"{RECORD_NAME} was replaced while it was being opened")
            chunks: list[bytes] = []
            total = 0
            # One byte more than allowed tells "exactly the limit" from "more" (a file that
            # grew since the stat, or one whose size the stat did not tell).
            while chunk := os.read(fd, min(_CHUNK, MAX_RECORD_BYTES + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_RECORD_BYTES:
                    raise _unreadable(
                        f"{RECORD_NAME} holds more than the {MAX_RECORD_BYTES} bytes a record "
                        "may have"
                    )
        finally:
            os.close(fd)
    except OSError as error:
        raise _unreadable(f"cannot read {RECORD_NAME}: {shown(error.strerror or error)}") from None
    finally:
        os.close(dir_fd)
    return b"".join(chunks)


def decode(data: bytes) -> object:
    """The JSON value in `data`, with what decoding may allocate bounded. Raises RecordError."""
    if data.count(b"{") + data.count(b"[") > MAX_CONTAINERS or data.count(b",") > MAX_COMMAS:
        raise _unreadable(f"{RECORD_NAME} holds far more values than any record has")
    try:
        return loads(data)
    except RecursionError:
        raise _unreadable(f"{RECORD_NAME} is nested too deeply") from None
    except (ValueError, MemoryError) as error:
        raise _unreadable(f"{RECORD_NAME} is not JSON ({shown(error)})") from None


# --------------------------------------------------------------------------------------------
# The shape the gate relies on


class GpuId:
    """What identifies a used GPU: its UUID and model (either may be unknown), and for a
    compute partition of an AMD GPU its number (None: a whole GPU)."""

    __slots__ = ("bus_id", "minor", "model", "partition", "uuid")

    def __init__(
        self,
        uuid: str | None,
        model: str | None,
        minor: int | None,
        bus_id: str | None,
        partition: int | None = None,
    ) -> None:
        self.uuid = uuid
        self.model = model
        self.minor = minor
        self.bus_id = bus_id
        self.partition = partition


# The kinds of a GPU's own node: NVIDIA's nvidiaN, AMD's render node.
GPU_KINDS = ("gpu", "render")
# The kinds of the AMD family, for records that carry no `family` on their used entries.
_AMD_KINDS = ("kfd", "render")


class Used:
    """One entry of the record's `used`."""

    __slots__ = ("family", "gpu", "kind", "name", "path", "pids")

    def __init__(
        self,
        name: str,
        path: str,
        kind: str,
        pids: tuple[int, ...],
        gpu: GpuId | None,
        *,
        family: str = "nvidia",
    ) -> None:
        self.name = name
        self.path = path
        self.kind = kind
        self.pids = pids
        self.gpu = gpu
        self.family = family


class Record:
    """The fields of a record the gate reads, checked."""

    __slots__ = (
        "check_details",
        "checks",
        "created",
        "driver_version",
        "environment",
        "hostname",
        "kernel",
        "libraries",
        "used",
        "version",
    )

    def __init__(
        self,
        *,
        version: int,
        hostname: str | None,
        created: str | None,
        driver_version: str | None,
        used: list[Used],
        libraries: list[str],
        checks: list[str],
        kernel: str | None = None,
        environment: dict[str, str] | None = None,
        check_details: list[tuple[str, str | None, str | None]] | None = None,
    ) -> None:
        self.version = version
        self.hostname = hostname
        self.created = created
        self.driver_version = driver_version
        self.used = used
        self.libraries = libraries
        self.checks = checks
        self.kernel = kernel
        self.environment = environment or {}
        # (code, severity, message) of each check, for `inspect`; the gate needs the codes.
        self.check_details = check_details or [(code, None, None) for code in checks]

    def summary(self) -> dict[str, str | None]:
        return {"hostname": self.hostname, "driver": self.driver_version, "created": self.created}


def uuid_ok(value: str) -> bool:
    """A GPU UUID as the driver writes them (`GPU-…`, `MIG-…`): safe inside `--device-map`."""
    return 0 < len(value) <= 128 and all(
        char.isascii() and (char.isalnum() or char == "-") for char in value
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(key: str, context: str) -> str:
    return f'"{key}" of {context}' if context else f'"{key}"'


def _optional_str(where: dict[str, Any], key: str, context: str = "") -> str | None:
    value = where.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _unreadable(f"{RECORD_NAME}: {_field(key, context)} is not a string")


def _optional_int(where: dict[str, Any], key: str, context: str) -> int | None:
    value = where.get(key)
    if value is None or _is_int(value):
        return value
    raise _unreadable(f"{RECORD_NAME}: {_field(key, context)} is not an integer")


def _list(where: dict[str, Any], key: str, required: bool = False) -> list[Any]:
    value = where.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise _unreadable(f'{RECORD_NAME}: "{key}" is not a list')
    return value


def _gpu_id(value: object, context: str) -> GpuId:
    if not isinstance(value, dict):
        raise _unreadable(f"{RECORD_NAME}: the GPU of {context} is not an object")
    uuid = _optional_str(value, "uuid", context)
    if uuid is not None and not uuid_ok(uuid):
        raise _unreadable(f"{RECORD_NAME}: the GPU UUID of {context} is not a GPU UUID")
    return GpuId(
        uuid,
        _optional_str(value, "model", context),
        _optional_int(value, "minor", context),
        _optional_str(value, "bus_id", context),
        _optional_int(value, "partition", context),
    )


def validate(value: object) -> Record:
    """The record's fields the gate reads; RecordError when any has the wrong shape."""
    if not isinstance(value, dict):
        raise _unreadable(f"{RECORD_NAME} is not a JSON object")
    version = value.get("version")
    if not _is_int(version):
        raise _unreadable(f'{RECORD_NAME}: "version" is not an integer')
    if version not in READ_VERSIONS:
        raise RecordError(
            WRONG_VERSION,
            f"{RECORD_NAME} has record format version {shown(version)}; this "
            f"gpu-device-watcher reads versions 1 and 2 (upgrade it on this host)",
        )
    device_map = value.get("map")
    if not isinstance(device_map, dict):
        raise _unreadable(f'{RECORD_NAME}: "map" is not an object')
    driver = device_map.get("driver", {})
    if not isinstance(driver, dict):
        raise _unreadable(f'{RECORD_NAME}: "driver" of "map" is not an object')
    libraries = _list(value, "libraries")
    if not all(isinstance(library, str) for library in libraries):
        raise _unreadable(f'{RECORD_NAME}: "libraries" is not a list of file names')
    environment = value.get("environment", {})
    if not isinstance(environment, dict) or not all(
        isinstance(item, str) for item in environment.values()
    ):
        raise _unreadable(f'{RECORD_NAME}: "environment" is not an object of strings')
    check_details = _checks(value)
    return Record(
        version=version,
        hostname=_optional_str(value, "hostname"),
        created=_optional_str(value, "created"),
        driver_version=_optional_str(driver, "version", '"driver" of "map"'),
        used=_used(value, _gpus_by_device(device_map)),
        libraries=libraries,
        checks=[code for code, _, _ in check_details],
        kernel=_optional_str(value, "kernel"),
        environment=environment,
        check_details=check_details,
    )


def _gpus_by_device(device_map: dict[str, Any]) -> dict[str, GpuId]:
    """The GPUs of the map at dump by device path: where a version 1 record (which has no
    "gpu" on its used entries) finds the UUID and model of each used GPU."""
    by_device: dict[str, GpuId] = {}
    for index, listed in enumerate(_list(device_map, "gpus")):
        context = f'"gpus"[{index}] of "map"'
        identity = _gpu_id(listed, context)
        device = _optional_str(listed, "device", context)
        if device is not None:
            by_device.setdefault(device, identity)
    return by_device


def _used(value: dict[str, Any], by_device: dict[str, GpuId]) -> list[Used]:
    used: list[Used] = []
    uuids: set[str] = set()
    for index, entry in enumerate(_list(value, "used", required=True)):
        context = f'"used"[{index}]'
        if not isinstance(entry, dict):
            raise _unreadable(f"{RECORD_NAME}: {context} is not an object")
        name, path, kind = entry.get("name"), entry.get("path"), entry.get("kind")
        if not (isinstance(name, str) and name and isinstance(path, str)):
            raise _unreadable(f"{RECORD_NAME}: {context} has no device name and path")
        if not isinstance(kind, str):
            raise _unreadable(f'{RECORD_NAME}: "kind" of {context} is not a string')
        pids = entry.get("pids", [])
        if not isinstance(pids, list) or not all(_is_int(pid) for pid in pids):
            raise _unreadable(f'{RECORD_NAME}: "pids" of {context} is not a list of pids')
        gpu: GpuId | None = None
        if "gpu" in entry and entry["gpu"] is not None:
            gpu = _gpu_id(entry["gpu"], context)
        elif kind in GPU_KINDS:
            gpu = by_device.get(path)
        family = entry.get("family", "amd" if kind in _AMD_KINDS else "nvidia")
        if family not in ("nvidia", "amd"):
            raise _unreadable(f'{RECORD_NAME}: "family" of {context} is not nvidia or amd')
        # Two NVIDIA GPUs under one UUID would make --device-map ambiguous. AMD's unique_id
        # enters no device map, and nothing promises it is one per render node.
        if gpu is not None and gpu.uuid is not None and family == "nvidia":
            if gpu.uuid in uuids:
                raise _unreadable(f"{RECORD_NAME}: two used GPUs carry UUID {shown(gpu.uuid)}")
            uuids.add(gpu.uuid)
        used.append(Used(name, path, kind, tuple(pids), gpu, family=family))
    return used


def _checks(value: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(code, severity, message) of each dump check."""
    details: list[tuple[str, str | None, str | None]] = []
    for index, check in enumerate(_list(value, "checks")):
        if not isinstance(check, dict) or not isinstance(check.get("code"), str):
            raise _unreadable(f'{RECORD_NAME}: "checks"[{index}] has no code')
        context = f'"checks"[{index}]'
        details.append(
            (
                check["code"],
                _optional_str(check, "severity", context),
                _optional_str(check, "message", context),
            )
        )
    return details


def load(image_dir: str) -> Record | None:
    """The checked record in `image_dir`, None when there is none. Raises RecordError."""
    data = read_bytes(image_dir)
    return None if data is None else validate(decode(data))
