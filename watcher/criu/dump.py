"""`pre-dump`: write the record (format 2) before CRIU freezes the tree.

The record says which GPU devices the tree under `CRTOOLS_INIT_PID` holds open or mapped
(by host path, and for a GPU by UUID and model), the tree root's GPU visibility variables,
the driver's versioned libraries the tree maps, and the checks that found this checkpoint
cannot work as a GPU checkpoint (`mig-in-use`, `cuda-checkpoint-missing`). With
`dump_checks = "refuse"` a check stops the dump here, while the tree still runs.
"""

from __future__ import annotations

import os

from watcher.atomicfile import write_atomically
from watcher.contract import utc_timestamp as _utc_now
from watcher.criu import EXIT_OK, EXIT_REFUSE, EXIT_USAGE, RECORD_NAME, RECORD_VERSION
from watcher.criu.text import image_dir_name, say, shown, tell

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

ENVIRONMENT = (
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_DRIVER_CAPABILITIES",
)
_MIG_DEPTH = 3  # gpuN/mig/giN/ciN/access


# --------------------------------------------------------------------------------------------
# The checks


def mig_minors(proc: str) -> set[int]:
    """`DeviceFileMinor` of every MIG capability (`driver/nvidia/capabilities/gpu*/mig/`)."""
    base = f"{proc}/driver/nvidia/capabilities"
    try:
        gpus = [name for name in os.listdir(base) if name.startswith("gpu")]
    except OSError:
        return set()
    minors: set[int] = set()
    for gpu in gpus:
        top = f"{base}/{gpu}/mig"
        for directory, subdirectories, files in os.walk(top):
            if directory.count("/") - top.count("/") >= _MIG_DEPTH:
                subdirectories.clear()  # deeper than the driver ever writes: not followed
            if "access" not in files:
                continue
            try:
                with open(f"{directory}/access", "rb") as file:
                    text = file.read(4096)
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(b":")
                if key.strip() == b"DeviceFileMinor" and value.strip().isdigit():
                    minors.add(int(value.strip()))
    return minors


def run_checks(
    used: list[dict[str, Any]], device_map: Mapping[str, Any], environ: Mapping[str, str]
) -> list[dict[str, str]]:
    """The record's `checks`: what makes this a checkpoint that cannot be restored as is."""
    checks: list[dict[str, str]] = []
    caps = [entry for entry in used if entry.get("kind") == "cap"]
    if caps:
        from watcher.criu.settings import proc_dir  # noqa: PLC0415 (only with caps in use)

        mig = mig_minors(proc_dir(environ))
        held = sorted(str(entry["name"]) for entry in caps if entry.get("minor") in mig)
        if held:
            checks.append(
                {
                    "code": "mig-in-use",
                    "severity": "error",
                    "message": (
                        f"the tree holds MIG capability node(s) {', '.join(map(shown, held))}: "
                        "cuda-checkpoint cannot checkpoint MIG GPU instances, so this "
                        "checkpoint cannot be restored as a GPU process"
                    ),
                }
            )
    if any(entry.get("kind") == "gpu" for entry in used):
        missing = cuda_checkpoint_missing(device_map, environ)
        if missing is not None:
            checks.append(
                {"code": "cuda-checkpoint-missing", "severity": "warning", "message": missing}
            )
    return checks


def cuda_checkpoint_missing(
    device_map: Mapping[str, Any], environ: Mapping[str, str]
) -> str | None:
    """Why CRIU's CUDA plugin would find no working `cuda-checkpoint`, or None when it would.

    The plugin runs the one CRIU's PATH (this action's) leads to. Our wrapper there is enough
    when it finds a real binary behind it (on PATH past itself, or the map's)."""
    from watcher.criu.cudacheckpoint import find_real, is_wrapper, resolve_on_path  # noqa: PLC0415

    path_env = environ.get("PATH") or os.defpath
    driver = device_map.get("driver")
    listed = driver.get("cuda_checkpoint") if isinstance(driver, dict) else None
    listed = listed if isinstance(listed, str) and listed else None
    leads_to = resolve_on_path(path_env)
    if leads_to is not None and not is_wrapper(leads_to):
        return None
    if leads_to is not None and find_real(path_env, skip=leads_to, map_cuda_checkpoint=listed):
        return None
    wrapper_fix = (
        "put the gpu-device-watcher cuda-checkpoint wrapper first on the PATH of the service "
        "that runs CRIU (`gpu-device-watcher install-action DIR` writes it as "
        "DIR/cuda-checkpoint; pip installs it beside gpu-device-watcher)"
    )
    if leads_to is None:
        where = (
            f"; one is at {shown(listed)}: {wrapper_fix}, which runs it with its driver "
            "root's libraries"
            if listed
            else "; install it (it ships with the NVIDIA driver, 550 and later) and " + wrapper_fix
        )
        return (
            "the tree uses a GPU and no cuda-checkpoint is on CRIU's PATH, so CRIU's "
            f"CUDA plugin cannot save the GPU state{where}"
        )
    return (
        f"the tree uses a GPU and CRIU's PATH leads to the gpu-device-watcher wrapper "
        f"{shown(leads_to)}, which finds no real cuda-checkpoint (none on PATH past it, and "
        "the map of this host names none), so CRIU's CUDA plugin cannot save the GPU state; "
        "install cuda-checkpoint (it ships with the NVIDIA driver, 550 and later)"
    )


# --------------------------------------------------------------------------------------------
# pre-dump


