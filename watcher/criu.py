"""The CRIU action script: record GPU devices at pre-dump, stop a doomed restore early.

CRIU runs the script by execvp with no arguments, once per stage, and reads its exit code; a
non-zero exit aborts the dump or the restore. Its stdout and stderr land in CRIU's log, so
every line printed here starts `gpu-device-watcher:` and can be found there.

This runs inside every dump and every restore, once for each of CRIU's stages, so it is
built for start-up time: module level imports only `os` and `sys`; the socket client and the
/proc walker (stdlib only) are imported by the two actions that use them; msgspec and the
scanner are imported only when the daemon cannot be reached and the action scans directly;
asyncio and anyio never.
"""

from __future__ import annotations

import os
import sys

from watcher.contract import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    PREFIX,
    RECORD_NAME,
    RECORD_VERSION,
    config_file_problem,
)
from watcher.contract import utc_timestamp as _utc_now

# Not `from typing import TYPE_CHECKING`: typing costs milliseconds at every one of CRIU's
# stages, and mypy honours any constant of this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "CONFIG_ENV",
    "RECORD_NAME",
    "RECORD_VERSION",
    "console_main",
    "main",
    "restore_problems",
]

VERSION_POLICIES = ("exact", "major")

EXIT_OK, EXIT_REFUSE, EXIT_USAGE = 0, 1, 2
# Long enough for a daemon busy rescanning a 10,000-mount table, short enough that a hung
# daemon delays a dump by seconds, not minutes (the direct scan then takes over).
DAEMON_TIMEOUT_S = 5.0


def say(message: str) -> None:
    """One line for CRIU's log (stderr: it is unbuffered there, and ordered with CRIU's)."""
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def tell(message: str) -> None:
    """One line of good news for CRIU's log."""
    print(f"{PREFIX} {message}", flush=True)


# --------------------------------------------------------------------------------------------
# The map of this host


def _config_path(environ: Mapping[str, str]) -> tuple[str, bool]:
    """(path, named explicitly): the config the action reads."""
    explicit = environ.get(CONFIG_ENV)
    return (explicit, True) if explicit else (DEFAULT_CONFIG, False)


