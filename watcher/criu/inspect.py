"""`gpu-device-watcher inspect CHECKPOINT`: what a checkpoint needs, from its record alone.

No daemon is asked and nothing of this host is read (but the config's
`restore_version_match`, the default of `--version-match`). Four views of one checked record:

- `text`, for people: where and when it was dumped, the driver, each GPU used, the other
  nodes, libraries, visibility variables and dump checks;
- `json`, the contract's shape;
- `affinity`, a Kubernetes `nodeAffinity` over the node labels (`LABEL_NAMESPACE`) that
  selects the nodes able to take the checkpoint back, as far as labels can tell;
- `selector`, the same as a `kubectl get nodes -l` selector, less what a selector cannot say
  (`Gt`).

The labels describe NVIDIA GPUs (the `cuda-checkpoint` path), so the affinity speaks of the
NVIDIA GPUs used; AMD GPUs, several models, or a model no label value can name are left to
`restore-check` on the node, and a YAML comment says so. Every value from the record goes out
escaped (text) or as JSON, and label values are checked: a crafted record cannot forge a line
of YAML.
"""

from __future__ import annotations

from watcher.contract import LABEL_NAMESPACE, gfd_product_label
from watcher.criu.recordfile import GPU_KINDS, Record, RecordError, decode, validate
from watcher.criu.text import one_line, shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["FORMATS", "affinity", "as_json", "inspect", "requirements", "selector", "text"]

FORMATS = ("text", "json", "affinity", "selector")
EXIT_OK, EXIT_NO_RECORD = 0, 1
_LABEL_VALUE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def _label_value_ok(value: str) -> bool:
    return (
        0 < len(value) <= 63
        and all(char in _LABEL_VALUE_CHARS for char in value)
        and value[0].isalnum()
        and value[-1].isalnum()
    )


def as_json(record: Record) -> dict[str, Any]:
    """The contract's JSON of `inspect --format json`."""
    gpus = [
        {
            "family": used.family,
            "model": used.gpu.model if used.gpu else None,
            "uuid": used.gpu.uuid if used.gpu else None,
            "bus_id": used.gpu.bus_id if used.gpu else None,
            "minor": used.gpu.minor if used.gpu else None,
            "path": used.path,
        }
        for used in record.used
        if used.kind in GPU_KINDS
    ]
    return {
        "record": {
            "hostname": record.hostname,
            "created": record.created,
            "kernel": record.kernel,
            "driver": record.driver_version,
            "version": record.version,
        },
        "gpus": gpus,
        "devices": [
            {"name": used.name, "path": used.path, "kind": used.kind} for used in record.used
        ],
        "libraries": record.libraries,
        "environment": record.environment,
        "checks": [
            {"code": code, "severity": severity, "message": message}
            for code, severity, message in record.check_details
        ],
    }


def text(record: Record, where: str) -> list[str]:
    """Lines for people; every value from the record escaped."""

    def value(item: object) -> str:
        return shown(item if item is not None else "unknown", 200)

    lines = [
        f"checkpoint   {where}",
        f"dumped on    {value(record.hostname)} at {value(record.created)} (kernel "
        f"{value(record.kernel)}, record version {record.version})",
        f"driver       {value(record.driver_version)}",
    ]
    gpus = [used for used in record.used if used.kind in GPU_KINDS]
    if not gpus:
        lines.append("GPUs used    none: any host can take it back")
    for index, used in enumerate(gpus):
        gpu = used.gpu
        identity = (
            f"{value(gpu.model)}  {value(gpu.uuid)}  bus {value(gpu.bus_id)}"
            if gpu is not None
            else "model and UUID not recorded"
        )
        head = "GPUs used   " if index == 0 else "            "
        lines.append(f"{head} {value(used.name)} ({used.family})  {identity}  {value(used.path)}")
    others = [used for used in record.used if used.kind not in GPU_KINDS]
    if others:
        lines.append(
            "other nodes  "
            + ", ".join(f"{value(used.name)} ({value(used.path)})" for used in others)
        )
    if record.libraries:
        lines.append("libraries    " + ", ".join(value(name) for name in record.libraries))
    if record.environment:
        lines.append(
            "environment  "
            + ", ".join(f"{value(key)}={value(item)}" for key, item in record.environment.items())
        )
    if not record.check_details:
        lines.append("dump checks  none")
    for index, (code, severity, message) in enumerate(record.check_details):
        head = "dump checks " if index == 0 else "            "
        said = f": {shown(message, 400)}" if message else ""
        lines.append(f"{head} {value(code)} ({value(severity)}){said}")
    return lines


