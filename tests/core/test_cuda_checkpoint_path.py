"""`driver.cuda_checkpoint`: where the map says an executable cuda-checkpoint is.

The driver root's `usr/bin` first, then the host's `/usr/local/bin`, then `/usr/bin`; only
candidates the probe found executable count (`HostSnapshot.cuda_checkpoints`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from watcher.core.scan import HostView, build_map, cuda_checkpoint_candidates
from watcher.probe import read_host

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


def test_the_probe_finds_only_executable_files(tmp_path: Path) -> None:
    view = HostView(root=str(tmp_path))
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/local/bin/cuda-checkpoint").write_text("not executable")
    (tmp_path / "usr/bin/cuda-checkpoint").write_text("#!/bin/sh\n")
    (tmp_path / "usr/bin/cuda-checkpoint").chmod(0o755)
    assert read_host(view).cuda_checkpoints == frozenset({USR})
