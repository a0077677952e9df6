"""`gpu-device-watcher restore-check CHECKPOINT`: the gate for orchestrators, as a command.

Against the daemons of simulated hosts (see simhost.py): a checkpoint dumped on one host is
checked on another whose GPU has another minor and UUID (fits, with the device map), on one
whose GPU is another model (does not fit), with the daemon gone (a direct scan), and with
usage errors. JSON and text both; exit 0 fits, 1 does not, 2 usage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import Tree
from .simhost import H200, NVIDIA_MAJOR, Gpu, HostSpec, SimHost
from .test_action import prefixed, read_record, run_action

TIMEOUT = 30.0
UUID_A = "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f"  # the default host's nvidia5
UUID_C = "GPU-3c5e7a9b-1d2f-4a6c-8e0b-2d4f6a8c0e1f"


def other_minor_spec(model: str = H200) -> HostSpec:
    """A host whose only GPU is nvidia3 with another UUID (its node: /dev/null's numbers)."""
    return HostSpec(
        nodes={"nvidiactl": (NVIDIA_MAJOR, 255), "nvidia3": (NVIDIA_MAJOR, 3)},
        gpus=[Gpu("0000:af:00.0", 3, model=model, uuid=UUID_C)],
    )


def restore_check(
    images: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "restore-check", str(images), *options],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def dumped(make_host: Callable[..., SimHost], trees: Callable[..., Tree], tmp_path: Path) -> Path:
    """Images of a tree that held nvidia5 (GPU A, an H200) on the default host."""
    source = make_host(name="source")
    images = tmp_path / "images"
    images.mkdir()
    done = run_action("pre-dump", source.env(), images, trees("/dev/zero").root)
    assert done.returncode == 0, done.stderr
    assert read_record(images)["used"][0]["gpu"]["uuid"] == UUID_A
    source.stop()
    return images


def test_another_minor_and_uuid_fits_with_a_device_map(
    make_host: Callable[..., SimHost], dumped: Path
) -> None:
    target = make_host(other_minor_spec(), name="target")
    done = restore_check(dumped, "--socket", str(target.socket))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"gpu-device-watcher: device map {UUID_A}={UUID_C}",
        "gpu-device-watcher: the GPU devices of the checkpoint (nvidia5 as /dev/nvidia3) match "
        "this host: restore may go on",
    ]
    as_json = restore_check(dumped, "--socket", str(target.socket), "--format", "json")
    assert as_json.returncode == 0
    verdict: dict[str, Any] = json.loads(as_json.stdout)
    assert verdict == {
        "fits": True,
        "remap": True,
        "record": {
            "hostname": os.uname().nodename,
            "driver": "580.95.05",
            "created": read_record(dumped)["created"],
        },
        "reasons": [],
        "devices": [{"name": "nvidia5", "path": "/dev/nvidia5", "here": "/dev/nvidia3"}],
        "device_map": {UUID_A: UUID_C},
    }


def test_another_model_does_not_fit(make_host: Callable[..., SimHost], dumped: Path) -> None:
    target = make_host(other_minor_spec("NVIDIA A100-SXM4-80GB"), name="target")
    done = restore_check(dumped, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert (verdict["fits"], verdict["device_map"]) == (False, {})
    assert [reason["code"] for reason in verdict["reasons"]] == ["gpu-model"]
    text = restore_check(dumped, "--socket", str(target.socket))
    assert text.returncode == 1
    assert prefixed(text.stdout)[0].startswith("gpu-device-watcher: gpu-model: nvidia5 used")
    assert prefixed(text.stdout)[-1].startswith("gpu-device-watcher: restore stopped:")


def test_an_old_driver_cannot_remap(make_host: Callable[..., SimHost], dumped: Path) -> None:
    spec = other_minor_spec()
    spec.driver_version = "570.86.10"
    target = make_host(spec, name="target")
    done = restore_check(dumped, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 1
    assert [r["code"] for r in json.loads(done.stdout)["reasons"]] == [
        "driver-version",
        "remap-unsupported",
    ]


def test_without_the_daemon_it_scans_directly(
    make_host: Callable[..., SimHost], dumped: Path, tmp_path: Path
) -> None:
    # Inside the target's namespace (where its nodes are), with its config naming the host
    # view, and no daemon at the socket: the same verdict from a direct scan.
    target = make_host(other_minor_spec(), name="target")
    command = [
        sys.executable,
        "-m",
        "watcher",
        "restore-check",
        str(dumped),
        "--socket",
        str(tmp_path / "nobody.sock"),
        "--config",
        str(target.config),
        "--format",
        "json",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = target.run_inside(command, env)
    assert done.returncode == 0, done.stdout + done.stderr
    [note] = done.stderr.splitlines()
    assert note.startswith("gpu-device-watcher: cannot reach the daemon at")
    assert note.endswith("scanning this host directly instead")
    assert json.loads(done.stdout)["device_map"] == {UUID_A: UUID_C}


def test_no_record_fits_anywhere(tmp_path: Path) -> None:
    # An image directory that CRIU wrote without our action: its inventory, no record.
    (tmp_path / "inventory.img").write_bytes(b"")
    done = restore_check(tmp_path, "--socket", str(tmp_path / "nobody.sock"))
    assert done.returncode == 0
    assert done.stderr == ""  # nobody was asked: nothing to check
    assert done.stdout == (
        f"gpu-device-watcher: no GPU record in {tmp_path}: it was taken without the "
        "gpu-device-watcher action, so nothing can be checked\n"
    )
    as_json_done = restore_check(tmp_path, "--format", "json")
    assert as_json_done.returncode == 0
    assert as_json_done.stderr.startswith("gpu-device-watcher: no GPU record in ")
    as_json = json.loads(as_json_done.stdout)
    assert as_json == {
        "fits": True,
        "remap": False,
        "record": None,
        "reasons": [],
        "devices": [],
        "device_map": {},
    }


def test_an_empty_used_fits_anywhere(tmp_path: Path) -> None:
    (tmp_path / "gpu-device-watcher.json").write_text('{"version": 2, "map": {}, "used": []}')
    done = restore_check(tmp_path, "--socket", str(tmp_path / "nobody.sock"))
    assert done.returncode == 0
    assert "an empty 'used' in its record): any host can take it back" in done.stdout


def test_an_unreadable_record_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "gpu-device-watcher.json").symlink_to("/dev/zero")
    done = restore_check(tmp_path, "--format", "json")
    assert done.returncode == 1
    [reason] = json.loads(done.stdout)["reasons"]
    assert reason["code"] == "record-unreadable"


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ([], "CHECKPOINT"),
        (["/nonexistent/images"], "CHECKPOINT /nonexistent/images: No such file or directory"),
        (["{tmp}"], "neither a CRIU image directory (no inventory.img) nor a directory that"),
        (["/dev/null"], "not a directory nor a file"),
        (["{tmp}", "--format", "yaml"], "invalid choice"),
        (["{tmp}", "--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, arguments: list[str], says: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "restore-check",
            *(argument.replace("{tmp}", str(tmp_path)) for argument in arguments),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: ") and says in line


def test_restore_check_asks_the_daemon_without_importing_anything_heavy(
    make_host: Callable[..., SimHost], dumped: Path
) -> None:
    target = make_host(other_minor_spec(), name="target")
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    done = restore_check(dumped, "--socket", str(target.socket), env=env)
    assert done.returncode == 0
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "watcher.criu.gate" in imported  # the profile does cover the check
    assert imported & {"asyncio", "anyio", "msgspec", "watcher.probe", "watcher.config"} == set()