def current_map(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(generation, map) from the daemon; a direct scan (generation 0) when it cannot answer."""
    from watcher import client  # noqa: PLC0415 (only the two actions that need it pay for it)

    path = client.socket_path(environ.get(client.SOCKET_ENV))
    try:
        reply = client.request(path, {"op": "get"}, timeout=DAEMON_TIMEOUT_S)
        generation, device_map = reply["generation"], reply["map"]
        if not isinstance(generation, int) or not isinstance(device_map, dict):
            raise TypeError("the reply holds no map")  # noqa: TRY301 (same fallback as below)
    except (client.Unreachable, client.ServerError) as error:
        say(f"{error}; scanning this host directly instead")
        return _direct_scan(environ)
    except (ValueError, KeyError, TypeError) as error:
        say(f"the daemon at {path} sent a reply that is not a map ({error}); scanning directly")
        return _direct_scan(environ)
    return generation, device_map


def _direct_scan(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    # The fallback is allowed to be heavy: it runs only when the daemon is down.
    import msgspec  # noqa: PLC0415

    from watcher.config import ConfigError, resolve_settings  # noqa: PLC0415
    from watcher.core.scan import HostView  # noqa: PLC0415
    from watcher.probe import scan  # noqa: PLC0415

    path, explicit = _config_path(environ)
    try:
        view = resolve_settings({"config": path if explicit else None}, environ).view
    except ConfigError as error:
        say(f"{error}; scanning with the default host view")
        view = HostView()
    device_map: dict[str, Any] = msgspec.to_builtins(scan(view, generation=0))
    return 0, device_map


# --------------------------------------------------------------------------------------------
# The image directory


def _image_dir(environ: Mapping[str, str]) -> str | None:
    image_dir = environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        say("CRTOOLS_IMAGE_DIR is not set; this command is run by CRIU's --action-script")
        return None
    return image_dir


def _shown(image_dir: str) -> str:
    """The image directory as a person knows it, not as CRIU's /proc/<pid>/fd/<n> link."""
    try:
        return os.readlink(image_dir) if image_dir.startswith("/proc/") else image_dir
    except OSError:
        return image_dir


def _write_atomically(directory: str, name: str, data: bytes) -> None:
    """Replace `directory/name` by `data` in one rename: a reader sees the old file or the new."""
    # CRTOOLS_IMAGE_DIR is a /proc/<pid>/fd/<n> link: open it once as a directory fd so the
    # temporary file and the rename land in the same directory, whatever the link says later.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temporary = f".{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o644,
            dir_fd=dir_fd,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Before the rename: after a crash the record is the old one or the whole new one.
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        import contextlib  # noqa: PLC0415 (failure path only)

        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# pre-dump


def pre_dump(environ: Mapping[str, str]) -> int:
    image_dir = _image_dir(environ)
    if image_dir is None:
        return EXIT_USAGE
    pid_text = environ.get("CRTOOLS_INIT_PID", "")
    if not pid_text.isdigit():
        say(f"CRTOOLS_INIT_PID is {pid_text!r}, not a pid; cannot tell which devices are used")
        return EXIT_USAGE
    generation, device_map = current_map(environ)

    from watcher import proctree  # noqa: PLC0415 (pre-dump only)

    unreadable: list[int] = []
    devices = device_map.get("devices")
    used = proctree.used_devices(
        int(pid_text), devices if isinstance(devices, (list, tuple)) else [], unreadable=unreadable
    )
    if unreadable:
        say(f"could not read /proc of pids {unreadable}: the devices they use are not recorded")
    uname = os.uname()
    record = {
        "version": RECORD_VERSION,
        "generation": generation,
        "hostname": uname.nodename,
        "kernel": uname.release,
        "created": _utc_now(),
        "pid": int(pid_text),
        "map": device_map,
        "used": used,
    }
    import json  # noqa: PLC0415 (already loaded by the client; kept local with its user)

    data = json.dumps(record, indent=2, ensure_ascii=False).encode() + b"\n"
    try:
        _write_atomically(image_dir, RECORD_NAME, data)
    except OSError as error:
        say(f"cannot write {RECORD_NAME} into {_shown(image_dir)}: {error.strerror or error}")
        return EXIT_REFUSE
    names = ", ".join(str(device["name"]) for device in used) or "none"
    tell(
        f"recorded generation {generation}: {len(used)} NVIDIA device(s) used by the tree of "
        f"pid {pid_text} ({names}) in {_shown(image_dir)}/{RECORD_NAME}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# pre-restore


def version_policy(environ: Mapping[str, str]) -> str:
    """`restore_version_match` from the config: "exact" (the default) or "major".

    Read with tomllib alone: the daemon validates the whole file; here only one key matters
    and the action must stay light. Anything doubtful (an unsafe, unreadable or invalid file,
    an unknown value) keeps the strict "exact", and says why.
    """
    import tomllib  # noqa: PLC0415 (only when the versions differ)

    path, explicit = _config_path(environ)
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            # The daemon's rule: a file another user owns or can write must not relax a
            # safety check run as root.
            if (unsafe := config_file_problem(path, info)) is not None:
                say(f"{unsafe[0]}; ignoring it")
                return "exact"
            config = tomllib.load(file)
    except FileNotFoundError:
        if explicit:
            say(f"config {path} (from {CONFIG_ENV}) does not exist; versions must match exactly")
        return "exact"
    except (OSError, tomllib.TOMLDecodeError) as error:
        say(f"cannot read config {path} ({error}); versions must match exactly")
        return "exact"
    value = config.get("restore_version_match", "exact")
    if value not in VERSION_POLICIES:
        say(
            f'config {path}: key "restore_version_match" must be "exact" or "major", '
            f"got {value!r}; versions must match exactly"
        )
        return "exact"
    return str(value)


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def _versions_match(recorded: str, here: str, policy: str) -> bool:
    return recorded == here if policy == "exact" else _major(recorded) == _major(here)


def _gpu_models(device_map: Mapping[str, Any]) -> dict[str, str | None]:
    """Device path -> GPU model, from the map's `gpus`."""
    models: dict[str, str | None] = {}
    for gpu in device_map.get("gpus") or []:
        if isinstance(gpu, dict) and isinstance(gpu.get("device"), str):
            models[gpu["device"]] = gpu.get("model")
    return models


def restore_problems(
    record: Mapping[str, Any], here: Mapping[str, Any], policy: str = "exact"
) -> list[str]:
    """Every reason this host cannot take the recorded process back; empty when it can.

    `record` is the pre-dump record, `here` this host's map now, `policy` the value of
    `restore_version_match`. Devices are matched by name (their numbers may differ: the uvm
    and caps majors are dynamic); a used GPU must be the same model here as at dump.
    """
    reasons: list[str] = []
    then = record.get("map") or {}
    driver_then = then.get("driver") or {}
    driver = here.get("driver") or {}
    version_then, version = driver_then.get("version"), driver.get("version")
    if not driver.get("loaded"):
        reasons.append(
            "the NVIDIA driver is not loaded on this host"
            + (f" (it was {version_then} at dump)" if version_then else "")
        )
    elif version_then and not (version and _versions_match(version_then, version, policy)):
        reasons.append(
            f"driver version {version or 'unknown'} here, {version_then} at dump "
            f'(restore_version_match = "{policy}")'
        )

    dev_root = (driver.get("dev_root")) or "none"
    devices = {d.get("name"): d for d in here.get("devices") or [] if isinstance(d, dict)}
    problems_at: dict[str, list[str]] = {}
    for problem in here.get("problems") or []:
        if isinstance(problem, dict) and problem.get("path"):
            problems_at.setdefault(problem["path"], []).append(str(problem.get("message")))
    models_then, models_here = _gpu_models(then), _gpu_models(here)
    wanted: dict[str, int] = {}
    for used in record.get("used") or []:
        name = used.get("name")
        holders = ", ".join(str(pid) for pid in used.get("pids") or []) or "?"
        device = devices.get(name)
        if device is None:
            reasons.append(f"{name} (used by pid {holders}) is absent here (dev root {dev_root})")
            continue
        if not device.get("valid"):
            why = "; ".join(problems_at.get(str(device.get("path")), [])) or "see `scan`"
            reasons.append(
                f"{name} (used by pid {holders}) is not valid here: {device.get('path')}: {why}"
            )
        if used.get("kind") != "gpu":
            continue
        model_then = models_then.get(str(used.get("path")))
        if model_then is None:
            continue
        wanted[model_then] = wanted.get(model_then, 0) + 1
        model_here = models_here.get(str(device.get("path")))
        if model_here is not None and model_here != model_then:
            reasons.append(f"{name} was {model_then} at dump, is {model_here} here")

    available: dict[str, int] = {}
    for gpu in here.get("gpus") or []:
        if isinstance(gpu, dict) and gpu.get("model"):
            available[gpu["model"]] = available.get(gpu["model"], 0) + 1
    for model, count in sorted(wanted.items()):
        if available.get(model, 0) < count:
            reasons.append(
                f"the checkpoint used {count} {model} GPU(s); this host has "
                f"{available.get(model, 0)}"
            )
    return reasons


def _read_record(image_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) when there is none, or (None, why it is unusable)."""
    import json  # noqa: PLC0415

    try:
        with open(os.path.join(image_dir, RECORD_NAME), "rb") as file:
            record = json.load(file)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"cannot read {RECORD_NAME} from the images: {error}"
    if not isinstance(record, dict):
        return None, f"{RECORD_NAME} is not a JSON object"
    if record.get("version") != RECORD_VERSION:
        return None, (
            f"{RECORD_NAME} has record format version {record.get('version')!r}; this "
            f"gpu-device-watcher reads version {RECORD_VERSION} (upgrade it on this host)"
        )
    used = record.get("used")
    if not isinstance(used, list) or not all(isinstance(entry, dict) for entry in used):
        return None, f'{RECORD_NAME}: "used" is not a list of devices'
    if not isinstance(record.get("map"), dict):
        return None, f'{RECORD_NAME}: "map" is not an object'
    return record, None


def pre_restore(environ: Mapping[str, str]) -> int:
    image_dir = _image_dir(environ)
    if image_dir is None:
        return EXIT_USAGE
    record, unusable = _read_record(image_dir)
    if unusable is not None:
        say(unusable)
        say("restore stopped: the GPU devices of this checkpoint cannot be checked")
        return EXIT_REFUSE
    if record is None or not record["used"]:
        # Dumped without this action, or the tree touched no NVIDIA device: any host will do.
        return EXIT_OK
    _, here = current_map(environ)
    version_then = ((record["map"].get("driver")) or {}).get("version")
    version_here = (here.get("driver") or {}).get("version")
    # The config is read only when it can matter: one file read saved on the common path.
    policy = (
        version_policy(environ)
        if version_then and version_here and version_then != version_here
        else "exact"
    )
    reasons = restore_problems(record, here, policy)
    for reason in reasons:
        say(reason)
    if reasons:
        say(
            f"restore stopped: this host cannot take back the GPU devices recorded in "
            f"{_shown(image_dir)}/{RECORD_NAME} (dumped on {record.get('hostname')}, "
            f"driver {version_then})"
        )
        return EXIT_REFUSE
    names = ", ".join(str(device.get("name")) for device in record["used"])
    tell(f"the GPU devices of the checkpoint ({names}) match this host: restore may go on")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Entry points


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the action CRIU names in CRTOOLS_SCRIPT_ACTION; the exit code CRIU acts on."""
    environ = os.environ if environ is None else environ
    action = environ.get("CRTOOLS_SCRIPT_ACTION")
    if not action:
        say("CRTOOLS_SCRIPT_ACTION is not set: this command is run by CRIU's --action-script")
        return EXIT_USAGE
    try:
        if action == "pre-dump":
            return pre_dump(environ)
        if action == "pre-restore":
            return pre_restore(environ)
    except Exception as error:  # noqa: BLE001 (one line in CRIU's log beats a traceback)
        say(f"{action} failed unexpectedly: {type(error).__name__}: {error}")
        return EXIT_REFUSE
    # post-dump, post-restore, pre-resume, post-resume, network-lock, ...: nothing to do.
    return EXIT_OK


def console_main() -> int:
    """Entry point for `gpu-device-watcher-criu-action` without the CLI's argparse."""
    if len(sys.argv) > 1:
        say(f"takes no arguments (CRIU runs it with none), got {sys.argv[1:]}")
        return EXIT_USAGE
    return main()
