"""`contract.gfd_product_label`: GPU Feature Discovery's model format, a valid label value."""

from __future__ import annotations

import re

import pytest

from watcher.contract import LABEL_NAMESPACE, gfd_product_label

LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")


@pytest.mark.parametrize(
    ("model", "label"),
    [
        # NVML names as GFD labels them (nvidia.com/gpu.product).
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        ("Tesla V100-SXM2-16GB", "Tesla-V100-SXM2-16GB"),
        # Removed, not replaced: parentheses and slashes vanish; runs of spaces are one `-`.
        ("NVIDIA GeForce RTX 4090 (Laptop)", "NVIDIA-GeForce-RTX-4090-Laptop"),
        ("NVIDIA  RTX  A6000 ", "NVIDIA-RTX-A6000"),
        ("Quadro RTX 8000/PCIe", "Quadro-RTX-8000PCIe"),
        ("GPU ü", "GPU"),
        ("", ""),
        ("()", ""),
    ],
)
def test_gfd_format(model: str, label: str) -> None:
    assert gfd_product_label(model) == label


def test_a_long_or_odd_name_is_still_a_label_value() -> None:
    for model in ("X " * 80, "-A-", "_ .B. _", "NVIDIA " + "H" * 100 + " -"):
        value = gfd_product_label(model)
        assert LABEL_VALUE.fullmatch(value), (model, value)
        assert len(value) <= 63


def test_namespace_is_nfds_sub_namespace() -> None:
    assert LABEL_NAMESPACE == "gpu-device-watcher.feature.node.kubernetes.io/"
