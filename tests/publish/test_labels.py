"""Label values from maps: the contract's names, its readiness rule, and the value grammar."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.core.model import Gpu, Problem
from watcher.publish.labels import (
    LABEL_VALUE,
    checkpoint_ready,
    compute_labels,
    label_value,
    render,
)

from .maps import CUDA, DEV_ROOT, gpu, operator_map

# Written out again, independently of the module: at most 63 characters of A-Za-z0-9_.-,
# alphanumeric at both ends.
NS = "gpu-device-watcher.feature.node.kubernetes.io/"
GRAMMAR = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def assert_valid(labels: dict[str, str]) -> None:
    for name, value in labels.items():
        assert name.startswith(NS), name
        assert GRAMMAR.match(value), (name, value)


def test_a_ready_operator_host() -> None:
    labels = compute_labels(operator_map())
    assert labels == {
        NS + "checkpoint-ready": "true",
        NS + "driver-version": "580.95.05",
        NS + "driver-major": "580",
        NS + "dev-root": "run-nvidia-driver-dev",
        NS + "gpu-count": "1",
        NS + "gpu-model": "NVIDIA-H200",
        NS + "cuda-checkpoint": "true",
    }
    assert_valid(labels)


def test_amd_gpus_are_not_counted() -> None:
    # gpu-count and gpu-model describe what cuda-checkpoint can take: NVIDIA's GPUs.
    amd = Gpu(
        minor=128,
        bus_id="0000:83:00.0",
        model="AMD Instinct MI210",
        uuid="592c190172fd5d40",
        device="/dev/dri/renderD128",
        family="amd",
    )
    labels = compute_labels(operator_map(gpus=(gpu(0), amd, amd)))
    assert labels[NS + "gpu-count"] == "1"
    assert labels[NS + "gpu-model"] == "NVIDIA-H200"
    only_amd = compute_labels(operator_map(gpus=(amd,)))
    assert only_amd[NS + "gpu-count"] == "0"
    assert NS + "gpu-model" not in only_amd


def test_without_cuda_checkpoint_the_node_is_not_ready() -> None:
    labels = compute_labels(operator_map(cuda_checkpoint=None))
    assert labels[NS + "checkpoint-ready"] == "false"
    assert labels[NS + "cuda-checkpoint"] == "false"


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"loaded": False}, "driver not loaded"),
        ({"dev_root": None, "devices": ()}, "no dev root"),
        (
            {"problems": (Problem(code="missing-node", severity="error", message="m", path="/x"),)},
            "an error",
        ),
    ],
)
def test_readiness_needs_every_condition(changes: dict[str, object], why: str) -> None:
    device_map = operator_map(**changes)  # type: ignore[arg-type]
    assert not checkpoint_ready(device_map), why
    assert compute_labels(device_map)[NS + "checkpoint-ready"] == "false"


def test_warnings_do_not_spoil_readiness() -> None:
    warning = Problem(code="nodev-mount", severity="warning", message="m", path="/x")
    assert checkpoint_ready(operator_map(problems=(warning,)))


def test_absent_values_are_omitted() -> None:
    labels = compute_labels(
        operator_map(version=None, dev_root=None, devices=(), gpus=(), cuda_checkpoint=None)
    )
    assert labels == {
        NS + "checkpoint-ready": "false",
        NS + "gpu-count": "0",
        NS + "cuda-checkpoint": "false",
    }


def test_the_host_dev_root_is_dev() -> None:
    labels = compute_labels(operator_map(dev_root="/dev"))
    assert labels[NS + "dev-root"] == "dev"


def test_a_model_only_when_all_gpus_are_one_model() -> None:
    mixed = operator_map(gpus=(gpu(0), gpu(1, "NVIDIA A100-SXM4-80GB")))
    assert NS + "gpu-model" not in compute_labels(mixed)
    unknown = operator_map(gpus=(gpu(0), gpu(1, None)))
    assert NS + "gpu-model" not in compute_labels(unknown)
    same = operator_map(gpus=(gpu(0, "NVIDIA GeForce RTX 4090"), gpu(1, "NVIDIA GeForce RTX 4090")))
    labels = compute_labels(same)
    assert labels[NS + "gpu-model"] == "NVIDIA-GeForce-RTX-4090"
    assert labels[NS + "gpu-count"] == "2"


@pytest.mark.parametrize(
    ("model", "label"),
    [
        # As GPU Feature Discovery labels `nvidia.com/gpu.product`: characters outside
        # `A-Za-z0-9-_. ` removed (not replaced), each run of spaces one `-`.
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA GeForce RTX 4090 (Laptop)", "NVIDIA-GeForce-RTX-4090-Laptop"),
        ("Quadro RTX 8000/PCIe", "Quadro-RTX-8000PCIe"),
        ("NVIDIA RTX 6000 Ada Generation / Quadro®", "NVIDIA-RTX-6000-Ada-Generation-Quadro"),
    ],
)
def test_the_model_is_in_gpu_feature_discoverys_format(model: str, label: str) -> None:
    labels = compute_labels(operator_map(gpus=(gpu(0, model),)))
    assert labels[NS + "gpu-model"] == label


def test_a_model_of_which_nothing_survives_is_omitted() -> None:
    assert NS + "gpu-model" not in compute_labels(operator_map(gpus=(gpu(0, "®©"),)))


@pytest.mark.parametrize(
    ("version", "major"),
    [("580.95.05", "580"), ("384.111", "384"), ("595", "595"), ("beta", None), ("", None)],
)
def test_driver_major(version: str, major: str | None) -> None:
    labels = compute_labels(operator_map(version=version or None))
    assert labels.get(NS + "driver-major") == major


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("580.95.05", "580.95.05"),
        ("/run/nvidia/driver/dev", "run-nvidia-driver-dev"),
        ("/dev", "dev"),
        ("NVIDIA H200", "NVIDIA-H200"),
        ("NVIDIA GeForce RTX 4090 (Laptop)", "NVIDIA-GeForce-RTX-4090-Laptop"),
        ("NVIDIA RTX 6000 Ada Generation / Quadro®", "NVIDIA-RTX-6000-Ada-Generation-Quadro"),
        ("_.-x-._", "x"),
        ("a" * 70, "a" * 63),
        # Cut at 63, the cut must not end on a separator.
        ("a" * 62 + " b", "a" * 62),
        ("  ", None),
        ("---", None),
        ("", None),
    ],
)
def test_label_value(text: str, value: str | None) -> None:
    assert label_value(text) == value


@given(st.text(max_size=200))
def test_every_text_becomes_a_valid_value_or_none(text: str) -> None:
    value = label_value(text)
    if value is not None:
        assert GRAMMAR.match(value), value
        assert LABEL_VALUE.fullmatch(value), value


@given(
    version=st.one_of(st.none(), st.text(max_size=80)),
    dev_root=st.one_of(st.none(), st.text(min_size=1, max_size=120).map(lambda t: "/" + t)),
    models=st.lists(st.one_of(st.none(), st.text(max_size=100)), max_size=4),
    cuda=st.sampled_from([None, CUDA]),
)
def test_every_label_of_any_map_is_valid(
    version: str | None, dev_root: str | None, models: list[str | None], cuda: str | None
) -> None:
    device_map = operator_map(
        version=version,
        dev_root=dev_root,
        gpus=tuple(gpu(minor, model) for minor, model in enumerate(models)),
        cuda_checkpoint=cuda,
    )
    assert_valid(compute_labels(device_map))


def test_render_is_one_name_value_per_line() -> None:
    text = render(compute_labels(operator_map())).decode()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == f"{NS}checkpoint-ready=true"
    assert all(re.fullmatch(re.escape(NS) + r"[a-z-]+=[A-Za-z0-9_.-]+", line) for line in lines)
    assert f"{NS}dev-root={DEV_ROOT.strip('/').replace('/', '-')}" in lines
