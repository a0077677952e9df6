"""Node labels from a map: pure, no I/O.

The names and rules are the contract's ("Node labels and metrics"). Every value is a valid
Kubernetes label value: at most 63 characters of `A-Za-z0-9_.-`, alphanumeric at both ends
(the empty value is valid too, but a label that says nothing is omitted instead).
"""

from __future__ import annotations

import re
from typing import Final

from watcher.contract import LABEL_NAMESPACE, gfd_product_label
from watcher.core.model import DeviceMap, Gpu

__all__ = [
    "LABEL_VALUE",
    "PREFIX",
    "checkpoint_ready",
    "compute_labels",
    "label_value",
    "render",
]

PREFIX: Final = LABEL_NAMESPACE
# The grammar of a non-empty Kubernetes label value (apimachinery's IsValidLabelValue).
LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_MAX_VALUE: Final = 63
_OUTSIDE: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_DASHES: Final = re.compile(r"-{2,}")
_EDGES: Final = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")


def label_value(text: str) -> str | None:
    """`text` made a valid label value, or None when nothing of it survives.

    Every run of other characters (spaces, `/`, parentheses, non-ASCII) becomes one `-`,
    runs of `-` collapse (so `/run/nvidia/driver/dev` -> `run-nvidia-driver-dev` and
    `NVIDIA GeForce RTX 4090 (Laptop)` -> `NVIDIA-GeForce-RTX-4090-Laptop`), the ends are
    trimmed to alphanumerics, and the whole is cut to 63 characters (then trimmed again).
    """
    value = _DASHES.sub("-", _OUTSIDE.sub("-", text))
    value = _EDGES.sub("", value)
    value = _EDGES.sub("", value[:_MAX_VALUE])
    return value or None


def checkpoint_ready(device_map: DeviceMap) -> bool:
    """The contract's readiness: driver loaded, a dev root found, no problem is an error,
    and a `cuda-checkpoint` found on the host (the map's `driver.cuda_checkpoint`)."""
    return (
        device_map.driver.loaded
        and device_map.driver.dev_root is not None
        and not any(problem.severity == "error" for problem in device_map.problems)
        and device_map.driver.cuda_checkpoint is not None
    )


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _nvidia_gpus(device_map: DeviceMap) -> list[Gpu]:
    # The labels speak of NVIDIA checkpoints (cuda-checkpoint): AMD GPUs are not counted.
    return [gpu for gpu in device_map.gpus if gpu.family == "nvidia"]


def _one_model(device_map: DeviceMap) -> str | None:
    models = {gpu.model for gpu in _nvidia_gpus(device_map)}
    if len(models) != 1:
        return None
    (model,) = models
    return model


def _major(version: str | None) -> str | None:
    """`580` of `580.95.05`; None when the version does not start with a number."""
    major = (version or "").split(".", 1)[0]
    return major if major.isdigit() and major.isascii() else None


def compute_labels(device_map: DeviceMap) -> dict[str, str]:
    """The labels of this map, in the order they are written; absent values are omitted."""
    driver = device_map.driver
    model = _one_model(device_map)
    values: dict[str, str | None] = {
        "checkpoint-ready": _bool(checkpoint_ready(device_map)),
        "driver-version": label_value(driver.version) if driver.version else None,
        "driver-major": _major(driver.version),
        "dev-root": label_value(driver.dev_root) if driver.dev_root else None,
        "gpu-count": str(len(_nvidia_gpus(device_map))),
        # Only when every GPU is known to be of one model, written as GPU Feature Discovery
        # writes `nvidia.com/gpu.product`, so that one selector can combine both.
        "gpu-model": (gfd_product_label(model) or None) if model else None,
        "cuda-checkpoint": _bool(driver.cuda_checkpoint is not None),
    }
    return {PREFIX + name: value for name, value in values.items() if value is not None}


def render(labels: dict[str, str]) -> bytes:
    """The feature file: one `name=value` per line (NFD's local feature-file format)."""
    return "".join(f"{name}={value}\n" for name, value in labels.items()).encode("ascii")
