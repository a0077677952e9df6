"""Run a test module's scenario in a fresh interpreter inside a private mount namespace.

Kept importable from here; the code lives in `tests.support.processes`.
"""

from __future__ import annotations

from tests.support.processes import REPO, run_scenario_module

__all__ = ["REPO", "run_scenario_module"]
