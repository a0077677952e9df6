"""Fixtures for the CRIU action tests: a simulated host served by the real daemon, process
trees, and a real CRIU (skipped, with the reason, where it cannot be had)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import namespace_problem

from .harness import Criu, CriuUnavailable, Tree, prepare_criu, spawn_tree, subreaper
from .simhost import HostSpec, SimHost

NEEDS = "needs root, unshare -m, nsenter, tmpfs mounts and mknod"


@pytest.fixture(scope="session")
def namespaces_available(tmp_path_factory: pytest.TempPathFactory) -> None:
    problem = namespace_problem(
        ("unshare", "nsenter", "mount"),
        'mount -t tmpfs probe "$1" && mknod "$1/c" c 1 5 && head -c 1 "$1/c" >/dev/null',
        tmp_path_factory.mktemp("criu-probe"),
    )
    if problem is not None:
        pytest.skip(f"{NEEDS}: {problem}")


@pytest.fixture(scope="package", autouse=True)
def _adopt_orphans() -> Iterator[None]:
    # Trees killed by CRIU's dump and trees restored with `restore -d` become orphans; adopt
    # them so that they can be collected (pid 1 may never reap them, and a zombie's pid is
    # one that the next restore of the same image needs).
    with subreaper():
        yield


@pytest.fixture(scope="session")
def criu() -> Criu:
    try:
        return Criu(prepare_criu())
    except CriuUnavailable as error:
        pytest.skip(f"no CRIU: {error}")


@pytest.fixture
def make_host(namespaces_available: None, tmp_path: Path) -> Iterator[Callable[..., SimHost]]:
    """Start simulated hosts (each with its daemon); all are stopped at teardown."""
    hosts: list[SimHost] = []

    def make(spec: HostSpec | None = None, name: str = "host") -> SimHost:
        host = SimHost(tmp_path / name, spec)
        host.start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.stop()


@pytest.fixture
def host(make_host: Callable[..., SimHost]) -> SimHost:
    return make_host()


@pytest.fixture
def trees() -> Iterator[Callable[..., Tree]]:
    """Spawn process trees; whatever still runs under their pids is killed at teardown."""
    spawned: list[Tree] = []

    def spawn(hold: str | None = "/dev/zero") -> Tree:
        tree = spawn_tree(hold)
        spawned.append(tree)
        return tree

    yield spawn
    for tree in spawned:
        tree.close()
