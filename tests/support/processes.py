"""Child processes of the suites and the benchmarks: their environment, private mount
namespaces, and whether this machine can make them.

- `child_env`: the test's environment for a daemon or helper child, without anything
  systemd-ish that would leak into it, with this checkout first on PYTHONPATH.
- `PRIVATE_MOUNTS`: the command prefix of a child in its own private mount namespace.
- `namespace_problem`: why this machine cannot run such a child (None when it can), for a
  fixture's `pytest.skip`.
- `run_scenario_module`: a test module's scenario in a fresh interpreter in such a namespace.
- `die_with_parent`: a child's `preexec_fn` that has it killed when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "PRIVATE_MOUNTS",
    "REPO",
    "child_env",
    "die_with_parent",
    "namespace_problem",
    "run_scenario_module",
]

REPO = Path(__file__).resolve().parents[2]
PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private", "--")
# What systemd (or a test run under it) puts into an environment: passed on, a child would
# take the test's own notify socket, listening fds or journal stream for its own.
_SYSTEMD = ("LISTEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_")


_PR_SET_PDEATHSIG = 1
# Loaded here, not in the forked child, where dlopen could wait on a lock held at fork.
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """In a child before exec: SIGKILL it when the process that started it dies.

    A daemon or scenario must never outlive a test run that was killed or timed out (a
    leftover daemon keeps its private mount namespace alive).
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    drop: Sequence[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`base` (default: this process's environment) without the systemd variables and those
    starting with any of `drop`, with this checkout on PYTHONPATH, then `extra`."""
    source = os.environ if base is None else base
    prefixes = (*_SYSTEMD, *drop)
    env = {key: value for key, value in source.items() if not key.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), source.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def namespace_problem(
    tools: Sequence[str] = ("unshare",),
    script: str = "true",
    scratch: Path | None = None,
    timeout: float = 15,
) -> str | None:
    """Why `sh -c SCRIPT sh SCRATCH` cannot run as root in a private mount namespace here, or
    None when it ran. The script proves what the suite needs (a tmpfs, a node that opens)."""
    if os.geteuid() != 0:
        return "not running as root"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    command = [*PRIVATE_MOUNTS, "sh", "-c", script, "sh", str(scratch or "")]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"probe failed: {error}"
    if done.returncode != 0:
        return f"probe failed: {done.stderr.decode(errors='replace').strip()}"
    return None


def run_scenario_module(
    module: str, scenario: str, scratch: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE SCENARIO SCRATCH` under `unshare --mount --propagation private`.

    Mount tests need their own namespace, but unsharing pytest itself would move every later
    test into it (and `os.unshare` is missing on Python 3.11); a child under `unshare` is clean.
    """
    command = [
        *PRIVATE_MOUNTS,
        *(sys.executable, "-W", "error"),
        *("-W", "ignore:The asyncore module is deprecated:DeprecationWarning"),
        *("-m", module, scenario, str(scratch)),
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
