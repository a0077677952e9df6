"""`gpu-device-watcher inspect CHECKPOINT`: what a checkpoint needs, from its record alone.

Through the real command line, on records written as the action writes them (version 2,
used GPUs with their identity) and carried in an image directory and in a zstd archive: the
four formats, `--version-match`, the default from the config, several models, AMD, no GPU,
no record (exit 1), an unreadable record (exit 1), not a checkpoint (exit 2), and a record
crafted to forge YAML or terminal lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from watcher.contract import LABEL_NAMESPACE

from .test_archives import compress, engine_tar

TIMEOUT = 30.0
NS = LABEL_NAMESPACE


def used_gpu(minor: int, model: str | None, uuid: str, family: str = "nvidia") -> dict[str, Any]:
    kind = "gpu" if family == "nvidia" else "render"
    name = f"nvidia{minor}" if family == "nvidia" else f"dri/renderD{minor}"
    return {
        "name": name,
        "path": f"/run/nvidia/driver/dev/{name}",
        "kind": kind,
        "family": family,
        "major": 195,
        "minor": minor,
        "valid": True,
        "pids": [42],
        "via": ["fd", "maps"],
        "gpu": {"uuid": uuid, "bus_id": f"0000:{minor:02x}:00.0", "model": model, "minor": minor},
    }


CONTROL = {
    "name": "nvidiactl",
    "path": "/run/nvidia/driver/dev/nvidiactl",
    "kind": "control",
    "major": 195,
    "minor": 255,
    "valid": True,
    "pids": [42],
    "via": ["fd"],
}


def record(*used: dict[str, Any], driver: str = "580.95.05", **more: Any) -> dict[str, Any]:
    return {
        "version": 2,
        "generation": 7,
        "hostname": "gpu-node-7",
        "kernel": "6.18.0",
        "created": "2026-12-01T10:00:00.000000Z",
        "pid": 42,
        "map": {"driver": {"version": driver}, "gpus": []},
        "used": list(used),
        "environment": {"NVIDIA_VISIBLE_DEVICES": "all"},
        "libraries": [f"libcuda.so.{driver}"],
        "checks": [],
        **more,
    }


def images(tmp_path: Path, content: dict[str, Any] | str) -> Path:
    directory = tmp_path / "images"
    directory.mkdir(exist_ok=True)
    data = content if isinstance(content, str) else json.dumps(content)
    (directory / "gpu-device-watcher.json").write_text(data)
    return directory


def inspect(
    checkpoint: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ if env is None else env)
    # The config's default must not leak in from the machine running the tests.
    empty = checkpoint.parent / "empty.toml"
    empty.touch()
    environment.setdefault("GPU_DEVICE_WATCHER_CONFIG", str(empty))
    return subprocess.run(
        [sys.executable, "-m", "watcher", "inspect", str(checkpoint), *options],
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def expressions(done: subprocess.CompletedProcess[str]) -> list[tuple[str, str, list[str]]]:
    assert (done.returncode, done.stderr) == (0, "")
    parsed = yaml.safe_load(done.stdout)
    [term] = parsed["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return [
        (item["key"].removeprefix(NS), item["operator"], item["values"])
        for item in term["matchExpressions"]
    ]


ONE_H200 = record(CONTROL, used_gpu(5, "NVIDIA H200", "GPU-aaaa"))


def test_affinity_of_one_gpu(tmp_path: Path) -> None:
    done = inspect(images(tmp_path, ONE_H200), "--format", "affinity")
    assert expressions(done) == [
        ("checkpoint-ready", "In", ["true"]),
        ("driver-version", "In", ["580.95.05"]),
        ("gpu-model", "In", ["NVIDIA-H200"]),
        ("gpu-count", "Gt", ["0"]),
        ("cuda-checkpoint", "In", ["true"]),
    ]
    # Every key lives in the namespace; every value is a string, as label values are.
    for line in done.stdout.splitlines():
        if "key:" in line:
            assert line.split("key: ")[1].startswith(NS)


def test_selector_leaves_out_what_a_selector_cannot_say(tmp_path: Path) -> None:
    done = inspect(images(tmp_path, ONE_H200), "--format", "selector")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{NS}checkpoint-ready=true,{NS}driver-version=580.95.05,{NS}gpu-model=NVIDIA-H200,"
        f"{NS}cuda-checkpoint=true\n"
    )


def test_version_match_major_from_the_option_and_from_the_config(tmp_path: Path) -> None:
    checkpoint = images(tmp_path, ONE_H200)
    by_option = expressions(inspect(checkpoint, "--format", "affinity", "--version-match", "major"))
    assert ("driver-major", "In", ["580"]) in by_option
    assert not any(key == "driver-version" for key, _, _ in by_option)
    config = tmp_path / "config.toml"
    config.write_text('restore_version_match = "major"\n')
    config.chmod(0o644)
    env = dict(os.environ, GPU_DEVICE_WATCHER_CONFIG=str(config))
    assert expressions(inspect(checkpoint, "--format", "affinity", env=env)) == by_option
    # The option wins over the config.
    exact = expressions(
        inspect(checkpoint, "--format", "affinity", "--version-match", "exact", env=env)
    )
    assert ("driver-version", "In", ["580.95.05"]) in exact


def test_two_gpus_of_one_model_and_of_two(tmp_path: Path) -> None:
    two = record(used_gpu(0, "NVIDIA H200", "GPU-a"), used_gpu(1, "NVIDIA H200", "GPU-b"))
    assert ("gpu-count", "Gt", ["1"]) in expressions(
        inspect(images(tmp_path, two), "--format", "affinity")
    )
    mixed = record(used_gpu(0, "NVIDIA H200", "GPU-a"), used_gpu(1, "NVIDIA A100", "GPU-b"))
    done = inspect(images(tmp_path, mixed), "--format", "affinity")
    found = expressions(done)
    assert not any(key == "gpu-model" for key, _, _ in found)
    assert ("gpu-count", "Gt", ["1"]) in found
    assert "# the checkpoint used GPUs of several (or unrecorded) models" in done.stdout


def test_no_gpu_is_any_node(tmp_path: Path) -> None:
    checkpoint = images(tmp_path, record(CONTROL))
    done = inspect(checkpoint, "--format", "affinity")
    assert done.returncode == 0
    assert yaml.safe_load(done.stdout) == {"nodeAffinity": {}}
    assert inspect(checkpoint, "--format", "selector").stdout == "\n"


def test_amd_gpus_are_left_to_restore_check(tmp_path: Path) -> None:
    done = inspect(
        images(tmp_path, record(used_gpu(128, "AMD Instinct MI300X", "0x1234", "amd"))),
        "--format",
        "affinity",
    )
    assert yaml.safe_load(done.stdout) == {"nodeAffinity": {}}
    assert "# AMD GPUs were used: no node label describes them" in done.stdout


def test_json_and_text(tmp_path: Path) -> None:
    content = record(
        CONTROL,
        used_gpu(5, "NVIDIA H200", "GPU-aaaa"),
        checks=[{"code": "mig-in-use", "severity": "error", "message": "MIG"}],
    )
    checkpoint = images(tmp_path, content)
    done = inspect(checkpoint, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "record": {
            "hostname": "gpu-node-7",
            "created": "2026-12-01T10:00:00.000000Z",
            "kernel": "6.18.0",
            "driver": "580.95.05",
            "version": 2,
        },
        "gpus": [
            {
                "family": "nvidia",
                "model": "NVIDIA H200",
                "uuid": "GPU-aaaa",
                "bus_id": "0000:05:00.0",
                "minor": 5,
                "path": "/run/nvidia/driver/dev/nvidia5",
            }
        ],
        "devices": [
            {"name": "nvidiactl", "path": "/run/nvidia/driver/dev/nvidiactl", "kind": "control"},
            {"name": "nvidia5", "path": "/run/nvidia/driver/dev/nvidia5", "kind": "gpu"},
        ],
        "libraries": ["libcuda.so.580.95.05"],
        "environment": {"NVIDIA_VISIBLE_DEVICES": "all"},
        "checks": [{"code": "mig-in-use", "severity": "error", "message": "MIG"}],
    }
    lines = inspect(checkpoint).stdout.splitlines()
    assert lines[1] == (
        "dumped on    gpu-node-7 at 2026-12-01T10:00:00.000000Z (kernel 6.18.0, record version 2)"
    )
    assert lines[3] == (
        "GPUs used    nvidia5 (nvidia)  NVIDIA H200  GPU-aaaa  bus 0000:05:00.0  "
        "/run/nvidia/driver/dev/nvidia5"
    )
    assert "dump checks  mig-in-use (error): MIG" in lines


def test_the_same_answer_from_an_archive(tmp_path: Path) -> None:
    checkpoint = images(tmp_path, ONE_H200)
    archive = tmp_path / "checkpoint.tar.zst"
    archive.write_bytes(compress(engine_tar(checkpoint, record_last=True), "zstd"))
    for output in ("json", "affinity", "selector"):
        assert (
            inspect(archive, "--format", output).stdout
            == inspect(checkpoint, "--format", output).stdout
        )
    assert inspect(archive).stdout.splitlines()[0] == (
        f"checkpoint   checkpoint/gpu-device-watcher.json in {archive}"
    )


def test_no_record_is_exit_1_with_the_contracts_line(tmp_path: Path) -> None:
    archive = tmp_path / "checkpoint.tar"
    archive.write_bytes(engine_tar(None))
    done = inspect(archive)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"gpu-device-watcher: no GPU record in {archive}: it was taken without the "
        "gpu-device-watcher action, so nothing can be checked\n"
    )


@pytest.mark.parametrize("content", ["{not json", '{"version": 9, "map": {}, "used": []}'])
def test_an_unusable_record_is_exit_1(tmp_path: Path, content: str) -> None:
    done = inspect(images(tmp_path, content))
    assert (done.returncode, done.stdout) == (1, "")
    [line] = done.stderr.splitlines()
    assert line.startswith(
        ("gpu-device-watcher: record-unreadable: ", "gpu-device-watcher: record-version: ")
    )


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["{tmp}"], "neither a CRIU image directory"),
        (["/nonexistent"], "CHECKPOINT /nonexistent: No such file or directory"),
        (["{record}", "--format", "yaml"], "invalid choice"),
        (["{record}", "--version-match", "minor"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, arguments: list[str], says: str) -> None:
    checkpoint = images(tmp_path, ONE_H200)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [
        argument.replace("{tmp}", str(empty)).replace("{record}", str(checkpoint))
        for argument in arguments
    ]
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "inspect", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, "")
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: ") and says in line


def test_a_crafted_record_forges_no_yaml_nor_line(tmp_path: Path) -> None:
    forged = '580.95.05"]\n      - key: evil\n        operator: Exists'
    content = record(
        used_gpu(5, 'H200"]\n  evil: [x', "GPU-aaaa"),
        driver=forged,
        hostname="node\n# injected\x1b[2J",
    )
    checkpoint = images(tmp_path, content)
    done = inspect(checkpoint, "--format", "affinity")
    found = expressions(done)
    assert all(
        key in {"checkpoint-ready", "gpu-model", "gpu-count", "cuda-checkpoint"}
        for key, _, _ in found
    )
    assert ("gpu-model", "In", ["H200-evil-x"]) in found
    assert "\x1b" not in done.stdout and "evil:" not in done.stdout
    selector = inspect(checkpoint, "--format", "selector").stdout
    assert "evil" not in selector.replace("H200-evil-x", "")
    shown = inspect(checkpoint).stdout
    assert "\x1b" not in shown
    assert all(not line.startswith("# injected") for line in shown.splitlines())
