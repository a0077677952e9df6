"""Fixtures for real host layouts: skip cleanly where unshare -m, tmpfs or mknod are unusable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import namespace_problem
from watcher.core.mountinfo import parse_mountinfo

from .hostlayout import HostLayout

NEEDS = "needs root and unshare -m (mount namespaces, tmpfs mounts, mknod)"


@pytest.fixture(scope="session")
def realfs_available(tmp_path_factory: pytest.TempPathFactory) -> None:
    problem = namespace_problem(
        ("unshare", "mount"),
        'mount -t tmpfs probe "$1" && mknod "$1/c" c 195 255',
        tmp_path_factory.mktemp("realfs-probe"),
    )
    if problem is not None:
        pytest.skip(f"{NEEDS}: {problem}")


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
