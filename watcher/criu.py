"""The CRIU action script: record GPU devices at pre-dump, stop a doomed restore early.

CRIU runs the script by execvp with no arguments and reads its exit code; its stdout and
stderr land in CRIU's log. Every line it prints starts `gpu-device-watcher:` so it can be
found there. Stdlib only while the daemon answers: this runs inside every dump and restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tomllib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from watcher import client, proctree

RECORD_NAME = "gpu-device-watcher.json"
RECORD_VERSION = 1
CONFIG_ENV_DEFAULT = "/etc/gpu-device-watcher/config.toml"
PREFIX = "gpu-device-watcher:"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def current_map(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(generation, map) from the daemon; a direct scan when it cannot be reached."""
    path = client.socket_path(environ.get(client.SOCKET_ENV))
    try:
        reply = client.request(path, {"op": "get"}, timeout=5.0)
    except (client.Unreachable, client.ServerError) as error:
        say(f"{error}; scanning directly instead")
        return _direct_scan()
    return int(reply["generation"]), reply["map"]


def _direct_scan() -> tuple[int, dict[str, Any]]:
    import msgspec  # noqa: PLC0415 (only on the fallback path)

    from watcher.config import ConfigError, resolve_settings  # noqa: PLC0415
    from watcher.core.scan import HostView  # noqa: PLC0415
    from watcher.probe import scan  # noqa: PLC0415

    try:
        view = resolve_settings({}).view
    except ConfigError as error:
        say(f"{error}; scanning with the default host view")
        view = HostView()
    device_map = msgspec.to_builtins(scan(view, generation=0))
    return 0, device_map


def _image_dir(environ: Mapping[str, str]) -> str | None:
    image_dir = environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        say("CRTOOLS_IMAGE_DIR is not set; is this running from CRIU's --action-script?")
        return None
    return image_dir


def _write_atomically(directory: str, name: str, data: bytes) -> None:
    # CRTOOLS_IMAGE_DIR is a /proc/<pid>/fd/<n> link: resolve it once as a directory fd so
    # the temporary file and the rename land in the same directory.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temporary = f".{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def pre_dump(environ: Mapping[str, str]) -> int:
    image_dir = _image_dir(environ)
    if image_dir is None:
        return 1
    pid_text = environ.get("CRTOOLS_INIT_PID", "")
    if not pid_text.isdigit():
        say(f"CRTOOLS_INIT_PID is {pid_text!r}, not a pid; cannot tell which devices are used")
        return 1
    generation, device_map = current_map(environ)
    unreadable: list[int] = []
    used = proctree.used_devices(
        int(pid_text), device_map.get("devices", []), unreadable=unreadable
    )
    if unreadable:
        say(f"could not read /proc of pids {unreadable}: their devices are not recorded")
    uname = os.uname()
    record = {
        "version": RECORD_VERSION,
        "generation": generation,
        "hostname": socket.gethostname(),
        "kernel": uname.release,
        "map": device_map,
        "used": used,
    }
    data = json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n"
    try:
        _write_atomically(image_dir, RECORD_NAME, data)
    except OSError as error:
        say(f"cannot write {RECORD_NAME} into {image_dir}: {error.strerror or error}")
        return 1
    names = ", ".join(str(device["name"]) for device in used) or "none"
    print(
        f"{PREFIX} recorded generation {generation}: {len(used)} NVIDIA device(s) used by "
        f"the tree of pid {pid_text} ({names})",
        flush=True,
    )
    return 0


def _version_policy() -> str:
    """`restore_version_match` from the config: "exact" (default) or "major".

    Read with tomllib alone: the daemon validates the whole file; here only one key matters
    and the action must stay light.
    """
    try:
        with open(CONFIG_ENV_DEFAULT, "rb") as file:
            value = tomllib.load(file).get("restore_version_match", "exact")
    except (OSError, tomllib.TOMLDecodeError):
        return "exact"
    return value if value in ("exact", "major") else "exact"


def restore_problems(record: dict[str, Any], here: dict[str, Any], policy: str) -> list[str]:
    """Every reason this host cannot take the recorded process back; empty when it can."""
    reasons: list[str] = []
    recorded_driver = (record.get("map") or {}).get("driver") or {}
    driver = here.get("driver") or {}
    if not driver.get("loaded"):
        reasons.append("the NVIDIA driver is not loaded on this host")
    recorded_version, version = recorded_driver.get("version"), driver.get("version")
    if recorded_version and driver.get("loaded"):
        same = (
            version == recorded_version
            if policy == "exact"
            else str(version).split(".")[0] == str(recorded_version).split(".")[0]
        )
        if not same:
            reasons.append(
                f"driver version {version or 'unknown'} here, {recorded_version} at dump "
                f"(restore_version_match = {policy!r})"
            )
    devices = {device["name"]: device for device in here.get("devices", [])}
    for used in record.get("used", []):
        name = used.get("name")
        device = devices.get(name)
        if device is None:
            reasons.append(f"{name} is used by the checkpoint but absent here")
        elif not device.get("valid"):
            reasons.append(
                f"{name} is used by the checkpoint but {device.get('path')} is not valid here"
            )
    recorded_gpus = {
        gpu.get("device"): gpu.get("model") for gpu in (record.get("map") or {}).get("gpus", [])
    }
    wanted = Counter(
        recorded_gpus.get(used.get("path"))
        for used in record.get("used", [])
        if used.get("kind") == "gpu"
    )
    available = Counter(gpu.get("model") for gpu in here.get("gpus", []))
    for model, count in sorted(wanted.items(), key=lambda item: str(item[0])):
        if model is not None and available[model] < count:
            reasons.append(
                f"the checkpoint used {count} GPU(s) of model {model}; this host has "
                f"{available[model]}"
            )
    return reasons


def pre_restore(environ: Mapping[str, str]) -> int:
    image_dir = _image_dir(environ)
    if image_dir is None:
        return 1
    try:
        with open(os.path.join(image_dir, RECORD_NAME), "rb") as file:
            record = json.load(file)
    except FileNotFoundError:
        return 0  # not dumped with this action script: nothing to check
    except (OSError, ValueError) as error:
        say(f"cannot read {RECORD_NAME} from the images: {error}")
        return 1
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        say(f"{RECORD_NAME} has an unknown format (version {record.get('version')!r})")
        return 1
    if not record.get("used"):
        return 0  # the process touched no GPU: any host will do
    _, here = current_map(environ)
    reasons = restore_problems(record, here, _version_policy())
    for reason in reasons:
        say(reason)
    if reasons:
        say(f"restore stopped: this host cannot restore the GPU devices of {image_dir}")
        return 1
    print(f"{PREFIX} GPU devices match this host: restore may go on", flush=True)
    return 0


def main(environ: Mapping[str, str] = os.environ) -> int:
    action = environ.get("CRTOOLS_SCRIPT_ACTION")
    if not action:
        say("CRTOOLS_SCRIPT_ACTION is not set: this command is run by CRIU's --action-script")
        return 2
    if action == "pre-dump":
        return pre_dump(environ)
    if action == "pre-restore":
        return pre_restore(environ)
    return 0
