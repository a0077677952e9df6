"""watcher.core.procfs: driver version, GPU information files and driver-ready files."""

from __future__ import annotations

import pytest

from watcher.core.procfs import (
    GpuInformation,
    parse_driver_version,
    parse_gpu_information,
    parse_key_values,
)

from ._fixtures import fixture_text


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("version/proprietary-535.txt", "535.104.05"),
        ("version/open-580.txt", "580.95.05"),
        ("version/open-aarch64-570.txt", "570.133.20"),
        ("version/proprietary-470.txt", "470.256.02"),
        ("version/no-nvrm-line.txt", None),
    ],
)
def test_driver_version_fixtures(name: str, version: str | None) -> None:
    assert parse_driver_version(fixture_text(name)) == version


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("", None),
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module\n", None),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  590.44  Release Build\n",
            "590.44",
        ),
        # Only the NVRM line counts, even when another line carries a version first.
        (
            "GCC version:  gcc version 12.3.0\n"
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  x\n",
            "550.54.15",
        ),
        (" NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.1.1\n", None),
    ],
)
def test_driver_version_edge_cases(text: str, version: str | None) -> None:
    assert parse_driver_version(text) == version


@pytest.mark.parametrize(
    ("name", "bus_dir", "expected"),
    [
        (
            "information/h200-gsp.txt",
            "0000:3b:00.0",
            GpuInformation(
                bus_id="0000:3b:00.0",
                model="NVIDIA H200",
                uuid="GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
                minor=0,
            ),
        ),
        (
            "information/v100-legacy.txt",
            "0000:86:00.0",
            GpuInformation(
                bus_id="0000:86:00.0",
                model="Tesla V100-SXM2-16GB",
                uuid="GPU-1f2e3d4c-5b6a-7988-a1b2-c3d4e5f60718",
                minor=3,
            ),
        ),
        # No Bus Location line (older drivers): the directory name is the bus id.
        (
            "information/no-bus-location.txt",
            "0000:01:00.0",
            GpuInformation(
                bus_id="0000:01:00.0",
                model="GeForce GTX 1080",
                uuid="GPU-00000000-1111-2222-3333-444444444444",
                minor=1,
            ),
        ),
        # An excluded GPU: empty UUID and "?" as minor.
        (
            "information/excluded-unknown-minor.txt",
            "0000:c1:00.0",
            GpuInformation(
                bus_id="0000:c1:00.0", model="NVIDIA A100-SXM4-80GB", uuid=None, minor=None
            ),
        ),
    ],
)
def test_gpu_information_fixtures(name: str, bus_dir: str, expected: GpuInformation) -> None:
    assert parse_gpu_information(fixture_text(name), bus_dir) == expected


def test_gpu_information_bus_location_wins_over_the_directory() -> None:
    info = parse_gpu_information(fixture_text("information/h200-gsp.txt"), "whatever")
    assert info.bus_id == "0000:3b:00.0"


@pytest.mark.parametrize(
    ("minor_line", "minor"),
    [
        ("Device Minor: \t 12", 12),
        ("Device Minor:12", 12),
        ("Device Minor: \t -1", None),
        ("Device Minor: \t 1\u00b2", None),
        ("Device Minor: \t ", None),
    ],
)
def test_gpu_information_device_minor(minor_line: str, minor: int | None) -> None:
    text = f"Model: \t\t NVIDIA L4\n{minor_line}\n"
    assert parse_gpu_information(text, "0000:01:00.0").minor == minor


def test_gpu_information_empty_file() -> None:
    assert parse_gpu_information("", "0000:02:00.0") == GpuInformation(
        bus_id="0000:02:00.0", model=None, uuid=None, minor=None
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "driver-ready/gpu-operator-container.env",
            {
                "IS_HOST_DRIVER": "false",
                "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
                "DRIVER_ROOT_CTR_PATH": "/driver-root",
                "NVIDIA_DEV_ROOT": "/run/nvidia/driver",
                "DEV_ROOT_CTR_PATH": "/driver-root",
            },
        ),
        (
            "driver-ready/host-driver.env",
            {
                "IS_HOST_DRIVER": "true",
                "NVIDIA_DRIVER_ROOT": "/",
                "DRIVER_ROOT_CTR_PATH": "/host",
                "NVIDIA_DEV_ROOT": "/",
                "DEV_ROOT_CTR_PATH": "/host",
            },
        ),
        (
            "driver-ready/quoted.env",
            {
                "IS_HOST_DRIVER": "false",
                "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
                "DRIVER_ROOT_CTR_PATH": "/driver-root",
                "NVIDIA_DEV_ROOT": "/run/nvidia/driver",
                "DEV_ROOT_CTR_PATH": "/driver root",
            },
        ),
        (
            "driver-ready/no-driver-root.env",
            {"IS_HOST_DRIVER": "false", "DRIVER_ROOT_CTR_PATH": "/driver-root"},
        ),
    ],
)
def test_driver_ready_fixtures(name: str, expected: dict[str, str]) -> None:
    assert parse_key_values(fixture_text(name)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("A='x\"", {"A": "'x\""}),  # mismatched quotes stay
        ('A="', {"A": '"'}),
        ('A=""', {"A": ""}),
        ("A=b=c", {"A": "b=c"}),
        ("A=1\nA=2\n", {"A": "2"}),
        ("# A=1\n", {}),
    ],
)
def test_key_values_edge_cases(text: str, expected: dict[str, str]) -> None:
    assert parse_key_values(text) == expected
