"""Fixtures: a simulated GPU Operator host in a private mount namespace, and the real daemon."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import namespace_problem

from .harness import Daemon, Namespace, mounts_under

NEEDS = "needs root, unshare -m and nsenter (private mount namespaces, tmpfs, mknod)"


@pytest.fixture(scope="session")
def namespaces_available() -> None:
    if (problem := namespace_problem(("unshare", "nsenter"))) is not None:
        pytest.skip(f"{NEEDS}: {problem}")


@pytest.fixture
def base(namespaces_available: None) -> Iterator[Path]:
    # Short, under /tmp: socket paths must fit the 107 bytes of sun_path.
    directory = Path(tempfile.mkdtemp(prefix="gdw-d-", dir="/tmp"))
    config = directory / "config.toml"
    config.write_text("")
    config.chmod(0o600)
    yield directory
    leaked = mounts_under(directory)
    shutil.rmtree(directory, ignore_errors=True)
    # The namespace died with its processes: nothing of it may show up here.
    assert leaked == [], f"mounts leaked into the test's namespace: {leaked}"


@pytest.fixture
def host(base: Path) -> Iterator[Namespace]:
    namespace = Namespace(base)
    try:
        namespace.build_operator_host()
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def socket_path(base: Path) -> Path:
    return base / "gdw.sock"


@pytest.fixture
def start_daemon(host: Namespace, base: Path, socket_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon (ready when returned); every one started is stopped afterwards."""
    started: list[Daemon] = []

    def start(*extra: str, ready: bool = True) -> Daemon:
        daemon = Daemon(host, socket_path, config=base / "config.toml", extra=extra)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.close()
    for daemon in started:
        assert "Traceback" not in daemon.log_text, daemon.log_text


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()
