"""Fixtures of the reliability suite: counts scaled by --soak, hosts, daemons, a results table.

Every test here records what it tried and what was lost with `record(...)`; the table is
printed at the end of the run (and written as JSON to $GDW_RELIABILITY_REPORT when set), which
is where docs/reliability.md gets its numbers from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.host import mounts_under
from tests.support.processes import namespace_problem

from .harness import Daemon, Host, write_config

NEEDS = "needs root and unshare -m (mount namespaces, tmpfs, mknod, setuid)"
_RESULTS: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> int:
    """The factor counts are multiplied by: 1, or --soak-factor under --soak."""
    if request.config.getoption("--soak"):
        return max(1, int(request.config.getoption("--soak-factor")))
    return 1


@pytest.fixture(scope="session")
def seed() -> int:
    """Random timing is seeded; set GDW_RELIABILITY_SEED to replay a failing run."""
    value = os.environ.get("GDW_RELIABILITY_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


@pytest.fixture(scope="session")
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{NEEDS}: not running as root")


@pytest.fixture(scope="session")
def namespaces(as_root: None) -> None:
    if (problem := namespace_problem()) is not None:
        pytest.skip(f"{NEEDS}: {problem}")


@pytest.fixture
def base(as_root: None) -> Iterator[Path]:
    """A short directory under /tmp that every user can traverse (sockets need short paths;
    children that drop to nobody need to reach them). Nothing may stay mounted in it."""
    directory = Path(tempfile.mkdtemp(prefix="gdw-r-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    leaked = mounts_under(directory)
    shutil.rmtree(directory, ignore_errors=True)
    assert leaked == [], f"mounts leaked out of a scenario's namespace: {leaked}"


@pytest.fixture
def host(base: Path) -> Host:
    """A loaded driver with one GPU and its nodes in /run/nvidia/driver/dev (no mounts)."""
    host = Host(base / "host")
    host.populate()
    host.nodes(host.fs("/run/nvidia/driver/dev"), 509)
    return host


@pytest.fixture
def start_daemon(base: Path, host: Host) -> Iterator[Callable[..., Daemon]]:
    """Start `serve` on `host` with config keys; returned ready (READY=1). Stopped after."""
    started: list[Daemon] = []

    def start(*extra: str, name: str = "gdw", **config: Any) -> Daemon:
        config_path = write_config(base / f"{name}.toml", **config)
        args = host.options(base / f"{name}.sock", config_path, "/proc/self/mountinfo")
        daemon = Daemon([*args, *extra], base / f"{name}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.alive():
            assert daemon.stop() == 0, daemon.log_tail()
        assert "Traceback" not in daemon.log.read_text(errors="replace"), daemon.log_tail()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """record(what, tried, lost, **details): one row of the results table."""

    def add(what: str, tried: int | str, lost: int | str, **details: Any) -> None:
        _RESULTS.append(
            {"test": request.node.name, "what": what, "tried": tried, "lost": lost, **details}
        )

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("reliability: what was tried, what was lost")
    for row in _RESULTS:
        details = ", ".join(
            f"{key}={value}"
            for key, value in row.items()
            if key not in ("test", "what", "tried", "lost")
        )
        terminalreporter.write_line(
            f"{row['what']}: tried {row['tried']}, lost {row['lost']}"
            + (f" ({details})" if details else "")
        )
    target = os.environ.get("GDW_RELIABILITY_REPORT")
    if target:
        Path(target).write_text(json.dumps(_RESULTS, indent=2) + "\n")