def _gpu_identities(device_map: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Device path -> {"uuid", "bus_id", "model", "minor"}, from the map's `gpus`; and
    "partition" for a compute partition of an AMD GPU (absent for a whole GPU)."""
    found: dict[str, dict[str, Any]] = {}
    gpus = device_map.get("gpus")
    for gpu in gpus if isinstance(gpus, (list, tuple)) else []:
        if isinstance(gpu, dict) and isinstance(gpu.get("device"), str):
            identity = {key: gpu.get(key) for key in ("uuid", "bus_id", "model", "minor")}
            if gpu.get("partition") is not None:
                identity["partition"] = gpu["partition"]
            found[gpu["device"]] = identity
    return found


# How each family is called in the pre-dump line (watcher.core.devices' `display`, which the
# daemon path does not import).
_FAMILY_DISPLAY = {"nvidia": "NVIDIA", "amd": "AMD"}


def used_summary(used: list[dict[str, Any]]) -> str:
    """`1 NVIDIA device(s) (nvidia5) and 2 AMD device(s) (dri/renderD128, kfd)`, or
    `no GPU device` when the tree used none."""
    by_family: dict[str, list[str]] = {}
    for device in used:
        family = device.get("family")
        # Maps before the AMD family have no `family`: every device there is NVIDIA's.
        display = (
            _FAMILY_DISPLAY.get(family, shown(family)) if isinstance(family, str) else "NVIDIA"
        )
        by_family.setdefault(display, []).append(shown(device["name"]))
    parts = [
        f"{len(names)} {display} device(s) ({', '.join(names)})"
        for display, names in by_family.items()
    ]
    return " and ".join(parts) or "no GPU device"


def pre_dump(environ: Mapping[str, str]) -> int:
    image_dir = environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        say("CRTOOLS_IMAGE_DIR is not set; this command is run by CRIU's --action-script")
        return EXIT_USAGE
    pid_text = environ.get("CRTOOLS_INIT_PID", "")
    if not (pid_text.isascii() and pid_text.isdigit()) or int(pid_text) <= 0:
        say(
            f"CRTOOLS_INIT_PID is {shown(repr(pid_text))}, not a pid; cannot tell which devices "
            "are used"
        )
        return EXIT_USAGE
    pid = int(pid_text)

    from watcher.criu.hostmap import MapRequest  # noqa: PLC0415

    # Asked first: the daemon answers while the rest is imported and the root is checked.
    asked = MapRequest(environ)
    from watcher.criu import proctree  # noqa: PLC0415

    if not proctree.is_running(pid):
        asked.close()
        say(
            f"CRTOOLS_INIT_PID {pid} is not a running process (it exited, or this is another "
            "pid namespace): there is no tree to record; dump stopped"
        )
        return EXIT_REFUSE

    generation, device_map = asked.result()
    driver = device_map.get("driver")
    version = driver.get("version") if isinstance(driver, dict) else None
    unreadable: list[int] = []
    libraries: set[str] = set()
    devices = device_map.get("devices")
    used = proctree.used_devices(
        pid,
        devices if isinstance(devices, (list, tuple)) else [],
        unreadable=unreadable,
        library_suffix=f".so.{version}" if isinstance(version, str) and version else None,
        libraries=libraries,
    )
    if unreadable:
        say(f"could not read /proc of pids {unreadable}: the devices they use are not recorded")
    identities = _gpu_identities(device_map)
    for entry in used:
        path = entry.get("path")
        # A GPU's node: NVIDIA's nvidiaN, AMD's render node (its GPU is in `gpus` as well).
        if entry.get("kind") in ("gpu", "render") and isinstance(path, str):
            identity = identities.get(path)
            if identity is not None:
                entry["gpu"] = identity
    if not proctree.is_running(pid):
        # The whole walk raced the root's exit: an empty record would claim "no GPU used".
        say(f"CRTOOLS_INIT_PID {pid} exited while its tree was read; dump stopped")
        return EXIT_REFUSE

    checks = run_checks(used, device_map, environ)
    if checks:
        from watcher.criu.settings import dump_checks  # noqa: PLC0415 (only with a check)

        policy = dump_checks(environ)
        for check in checks:
            say(f"{check['code']}: {check['message']}")
        if policy == "refuse":
            say(
                f'dump stopped before CRIU froze the tree (dump_checks = "refuse"): '
                f"{len(checks)} check(s) failed"
            )
            return EXIT_REFUSE

    uname = os.uname()
    record = {
        "version": RECORD_VERSION,
        "generation": generation,
        "hostname": uname.nodename,
        "kernel": uname.release,
        "created": _utc_now(),
        "pid": pid,
        "map": device_map,
        "used": used,
        "environment": proctree.environment(pid, ENVIRONMENT),
        "libraries": sorted(libraries),
        "checks": checks,
    }
    from watcher.leanjson import dumps_indented  # noqa: PLC0415 (loaded by the client)

    data = dumps_indented(record).encode() + b"\n"
    try:
        # No fsync at all: CRIU writes its images beside the record without one, so after a
        # crash the checkpoint is lost with or without a durable record, and on a busy disk
        # the fsync alone cost more than the rest of pre-dump (tens of ms, measured). In a
        # fresh image directory the record is written in place: nothing reads it before
        # CRIU's dump (which runs after this stage) is done, and a record cut short by a
        # crash is refused at restore.
        write_atomically(
            image_dir,
            RECORD_NAME,
            data,
            sync_directory=False,
            sync_data=False,
            new_in_place=True,
        )
    except OSError as error:
        say(
            f"cannot write {RECORD_NAME} into {shown(image_dir_name(image_dir), 400)}: "
            f"{shown(error.strerror or error)}"
        )
        return EXIT_REFUSE
    tell(
        f"recorded generation {generation}: {used_summary(used)} used by the tree of pid {pid}"
        f", in {shown(image_dir_name(image_dir), 400)}/{RECORD_NAME}"
    )
    return EXIT_OK
