"""`pre-restore` and `gpu-device-watcher restore-check`: the same gate, inside CRIU and out.

`pre-restore` prints one `gpu-device-watcher:` line per reason into CRIU's log and exits 1,
so that CRIU stops before it creates a process or loads a page; when the host fits and a GPU
lands on another UUID it prints the device map (`gpu-device-watcher: device map OLD=NEW,...`)
for `cuda-checkpoint --device-map`. `restore-check` runs the same checks for an orchestrator,
before it schedules a restore on a node, and prints the same lines or the verdict as JSON.
"""

from __future__ import annotations

import sys

from watcher.criu import EXIT_OK, EXIT_REFUSE, EXIT_USAGE, RECORD_NAME
from watcher.criu.gate import Verdict, check
from watcher.criu.recordfile import Record, RecordError, decode, read_bytes, validate
from watcher.criu.text import image_dir_name, one_line, say, shown, tell

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def evaluate(image_dir: str, environ: Mapping[str, str]) -> tuple[Record | None, Verdict]:
    """(the record or None, the gate's verdict) for the checkpoint in `image_dir`."""
    return judge(lambda: read_bytes(image_dir), environ)


def judge(
    read: Callable[[], bytes | None], environ: Mapping[str, str]
) -> tuple[Record | None, Verdict]:
    """(the record or None, the gate's verdict) for the record bytes `read` returns."""
    try:
        data = read()
        record = None if data is None else validate(decode(data))
    except RecordError as error:
        verdict = Verdict()
        verdict.refuse(error.code, error.message)
        return None, verdict
    if record is None or not record.used:
        # Dumped without this action, or the tree touched no GPU device: any host will do,
        # and nobody needs to be asked.
        return record, Verdict(record.summary() if record is not None else None)
    from watcher.criu.hostmap import current_map  # noqa: PLC0415

    _, here = current_map(environ)
    return record, verdict_for(record, here, environ)


def verdict_for(record: Record, here: Mapping[str, Any], environ: Mapping[str, str]) -> Verdict:
    """The gate's verdict on `record` against this host's map `here`."""
    driver = here.get("driver")
    version_here = driver.get("version") if isinstance(driver, dict) else None
    version_then = record.driver_version
    policy = "exact"
    if isinstance(version_here, str) and version_then and version_then != version_here:
        # The config is read only when it can matter: one file read saved on the common path.
        from watcher.criu.settings import version_policy  # noqa: PLC0415

        policy = version_policy(environ)
    return check(record, here, policy)


def verdict_lines(
    record: Record | None, verdict: Verdict, image_dir: str, where: str | None = None
) -> list[str]:
    """The lines (without the `gpu-device-watcher:` prefix) that tell the verdict.

    `where` names the record for people; by default the record file in `image_dir`.
    """
    if where is None:
        where = f"{shown(image_dir_name(image_dir), 400)}/{RECORD_NAME}"
    if not verdict.fits:
        lines = [f"{code}: {message}" for code, message in verdict.reasons]
        if record is None:
            lines.append("restore stopped: the GPU devices of this checkpoint cannot be checked")
        else:
            lines.append(
                f"restore stopped: this host cannot take back the GPU devices recorded in "
                f"{where} (dumped on {shown(record.hostname or 'an unknown host')}, driver "
                f"{shown(record.driver_version or 'unknown')})"
            )
        return lines
    if record is None or not record.used:
        return []
    lines = [f"device map {verdict.device_map_text()}"] if verdict.device_map else []
    landed = ", ".join(
        shown(device["name"])
        if device["here"] == device["path"]
        else f"{shown(device['name'])} as {shown(device['here'])}"
        for device in verdict.devices
    )
    lines.append(f"the GPU devices of the checkpoint ({landed}) match this host: restore may go on")
    return lines


def pre_restore(environ: Mapping[str, str]) -> int:
    image_dir = environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        say("CRTOOLS_IMAGE_DIR is not set; this command is run by CRIU's --action-script")
        return EXIT_USAGE
    record, verdict = evaluate(image_dir, environ)
    if verdict.fits and verdict.device_map:
        refuse_without_wrapper(verdict, environ)
    lines = verdict_lines(record, verdict, image_dir)
    for line in lines:
        (tell if verdict.fits else say)(line)
    return EXIT_OK if verdict.fits else EXIT_REFUSE


def refuse_without_wrapper(verdict: Verdict, environ: Mapping[str, str]) -> None:
    """`remap-unsupported` when the device map cannot reach cuda-checkpoint: CRIU's CUDA
    plugin never passes `--device-map`, only our wrapper adds it, so a restore through any
    other `cuda-checkpoint` would fail late, after CRIU loaded the images."""
    import os  # noqa: PLC0415 (pre-restore with a device map only)

    from watcher.criu.cudacheckpoint import is_wrapper, resolve_on_path  # noqa: PLC0415

    leads_to = resolve_on_path(environ.get("PATH") or os.defpath)
    if leads_to is not None and is_wrapper(leads_to):
        return
    verdict.refuse(
        "remap-unsupported",
        f"the checkpoint's GPUs land on GPUs with other UUIDs here "
        f"({shown(verdict.device_map_text(), 400)}), and CRIU's CUDA plugin never passes "
        f"cuda-checkpoint --device-map; the cuda-checkpoint on CRIU's PATH "
        f"({shown(leads_to) if leads_to else 'none'}) is not the gpu-device-watcher wrapper, "
        "which adds it: put the wrapper first on the PATH of the service that runs CRIU "
        "(`gpu-device-watcher install-action DIR` writes it as DIR/cuda-checkpoint)",
    )


def no_record_line(checkpoint: str) -> str:
    """The contract's line for a checkpoint taken without the action."""
    return (
        f"no GPU record in {shown(checkpoint, 400)}: it was taken without the "
        "gpu-device-watcher action, so nothing can be checked"
    )


def restore_check(checkpoint: str, environ: Mapping[str, str], output_format: str) -> int:
    """`gpu-device-watcher restore-check`: 0 when this host fits, 1 when it does not.

    CHECKPOINT is an image directory, a directory that holds `checkpoint/`, or an archive
    (`watcher.criu.archive`, imported here only: the CRIU action reads image directories).
    Raises `NotACheckpoint` (a usage error) for anything else.
    """
    from watcher.criu.archive import record_source  # noqa: PLC0415

    source = record_source(checkpoint)
    record, verdict = judge(source.read, environ)
    no_record = record is None and verdict.fits
    if output_format == "json":
        from watcher.leanjson import dumps  # noqa: PLC0415 (loaded by the client already)

        # ensure_ascii: a value from a crafted record stays an escape, never a raw byte.
        print(dumps(verdict.as_json(), compact=False))
        if no_record:
            # stdout stays one JSON document; the person reading stderr is told why.
            print(f"gpu-device-watcher: {one_line(no_record_line(checkpoint))}", file=sys.stderr)
        return EXIT_OK if verdict.fits else EXIT_REFUSE
    if no_record:
        lines = [no_record_line(checkpoint)]
    else:
        lines = verdict_lines(record, verdict, checkpoint, source.where)
        if not lines:
            lines = [
                f"no GPU device used by the checkpoint in {shown(checkpoint, 400)} (an empty "
                "'used' in its record): any host can take it back"
            ]
    for line in lines:
        print(f"gpu-device-watcher: {one_line(line)}")
    return EXIT_OK if verdict.fits else EXIT_REFUSE
