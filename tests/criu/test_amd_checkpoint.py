"""AMD through the CRIU action and `restore-check`, against the daemons of simulated hosts.

The simulated AMD host declares the major of /dev/zero and /dev/full (1, `mem`) as `drm`
and gives its render nodes their numbers: a tree that opens the real /dev/zero (1:5) holds
what the map calls `dri/renderD5`, an amdgpu render node of the fake sysfs. No NVIDIA
driver is loaded there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Tree
from .simhost import DEV_FULL, DEV_ZERO, HostSpec, SimHost
from .test_action import read_record, run_action
from .test_restore_check import restore_check

MI210 = "AMD Instinct MI210"
UNIQUE_A, UNIQUE_B = "592c190172fd5d40", "c6f220c172dc76bb"


def amd_spec(minor: int, numbers: tuple[int, int], unique_id: str, model: str = MI210) -> HostSpec:
    return HostSpec(
        driver_loaded=False,
        nodes={"kfd": (4, 0), f"dri/renderD{minor}": numbers},  # kfd: /dev/tty0's numbers
        gpus=[],
        majors={"kfd": 4, "drm": 1},
        renders=[
            (minor, f"0000:{minor + 0x80:02x}:00.0", "amdgpu", model, unique_id),
            (minor + 64, "0000:00:02.0", "i915", None, None),
        ],
    )


@pytest.fixture
def dumped(make_host: Callable[..., SimHost], trees: Callable[..., Tree], tmp_path: Path) -> Path:
    """Images of a tree that held renderD5 (/dev/zero's numbers) on an AMD-only host."""
    source = make_host(amd_spec(5, DEV_ZERO, UNIQUE_A), name="source")
    live = source.get()["map"]
    assert live["amd"] == {"loaded": True, "dev_root": "/dev"}
    assert [d["name"] for d in live["devices"]] == ["dri/renderD5", "kfd"]
    assert live["problems"] == []
    images = tmp_path / "images"
    images.mkdir()
    tree = trees("/dev/zero")
    done = run_action("pre-dump", source.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    # No cuda-checkpoint check: an AMD render node is no NVIDIA GPU.
    assert "cuda-checkpoint" not in done.stdout + done.stderr
    # The log line counts the nodes by family.
    assert done.stdout.startswith(
        "gpu-device-watcher: recorded generation 1: 1 AMD device(s) (dri/renderD5) used by "
        f"the tree of pid {tree.root}, in "
    ), done.stdout
    source.stop()
    return images


def test_pre_dump_records_the_render_node_with_its_gpu(dumped: Path) -> None:
    record = read_record(dumped)
    [used] = record["used"]
    assert {key: used[key] for key in ("name", "path", "kind", "family", "valid")} == {
        "name": "dri/renderD5",
        "path": "/dev/dri/renderD5",
        "kind": "render",
        "family": "amd",
        "valid": True,
    }
    assert used["gpu"] == {"uuid": UNIQUE_A, "bus_id": "0000:85:00.0", "model": MI210, "minor": 5}
    assert record["checks"] == []


def test_restore_check_lands_on_another_render_node(
    make_host: Callable[..., SimHost], dumped: Path
) -> None:
    target = make_host(amd_spec(7, DEV_FULL, UNIQUE_B), name="target")
    done = restore_check(dumped, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert (verdict["fits"], verdict["remap"], verdict["device_map"]) == (True, False, {})
    assert verdict["devices"] == [
        {"name": "dri/renderD5", "path": "/dev/dri/renderD5", "here": "/dev/dri/renderD7"}
    ]
    pre_restore = run_action("pre-restore", target.env(), dumped)
    assert pre_restore.returncode == 0, pre_restore.stdout + pre_restore.stderr


def test_restore_check_refuses_another_model(
    make_host: Callable[..., SimHost], dumped: Path
) -> None:
    target = make_host(amd_spec(7, DEV_FULL, UNIQUE_B, model="AMD Instinct MI300X"), name="target")
    done = restore_check(dumped, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 1
    assert [r["code"] for r in json.loads(done.stdout)["reasons"]] == ["gpu-model"]
    pre_restore = run_action("pre-restore", target.env(), dumped)
    assert pre_restore.returncode == 1


# --- a compute partition (an MI300X in CPX) ---------------------------------------------

MI300X = "AMD Instinct MI300X"
UNIQUE_C = 7843934696581995200  # KFD's decimal unique_id; sysfs writes it %016x


def partition_spec(minor: int, numbers: tuple[int, int], *, split: bool = True) -> HostSpec:
    """An MI300X whose own render node is renderD4 (/dev/port's numbers) and whose next
    partition is `minor`, on platform device amdgpu_xcp.3; `split=False`: the GPU is not
    split, KFD names renderD4 alone."""
    return HostSpec(
        driver_loaded=False,
        nodes={"kfd": (4, 0), "dri/renderD4": (1, 4), f"dri/renderD{minor}": numbers},
        gpus=[],
        majors={"kfd": 4, "drm": 1},
        partitioned=[
            {
                "bus_id": "0000:02:00.0",
                "minors": (4, minor),
                "first_partition": 3,
                "unique_id": UNIQUE_C,
                "kfd_names_partitions": split,
            }
        ],
    )


@pytest.fixture
def dumped_partition(
    make_host: Callable[..., SimHost], trees: Callable[..., Tree], tmp_path: Path
) -> Path:
    source = make_host(partition_spec(5, DEV_ZERO), name="source")
    live = source.get()["map"]
    assert live["problems"] == []
    assert [(g["minor"], g.get("partition")) for g in live["gpus"]] == [(4, None), (5, 3)]
    images = tmp_path / "images"
    images.mkdir()
    tree = trees("/dev/zero")
    done = run_action("pre-dump", source.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    source.stop()
    return images


def test_pre_dump_records_the_partition_with_its_physical_gpu(dumped_partition: Path) -> None:
    [used] = read_record(dumped_partition)["used"]
    assert (used["name"], used["family"]) == ("dri/renderD5", "amd")
    assert used["gpu"] == {
        "uuid": f"{UNIQUE_C:016x}",
        "bus_id": "0000:02:00.0",
        "model": MI300X,
        "minor": 5,
        "partition": 3,
    }


def test_a_partition_lands_on_a_partition_and_never_on_an_unsplit_gpu(
    make_host: Callable[..., SimHost], dumped_partition: Path
) -> None:
    target = make_host(partition_spec(7, DEV_FULL), name="target")
    done = restore_check(dumped_partition, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["devices"] == [
        {"name": "dri/renderD5", "path": "/dev/dri/renderD5", "here": "/dev/dri/renderD7"}
    ]
    target.stop()
    unsplit = make_host(partition_spec(7, DEV_FULL, split=False), name="unsplit")
    assert [g["minor"] for g in unsplit.get()["map"]["gpus"]] == [4]
    refused = restore_check(dumped_partition, "--socket", str(unsplit.socket), "--format", "json")
    assert refused.returncode == 1
    assert [r["code"] for r in json.loads(refused.stdout)["reasons"]] == ["gpu-count"]
