"""Driver pods restarting under the daemon, inotify overflow, watched directories replaced.

Each test runs a scenario (`scenarios.py`) in a private mount namespace shared by the driving
process and the daemon; after every settle the live map must equal a fresh scan of the same
host. `late` counts maps that were right only after a longer quiet period (latency), `lost`
those that never became right (a missed change: the goal is 0).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import run_scenario

pytestmark = pytest.mark.reliability

RESTART_CYCLES = 500
# No new generation for this long = settled. Three times the default 20 ms debounce, plus a
# scan; a slower publication is counted `late` (and checked again), not lost.
QUIET = 0.07


def _explain(result: dict[str, Any], log: Path, seed: int) -> str:
    examples = json.dumps(result.get("examples"), indent=1)[:6000]
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return f"seed {seed} (GDW_RELIABILITY_SEED)\nfirst divergences: {examples}\nlog:\n{tail}"


def test_driver_container_restarts_keep_the_map_true(
    namespaces: None, base: Path, soak: int, seed: int, record: Callable[..., None]
) -> None:
    cycles = RESTART_CYCLES * soak
    log = base / "daemon.log"
    params = {
        "workdir": str(base / "ns"),
        "log": str(log),
        "seed": seed,
        "quiet": QUIET,
        "cycles": cycles,
    }
    (base / "ns").mkdir()
    result = run_scenario("restarts", params, timeout=60 + cycles * 1.0)
    record(
        "driver-container restarts (umount/remount, uvm major changes, lazy nodes)",
        f"{result['cycles']} cycles, {result['checks']} settles compared with a fresh scan",
        result["lost"],
        late=result["late"],
        major_changes=result["major_changes"],
        nested_dev_mounts=result["nested_dev"],
        lazy_uvm=result["lazy_uvm"],
        uvm_reloads=result["uvm_reloads"],
        settle_p50_s=result["settle_p50_s"],
        settle_max_s=result["settle_max_s"],
    )
    assert result["cycles"] == cycles
    assert result["lost"] == 0, _explain(result, log, seed)
    assert result["daemon_alive_at_end"], _explain(result, log, seed)
    assert result["daemon_exit"] == 0


def test_inotify_overflow_and_replaced_directories_recover(
    namespaces: None, base: Path, soak: int, seed: int, record: Callable[..., None]
) -> None:
    log = base / "daemon.log"
    params = {
        "workdir": str(base / "ns"),
        "log": str(log),
        "seed": seed,
        "quiet": QUIET,
        "overflow_rounds": 4 * soak,
        # 3 events a file: 21,000 queued, beyond the 16,384 of max_queued_events.
        "overflow_files": 7000,
        "recreate_rounds": 5 * soak,
    }
    (base / "ns").mkdir()
    result = run_scenario("churn", params, timeout=300 * soak)
    overflow, recreate = result["overflow"], result["recreate"]
    record(
        "inotify queue overflow (daemon stopped, >16,384 events, dev dir replaced meanwhile)",
        f"{overflow['rounds']} overflows ({overflow['events_queued']} events)",
        (overflow["rounds"] - overflow["recovered"])
        + (overflow["rounds"] - overflow["later_change_seen"]),
        overflow_logged=overflow["overflow_events_logged"],
        later_change_seen=overflow["later_change_seen"],
    )
    record(
        "watched directories deleted, renamed and recreated",
        f"{recreate['steps']} steps in {recreate['rounds']} rounds",
        recreate["steps"] - recreate["recovered"],
    )
    explain = _explain(result, log, seed)
    # The overflow really happened, and was seen as one.
    assert overflow["overflow_events_logged"] >= overflow["rounds"], explain
    assert overflow["recovered"] == overflow["rounds"], explain
    # The watch on the replaced directory works again: only a re-arm on overflow gives that.
    assert overflow["later_change_seen"] == overflow["rounds"], explain
    assert recreate["recovered"] == recreate["steps"], explain
    assert result["lost"] == 0, explain
    assert result["daemon_exit"] == 0
