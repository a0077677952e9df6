"""`scan --sys` and the `sys` config key: the AMD family from the command line.

A host tree under tmp_path (mknod'ed kfd and render nodes, a plain file as the mount table)
and a fake sysfs with an amdgpu and an i915 render node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hostfiles import drm_render, mknod, partitioned_gpu, proc_devices_text
from watcher.cli.render import describe_update
from watcher.contract import CHANGE_WORDS, summary_line

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of character devices needs root")
TIMEOUT = 30.0


def scan(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "scan", *options],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def amd_host(tmp_path: Path) -> list[str]:
    root, proc, sys_dir = tmp_path / "root", tmp_path / "proc", tmp_path / "sys"
    (root / "dev/dri").mkdir(parents=True)
    proc.mkdir()
    (proc / "devices").write_text(proc_devices_text({"drm": 226, "kfd": 235}))
    mknod(root / "dev/kfd", 235, 0)
    mknod(root / "dev/dri/renderD128", 226, 128)
    mknod(root / "dev/dri/renderD129", 226, 129)
    drm_render(sys_dir, 128, "0000:83:00.0", product_name="AMD Instinct MI210")
    drm_render(sys_dir, 129, "0000:00:02.0", driver="i915")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"1 0 0:1 / {tmp_path} rw - tmpfs tmpfs rw\n")
    config = tmp_path / "config.toml"
    config.write_text("")
    config.chmod(0o600)
    return [
        *("--root", str(root), "--proc", str(proc), "--sys", str(sys_dir)),
        *("--mountinfo", str(mountinfo), "--config", str(config)),
    ]


@needs_root
def test_scan_with_sys_in_every_format(amd_host: list[str]) -> None:
    as_json = scan(*amd_host)
    assert as_json.returncode == 0, as_json.stderr
    device_map = json.loads(as_json.stdout)
    assert [(d["name"], d["family"], d["valid"]) for d in device_map["devices"]] == [
        ("dri/renderD128", "amd", True),
        ("kfd", "amd", True),
    ]
    assert device_map["amd"] == {"loaded": True, "dev_root": "/dev"}
    assert device_map["gpus"] == [
        {
            "minor": 128,
            "bus_id": "0000:83:00.0",
            "model": "AMD Instinct MI210",
            "uuid": None,
            "device": "/dev/dri/renderD128",
            "family": "amd",
        }
    ]
    assert device_map["problems"] == []

    env = scan(*amd_host, "--format", "env").stdout.splitlines()
    assert "GDW_DEV_KFD=/dev/kfd" in env
    assert "GDW_DEV_DRI_RENDERD128=/dev/dri/renderD128" in env
    assert not any(line.startswith("GDW_DEV_DRI_RENDERD129=") for line in env)

    table = scan(*amd_host, "--format", "table").stdout
    assert "amd kfd (loaded)   dev root /dev" in table
    assert "AMD Instinct MI210" in table


@needs_root
def test_the_sys_config_key(amd_host: list[str], tmp_path: Path) -> None:
    options = amd_host[: amd_host.index("--sys")] + amd_host[amd_host.index("--sys") + 2 :]
    config = tmp_path / "config.toml"
    config.write_text(f'sys = "{tmp_path / "sys"}"\n')
    done = scan(*options)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["amd"]["dev_root"] == "/dev"
    config.write_text('sys = "relative/sys"\n')
    bad = scan(*options)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gpu-device-watcher: ") and "'sys'" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1


def test_sys_that_is_not_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = scan("--sys", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr == f"gpu-device-watcher: --sys {tmp_path / 'missing'}: not a directory\n"


def test_watch_lines_and_the_summary_name_amd_only_where_it_is() -> None:
    amd_only = {
        "driver": {"loaded": False, "version": None, "dev_root": None},
        "amd": {"loaded": True, "dev_root": "/dev"},
        "devices": [
            {
                "name": "kfd",
                "path": "/dev/kfd",
                "major": 235,
                "minor": 0,
                "mode": "0666",
                "valid": True,
                "family": "amd",
            },
        ],
        "problems": [],
    }
    first = describe_update(None, {"generation": 1, "map": amd_only})
    assert first == ["generation 1: AMD kfd loaded, 1 AMD devices in /dev"]
    render_node = {
        "name": "dri/renderD128",
        "path": "/dev/dri/renderD128",
        "major": 226,
        "minor": 128,
        "mode": "0666",
        "valid": True,
        "family": "amd",
    }
    later = {**amd_only, "devices": [render_node, *amd_only["devices"]]}
    change = {"change": "added", "name": "dri/renderD128", "path": "/dev/dri/renderD128"}
    lines = describe_update(amd_only, {"generation": 2, "map": later, "changes": [change]})
    assert lines == [
        f"generation 2: dri/renderD128 {CHANGE_WORDS['added']} /dev/dri/renderD128 "
        "(226:128, mode 0666)"
    ]
    nvidia_only = summary_line(
        loaded=True, version="580.95.05", dev_root="/dev", devices=2, invalid=0, severities=()
    )
    assert nvidia_only == "driver 580.95.05, 2 devices in /dev"
    both = summary_line(
        loaded=True,
        version="580.95.05",
        dev_root="/dev",
        devices=2,
        invalid=0,
        severities=(),
        amd_loaded=False,
        amd_dev_root="/dev",
        amd_devices=1,
    )
    assert both == "driver 580.95.05, 2 devices in /dev, AMD kfd not loaded, 1 AMD devices in /dev"


@needs_root
def test_scan_of_a_host_with_a_partitioned_gpu(amd_host: list[str], tmp_path: Path) -> None:
    """The MI210 host above plus an MI300X in CPX: its own render node 136 and partition
    amdgpu_xcp.0 on renderD137, which KFD names (tests/realfs/test_amd_partitions.py has
    the layout's sources)."""
    root, sys_dir = tmp_path / "root", tmp_path / "sys"
    for minor in (136, 137):
        mknod(root / f"dev/dri/renderD{minor}", 226, minor)
    partitioned_gpu(
        sys_dir, bus_id="0000:02:00.0", minors=(136, 137), first_partition=0, unique_id=42
    )
    done = scan(*amd_host)
    assert done.returncode == 0, done.stderr
    gpus = json.loads(done.stdout)["gpus"]
    assert [(g["minor"], g.get("partition"), g["bus_id"]) for g in gpus] == [
        (128, None, "0000:83:00.0"),
        (136, None, "0000:02:00.0"),
        (137, 0, "0000:02:00.0"),
    ]
    assert "partition" not in gpus[0]
    table = scan(*amd_host, "--format", "table").stdout
    [row] = [line for line in table.splitlines() if "renderD137" in line and "0000:02" in line]
    assert row.startswith("137 (partition 0)  0000:02:00.0  AMD Instinct MI300X")
