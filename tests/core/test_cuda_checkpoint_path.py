"""`driver.cuda_checkpoint`: where the map says an executable cuda-checkpoint is.

The driver root's `usr/bin` first, then the host's `/usr/local/bin`, then `/usr/bin`; only
candidates the probe found executable count (`HostSnapshot.cuda_checkpoints`): a regular
file with an execute bit, a symlink followed inside the host view.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.support.hostfiles import mknod, proc_devices_text
from watcher.core.scan import build_map
from watcher.core.snapshot import HostView, cuda_checkpoint_candidates
from watcher.probe import read_host, scan

from .test_build_map import OPERATOR_ROOT, UPDATED, operator_host

IN_ROOT = f"{OPERATOR_ROOT}/usr/bin/cuda-checkpoint"
LOCAL, USR = "/usr/local/bin/cuda-checkpoint", "/usr/bin/cuda-checkpoint"


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        (set(), None),
        ({USR}, USR),
        ({LOCAL, USR}, LOCAL),
        ({IN_ROOT, LOCAL, USR}, IN_ROOT),
        ({"/run/elsewhere/usr/bin/cuda-checkpoint"}, None),  # not a candidate of this map
    ],
)
def test_the_driver_root_comes_first(found: set[str], expected: str | None) -> None:
    host = operator_host()
    snapshot = dataclasses.replace(host.snapshot(), cuda_checkpoints=frozenset(found))
    device_map = build_map(host.view, snapshot, generation=0, updated=UPDATED)
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.cuda_checkpoint == expected


def test_the_candidates_cover_every_driver_root_and_the_host() -> None:
    host = operator_host()
    assert cuda_checkpoint_candidates(host.snapshot().candidates) == [
        "/usr/bin/cuda-checkpoint",  # the driver root "/" is a candidate too
        IN_ROOT,
        LOCAL,
    ]


def _executable(path: Path, mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(mode)


def _driver_root(root: Path, proc: Path, driver_root: str) -> None:
    """A driver root the scan chooses: driver-ready names it, its dev holds nvidiactl."""
    validations = root / "run/nvidia/validations"
    validations.mkdir(parents=True, exist_ok=True)
    (validations / "driver-ready").write_text(f"NVIDIA_DRIVER_ROOT={driver_root}\n")
    proc.mkdir()
    (proc / "devices").write_text(proc_devices_text({"nvidia-frontend": 195}))
    mknod(root / driver_root.lstrip("/") / "dev/nvidiactl", 195, 255)


def test_a_scan_takes_the_chosen_driver_roots_own_first(tmp_path: Path) -> None:
    view = HostView(root=str(tmp_path / "root"), proc=str(tmp_path / "proc"))
    _driver_root(tmp_path / "root", tmp_path / "proc", OPERATOR_ROOT)
    root = tmp_path / "root"
    _executable(root / "usr/bin/cuda-checkpoint")
    _executable(root / OPERATOR_ROOT.lstrip("/") / "usr/bin/cuda-checkpoint")
    assert scan(view).driver.root == OPERATOR_ROOT
    assert scan(view).driver.cuda_checkpoint == IN_ROOT
    (root / OPERATOR_ROOT.lstrip("/") / "usr/bin/cuda-checkpoint").unlink()
    assert scan(view).driver.cuda_checkpoint == USR
    _executable(root / "usr/local/bin/cuda-checkpoint")
    assert scan(view).driver.cuda_checkpoint == LOCAL


def test_the_probe_finds_only_executable_files(tmp_path: Path) -> None:
    view = HostView(root=str(tmp_path))
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/local/bin/cuda-checkpoint").write_text("not executable")
    (tmp_path / "usr/bin/cuda-checkpoint").write_text("#!/bin/sh\n")
    (tmp_path / "usr/bin/cuda-checkpoint").chmod(0o755)
    assert read_host(view).cuda_checkpoints == frozenset({USR})


def test_a_directory_or_a_file_without_an_execute_bit_is_not_one(tmp_path: Path) -> None:
    view = HostView(root=str(tmp_path))
    _executable(tmp_path / "usr/bin/cuda-checkpoint", mode=0o644)
    (tmp_path / "usr/local/bin/cuda-checkpoint").mkdir(parents=True)
    assert read_host(view).cuda_checkpoints == frozenset()


def test_symlinks_are_followed_inside_the_host_view(tmp_path: Path) -> None:
    """Under --root /host, an absolute link names a host path, not one of this process:
    the link's target exists here (/bin/sh) but not under the root."""
    view = HostView(root=str(tmp_path))
    (tmp_path / "usr/bin").mkdir(parents=True)
    link = tmp_path / "usr/bin/cuda-checkpoint"
    link.symlink_to("/bin/sh")
    assert os.access("/bin/sh", os.X_OK)
    assert read_host(view).cuda_checkpoints == frozenset()
    _executable(tmp_path / "bin/sh")
    assert read_host(view).cuda_checkpoints == frozenset({USR})
    link.unlink()
    link.symlink_to("../../opt/cuda/bin/cuda-checkpoint")  # relative, through the root's /opt
    _executable(tmp_path / "opt/cuda/bin/cuda-checkpoint")
    assert read_host(view).cuda_checkpoints == frozenset({USR})
    # A loop is not an executable (and does not hang).
    link.unlink()
    link.symlink_to("cuda-checkpoint")
    assert read_host(view).cuda_checkpoints == frozenset()
