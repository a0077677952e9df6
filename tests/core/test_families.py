"""The family table drives the scanner, the probe and the daemon's event filter.

A made-up family ("acme": control node `acmectl`, GPUs `acme0`.., a `acme-links/` subdir,
its own /proc files and driver-ready keys) is scanned from a real directory tree: every
name in the map and in its messages comes from the table, none from NVIDIA's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.hostfiles import mknod
from watcher.core.devices import NVIDIA, Expected, Family, NodeSpec
from watcher.core.snapshot import HostView
from watcher.daemon.scanning import event_filter, watched_subdirs
from watcher.probe import scan

ACME = Family(
    specs=(
        NodeSpec("control", re.compile(r"acmectl"), ("acme",), 0),
        NodeSpec("gpu", re.compile(r"acme(?P<n>[1-9]?[0-9])"), ("acme",)),
        NodeSpec("cap", re.compile(r"acme-links/link(?P<n>[0-9]+)"), ("acme-links",)),
    ),
    subdirs=("acme-links",),
    core_majors=("acme",),
    display="ACME",
    control="acmectl",
    gpu_node="acme{minor}",
    expected=(Expected("acmectl", "error", "every ACME process opens it"),),
    recreate="acme-mknod",
    load_hint="modprobe acme",
    proc_version="driver/acme/version",
    proc_gpus="driver/acme/gpus",
    ready_root_key="ACME_DRIVER_ROOT",
    ready_dev_key="ACME_DEV_ROOT",
    opened_by="the ACME plugin",
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of character devices needs root")


def _host(tmp_path: Path) -> HostView:
    root, proc = tmp_path / "root", tmp_path / "proc"
    (root / "run/acme/dev/acme-links").mkdir(parents=True)
    (root / "dev").mkdir()
    (proc / "driver/acme/gpus/0000:01:00.0").mkdir(parents=True)
    (proc / "devices").write_text("Character devices:\n240 acme\n241 acme-links\n")
    (proc / "driver/acme/version").write_text("NVRM version: ACME Module  1.2.3  Release\n")
    (proc / "driver/acme/gpus/0000:01:00.0/information").write_text(
        "Model: Acme One\nDevice Minor: 0\nGPU UUID: GPU-acme\n"
    )
    validations = root / "run/acme/validations"
    validations.mkdir(parents=True)
    (validations / "driver-ready").write_text("ACME_DRIVER_ROOT=/run/acme\n")
    for name, minor in (("acmectl", 0), ("acme0", 0), ("acme-links/link3", 3)):
        major = 241 if name.startswith("acme-links") else 240
        mknod(root / "run/acme/dev" / name, major, minor)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"1 0 0:1 / {tmp_path} rw - tmpfs tmpfs rw\n")
    return HostView(
        root=str(root),
        proc=str(proc),
        mountinfo=str(mountinfo),
        driver_roots=("/",),
        validations_dir="/run/acme/validations",
    )


@needs_root
def test_a_new_family_is_scanned_from_its_table_alone(tmp_path: Path) -> None:
    device_map = scan(_host(tmp_path), families=(ACME,))
    assert device_map.driver.loaded is True
    assert device_map.driver.version == "1.2.3"
    assert device_map.driver.source == "validations"
    assert device_map.driver.dev_root == "/run/acme/dev"
    assert [(d.name, d.kind, d.valid) for d in device_map.devices] == [
        ("acme-links/link3", "cap", True),
        ("acme0", "gpu", True),
        ("acmectl", "control", True),
    ]
    assert [gpu.device for gpu in device_map.gpus] == ["/run/acme/dev/acme0"]
    messages = " ".join(problem.message for problem in device_map.problems)
    assert "ACME device nodes are in /run/acme/dev" in messages
    assert "/dev/acmectl (the ACME plugin among them)" in messages
    assert "nvidia" not in messages.lower()


@needs_root
def test_a_new_family_reports_its_own_missing_nodes_and_driver(tmp_path: Path) -> None:
    view = _host(tmp_path)
    os.unlink(Path(view.root) / "run/acme/dev/acmectl")
    os.unlink(Path(view.root) / "run/acme/dev/acme0")
    device_map = scan(view, families=(ACME,))
    missing = {p.path: p.message for p in device_map.problems if p.code == "missing-node"}
    assert set(missing) == {"/run/acme/dev/acmectl", "/run/acme/dev/acme0"}
    assert "every ACME process opens it: run acme-mknod" in missing["/run/acme/dev/acmectl"]
    Path(view.proc, "devices").write_text("Character devices:\n1 mem\n")
    unloaded = scan(view, families=(ACME,))
    (problem,) = [p for p in unloaded.problems if p.code == "driver-not-loaded"]
    assert "the ACME kernel driver is not loaded" in problem.message
    assert "lists no 'acme'" in problem.message and "(modprobe acme)" in problem.message


def test_the_event_filter_follows_the_families() -> None:
    acme_only = event_filter((ACME,))
    assert acme_only("acmectl") and acme_only("acme7") and acme_only("link3")
    assert acme_only("acme-links") and acme_only("driver-ready")
    assert not acme_only("nvidiactl") and not acme_only("null")
    both = event_filter((NVIDIA, ACME))
    assert both("nvidiactl") and both("acmectl") and both("nvidia-cap1")
    assert watched_subdirs((NVIDIA, ACME)) == (*NVIDIA.subdirs, "acme-links")


def test_no_nvidia_name_is_hard_coded_in_the_scanner_the_probe_or_the_event_filter() -> None:
    """Names of the NVIDIA family live in its table (core/devices.py) only; what is left in
    these modules is the GPU Operator's driver-root defaults (config defaults)."""
    package = Path(__file__).resolve().parents[2] / "watcher"
    allowed = {'"/run/nvidia/driver"', '"/run/nvidia/validations"'}
    for module in ("core/scan.py", "probe.py", "daemon/scanning.py"):
        for number, line in enumerate((package / module).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            literals = re.findall(r'"[^"]*"', code)
            for literal in literals:
                if "nvidia" in literal.lower() and literal not in allowed:
                    pytest.fail(f"{module}:{number}: {line.strip()}")
