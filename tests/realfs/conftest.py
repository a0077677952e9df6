"""Fixtures for real host layouts: skip cleanly where unshare -m, tmpfs or mknod are unusable."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.core.mountinfo import parse_mountinfo

from .hostlayout import HostLayout

NEEDS = "needs root and unshare -m (mount namespaces, tmpfs mounts, mknod)"


@pytest.fixture(scope="session")
def realfs_available(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{NEEDS}: not running as root")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip(f"{NEEDS}: unshare(1) or mount(8) not found")
    probe = tmp_path_factory.mktemp("realfs-probe")
    try:
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                'mount -t tmpfs probe "$1" && mknod "$1/c" c 195 255',
                "sh",
                str(probe),
            ],
            capture_output=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"{NEEDS}: probe failed: {error}")
    if done.returncode != 0:
        pytest.skip(f"{NEEDS}: probe failed: {done.stderr.decode(errors='replace').strip()}")


def _mount_points_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_bytes().decode("utf-8", "surrogateescape")
    prefix = str(path)
    return [
        entry.mount_point
        for entry in parse_mountinfo(text).entries
        if entry.mount_point == prefix or entry.mount_point.startswith(prefix + "/")
    ]


@pytest.fixture
def workdir(realfs_available: None, tmp_path: Path) -> Iterator[Path]:
    work = tmp_path / "host"
    work.mkdir()
    yield work
    # The namespace died with the child: nothing may stay mounted here, nothing written here.
    assert _mount_points_under(tmp_path) == []
    assert list(work.iterdir()) == []


@pytest.fixture
def layout(workdir: Path) -> HostLayout:
    return HostLayout(workdir)
