"""Fixtures: a simulated GPU Operator host in a private mount namespace, and the real daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.processes import namespace_problem

from .harness import Daemon, Namespace, operator_namespace, scratch_base

NEEDS = "needs root, unshare -m and nsenter (private mount namespaces, tmpfs, mknod)"


@pytest.fixture(scope="session")
def namespaces_available() -> None:
    if (problem := namespace_problem(("unshare", "nsenter"))) is not None:
        pytest.skip(f"{NEEDS}: {problem}")


@pytest.fixture
def base(namespaces_available: None) -> Iterator[Path]:
    with scratch_base("gdw-d-") as directory:
        yield directory


@pytest.fixture
def host(base: Path) -> Iterator[Namespace]:
    with operator_namespace(base) as namespace:
        yield namespace


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
