"""Run a test module's scenario in a fresh interpreter inside a private mount namespace.

Mount tests need their own namespace, but unsharing pytest itself would move every later
test into it (and `os.unshare` is missing on Python 3.11); a child under `unshare` is clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_scenario_module(
    module: str, scenario: str, scratch: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE SCENARIO SCRATCH` under `unshare --mount --propagation private`."""
    command = [
        *("unshare", "--mount", "--propagation", "private"),
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
