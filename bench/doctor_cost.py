"""What one `doctor` costs: the whole process, beside a bare interpreter, measured in turn.

Run as root: `python -m bench.doctor_cost [--runs N]`. It builds the test suite's simulated
GPU Operator node (tests/doctor/simnode.py: no daemon, so a direct scan; CRIU, runc, crun,
containerd, CRI-O and cuda-checkpoint stand-ins that doctor runs, as it runs the real
tools) in a temporary directory, then runs, N times each and interleaved so that the load of
the moment weighs on both alike, `python -I -c pass` and `python -m watcher doctor` on it.
Prints the medians and their ratio as JSON; no goal is asserted (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.doctor.simnode import build
from watcher.criu import actionfile


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="gdw-doctor-bench-") as scratch:
        node = build(Path(scratch), actionfile.build().data)
        bare = [sys.executable, "-I", "-c", "pass"]
        doctor = [sys.executable, "-m", "watcher", "doctor", *node.options()]
        times: dict[str, list[float]] = {"bare": [], "doctor": []}
        for _ in range(runs):
            times["bare"].append(_seconds(bare))
            times["doctor"].append(_seconds(doctor))
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(
        json.dumps(
            {
                "runs": runs,
                "bare_python_ms": round(medians["bare"], 1),
                "doctor_ms": round(medians["doctor"], 1),
                "ratio": round(medians["doctor"] / medians["bare"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