def requirements(
    record: Record, version_match: str
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """((label name, operator, value), ...) a node must carry, and comments on what the labels
    cannot say. Empty requirements: any node."""
    nvidia = [used for used in record.used if used.kind == "gpu" and used.family == "nvidia"]
    notes: list[str] = []
    if any(used.kind in GPU_KINDS and used.family == "amd" for used in record.used):
        notes.append(
            "AMD GPUs were used: no node label describes them; run restore-check on the node"
        )
    if not nvidia:
        return [], notes
    wanted: list[tuple[str, str, str]] = [("checkpoint-ready", "In", "true")]
    version = record.driver_version
    if version:
        if version_match == "major":
            major = version.split(".", 1)[0]
            wanted.append(("driver-major", "In", major))
        else:
            wanted.append(("driver-version", "In", version))
    models = {used.gpu.model if used.gpu else None for used in nvidia}
    if len(models) == 1 and (model := models.pop()) is not None:
        label = gfd_product_label(model)
        if label:
            wanted.append(("gpu-model", "In", label))
        else:
            notes.append("the GPU model has no label value: restore-check on the node decides")
    elif len(models) > 1 or None in models:
        notes.append(
            "the checkpoint used GPUs of several (or unrecorded) models, which the gpu-model "
            "label cannot express; restore-check on the node decides"
        )
    wanted.append(("gpu-count", "Gt", str(len(nvidia) - 1)))
    wanted.append(("cuda-checkpoint", "In", "true"))
    checked: list[tuple[str, str, str]] = []
    for name, operator, item in wanted:
        if operator == "In" and not _label_value_ok(item):
            notes.append(f"{name}: the recorded value is no label value; left out")
            continue
        checked.append((name, operator, item))
    return checked, notes


def affinity(record: Record, version_match: str) -> list[str]:
    """The YAML lines of a Kubernetes `nodeAffinity`."""
    wanted, notes = requirements(record, version_match)
    lines = [f"# {one_line(note)}" for note in notes]
    if not wanted:
        lines.append("# no GPU of a labelled kind was used: any node can take it back")
        lines.append("nodeAffinity: {}")
        return lines
    dumped_on = one_line(shown(record.hostname or "an unknown host", 100))
    lines += [
        f"# the nodes that can take back the checkpoint dumped on {dumped_on} "
        "(under a pod's spec.affinity)",
        "nodeAffinity:",
        "  requiredDuringSchedulingIgnoredDuringExecution:",
        "    nodeSelectorTerms:",
        "    - matchExpressions:",
    ]
    for name, operator, item in wanted:
        # Quoted: `true` and `580` must stay strings, as label values are.
        lines += [
            f"      - key: {LABEL_NAMESPACE}{name}",
            f"        operator: {operator}",
            f'        values: ["{item}"]',
        ]
    return lines


def selector(record: Record, version_match: str) -> str:
    """The requirements as a label selector (`kubectl get nodes -l`), without `Gt`."""
    wanted, _ = requirements(record, version_match)
    return ",".join(
        f"{LABEL_NAMESPACE}{name}={item}" for name, operator, item in wanted if operator == "In"
    )


def inspect(checkpoint: str, output_format: str, version_match: str | None) -> int:
    """`gpu-device-watcher inspect`: 0 with a record, 1 without one (or an unreadable one).

    Raises `NotACheckpoint` (a usage error) for what is not a checkpoint.
    """
    import sys  # noqa: PLC0415 (builtin)

    from watcher.criu.archive import record_source  # noqa: PLC0415
    from watcher.criu.restore import no_record_line  # noqa: PLC0415

    source = record_source(checkpoint)
    try:
        data = source.read()
        record = None if data is None else validate(decode(data))
    except RecordError as error:
        print(f"gpu-device-watcher: {error.code}: {one_line(error.message)}", file=sys.stderr)
        return EXIT_NO_RECORD
    if record is None:
        print(f"gpu-device-watcher: {one_line(no_record_line(checkpoint))}", file=sys.stderr)
        return EXIT_NO_RECORD
    if output_format == "json":
        from watcher.leanjson import dumps  # noqa: PLC0415

        print(dumps(as_json(record), compact=False))
    elif output_format == "text":
        for line in text(record, source.where):
            print(one_line(line))
    else:
        policy = version_match or _configured_policy()
        if output_format == "affinity":
            print("\n".join(affinity(record, policy)))
        else:
            print(selector(record, policy))
    return EXIT_OK


def _configured_policy(environ: Mapping[str, str] | None = None) -> str:
    import os  # noqa: PLC0415

    from watcher.criu.settings import version_policy  # noqa: PLC0415

    return version_policy(os.environ if environ is None else environ)
