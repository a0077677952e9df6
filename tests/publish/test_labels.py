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
GRAMMAR = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def assert_valid(labels: dict[str, str]) -> None:
    for name, value in labels.items():
        assert name.startswith("gpu-device-watcher."), name
        assert GRAMMAR.match(value), (name, value)


def test_a_ready_operator_host() -> None:
    labels = compute_labels(operator_map())
    assert labels == {
        "gpu-device-watcher.checkpoint-ready": "true",
        "gpu-device-watcher.driver-version": "580.95.05",
        "gpu-device-watcher.dev-root": "run-nvidia-driver-dev",
        "gpu-device-watcher.gpu-count": "1",
        "gpu-device-watcher.gpu-model": "NVIDIA-H200",
        "gpu-device-watcher.cuda-checkpoint": "true",
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
    assert labels["gpu-device-watcher.gpu-count"] == "1"
    assert labels["gpu-device-watcher.gpu-model"] == "NVIDIA-H200"
    only_amd = compute_labels(operator_map(gpus=(amd,)))
    assert only_amd["gpu-device-watcher.gpu-count"] == "0"
    assert "gpu-device-watcher.gpu-model" not in only_amd


def test_without_cuda_checkpoint_the_node_is_not_ready() -> None:
    labels = compute_labels(operator_map(cuda_checkpoint=None))
    assert labels["gpu-device-watcher.checkpoint-ready"] == "false"
    assert labels["gpu-device-watcher.cuda-checkpoint"] == "false"


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
    assert compute_labels(device_map)["gpu-device-watcher.checkpoint-ready"] == "false"


def test_warnings_do_not_spoil_readiness() -> None:
    warning = Problem(code="nodev-mount", severity="warning", message="m", path="/x")
    assert checkpoint_ready(operator_map(problems=(warning,)))


def test_absent_values_are_omitted() -> None:
    labels = compute_labels(
        operator_map(version=None, dev_root=None, devices=(), gpus=(), cuda_checkpoint=None)
    )
    assert labels == {
        "gpu-device-watcher.checkpoint-ready": "false",
        "gpu-device-watcher.gpu-count": "0",
        "gpu-device-watcher.cuda-checkpoint": "false",
    }


def test_the_host_dev_root_is_dev() -> None:
    labels = compute_labels(operator_map(dev_root="/dev"))
    assert labels["gpu-device-watcher.dev-root"] == "dev"


def test_a_model_only_when_all_gpus_are_one_model() -> None:
    mixed = operator_map(gpus=(gpu(0), gpu(1, "NVIDIA A100-SXM4-80GB")))
    assert "gpu-device-watcher.gpu-model" not in compute_labels(mixed)
    unknown = operator_map(gpus=(gpu(0), gpu(1, None)))
    assert "gpu-device-watcher.gpu-model" not in compute_labels(unknown)
    same = operator_map(gpus=(gpu(0, "NVIDIA GeForce RTX 4090"), gpu(1, "NVIDIA GeForce RTX 4090")))
    labels = compute_labels(same)
    assert labels["gpu-device-watcher.gpu-model"] == "NVIDIA-GeForce-RTX-4090"
    assert labels["gpu-device-watcher.gpu-count"] == "2"


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
    assert lines[0] == "gpu-device-watcher.checkpoint-ready=true"
    assert all(re.fullmatch(r"gpu-device-watcher\.[a-z-]+=[A-Za-z0-9_.-]+", line) for line in lines)
    assert f"gpu-device-watcher.dev-root={DEV_ROOT.strip('/').replace('/', '-')}" in lines
