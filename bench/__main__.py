"""`python -m bench [--quick]`: the whole benchmark suite, one table, results and plots.

Run as root from the repository root (it mounts in a private namespace and runs CRIU):

    .venv/bin/pip install -e '.[bench]'
    sudo .venv/bin/python -m bench --quick      # a few minutes
    sudo .venv/bin/python -m bench              # the full run (~8 minutes)

Parts, each beside a baseline measured in the same run:

- bench.suite (under `unshare -m`): query, whole processes, change detection, idle, storm,
  memory, throughput and kernel uevents against the real daemon on a GPU-Operator-shaped host;
- bench.scrape_flood: `get` on the Unix socket while eight processes scrape `/metrics`
  without pause, against `get` idle;
- bench.criu_cost: what the action script adds to `criu dump` and `criu restore`, when the
  CRIU that `tests/criu/fetch_criu.sh .criu` prepares is there (skipped otherwise);
- bench.archive_cost: `restore-check` on checkpoint archives (plain and zstd, the record
  first and last) against the same checkpoint unpacked; `--archive-gib 4` is the size the
  docs report (the default keeps the run short).

Writes bench/results.json and bench/bench-*.png; `--docs` also copies the plots into docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.criu_cost import WHEEL

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results.json"
CRIU = REPO / ".criu" / "criu"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "findmnt": _first_line(["findmnt", "--version"]),
        "load_before": os.getloadavg(),
    }


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as error:
        return f"unavailable ({error})"
    return (done.stdout or done.stderr).strip().split("\n", 1)[0]


def run_live(quick: bool, only: str, before: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gdw-bench-results-") as directory:
        output = Path(directory) / "live.json"
        command = [sys.executable, "-m", "bench.suite", "--json", str(output), "--only", only]
        if quick:
            command.append("--quick")
        if before is not None:
            command += ["--before", str(before)]
        subprocess.run(command, cwd=REPO, check=True, timeout=3600)
        result: dict[str, Any] = json.loads(output.read_text())
        return result


def run_scrape_flood(quick: bool, before: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gdw-bench-flood-") as directory:
        output = Path(directory) / "flood.json"
        command = [sys.executable, "-m", "bench.scrape_flood", "--json", str(output)]
        if quick:
            command.append("--quick")
        if before is not None:
            command += ["--before", str(before)]
        subprocess.run(command, cwd=REPO, check=True, timeout=3600)
        result: dict[str, Any] = json.loads(output.read_text())
        return result


def run_criu(quick: bool, before: Path | None = None) -> dict[str, Any]:
    if not os.access(CRIU, os.X_OK):
        prepare = "tests/criu/fetch_criu.sh .criu"
        return {"skipped": f"no CRIU at {CRIU.relative_to(REPO)} (prepare it: {prepare})"}
    runs = 5 if quick else 15
    with tempfile.TemporaryDirectory(prefix="gdw-bench-criu-") as directory:
        output = Path(directory) / "criu.json"
        command = [sys.executable, "-m", "bench.criu_cost", "--runs", str(runs)]
        command += ["--json", str(output)]
        if before is not None:
            command += ["--before", str(before)]
        done = subprocess.run(
            command,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if done.returncode != 0 or not output.exists():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            return {"skipped": f"bench.criu_cost failed: {lines[-1]}"}
        measured: dict[str, Any] = json.loads(output.read_text())
    variants = measured["variants"]
    baseline = variants[0]
    # What a node that installs the package runs: the wheel in a venv of its own.
    action = next(variant for variant in variants if variant["label"] == WHEEL)
    before_variant = next((v for v in variants if v["label"] == "action (before)"), None)
    return {**measured, "baseline": baseline, "action": action, "before": before_variant}


def run_archives(gib: float, quick: bool) -> dict[str, Any]:
    if shutil.which("zstd") is None or not os.access("/usr/bin/time", os.X_OK):
        return {"skipped": "needs zstd and GNU time (/usr/bin/time)"}
    with tempfile.TemporaryDirectory(prefix="gdw-bench-results-") as directory:
        output = Path(directory) / "archives.json"
        command = [sys.executable, "-m", "bench.archive_cost", "--gib", str(gib)]
        command += ["--runs", "3" if quick else "7", "--json", str(output)]
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False
        )
        if done.returncode != 0 or not output.exists():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            return {"skipped": f"bench.archive_cost failed: {lines[-1]}"}
        measured: dict[str, Any] = json.loads(output.read_text())
        return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes")
    parser.add_argument("--no-criu", action="store_true", help="skip the CRIU part")
    parser.add_argument(
        "--no-flood", action="store_true", help="skip `get` under a scrape flood (k)"
    )
    parser.add_argument(
        "--docs", action="store_true", help="copy the plots into docs/ (for docs/benchmarks.md)"
    )
    parser.add_argument("--only", default="abcdefgij", help="live phases to run, by letter")
    parser.add_argument(
        "--archive-gib",
        type=float,
        default=0.25,
        help="pages in the checkpoint archives of bench.archive_cost (the docs report 4)",
    )
    parser.add_argument("--no-archives", action="store_true", help="skip the archives part")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier version, measured beside this one (phase i, CRIU)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: needs root (private mount namespaces, tmpfs, mknod, CRIU)")

    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "quick": arguments.quick}
    results["live"] = run_live(arguments.quick, arguments.only, arguments.before)
    if not arguments.no_flood:
        print("bench: k. get under a scrape flood", file=sys.stderr, flush=True)
        results["scrape_flood"] = run_scrape_flood(arguments.quick, arguments.before)
    if arguments.no_criu:
        results["criu"] = {"skipped": "--no-criu"}
    else:
        print("bench: h. CRIU", file=sys.stderr, flush=True)
        results["criu"] = run_criu(arguments.quick, arguments.before)
    if arguments.no_archives:
        results["archives"] = {"skipped": "--no-archives"}
    else:
        print("bench: l. checkpoint archives", file=sys.stderr, flush=True)
        results["archives"] = run_archives(arguments.archive_gib, arguments.quick)
    results["seconds"] = round(time.monotonic() - started, 1)
    arguments.results.write_text(json.dumps(results, indent=1) + "\n")

    print(report.table(results))
    if "cases" in results["archives"]:
        from bench.archive_cost import table as archive_table  # noqa: PLC0415

        print("\n" + archive_table(results["archives"]))
    print(
        f"\n{results['machine']['nproc']} CPUs ({results['machine']['cpu']}), kernel "
        f"{results['machine']['kernel']}, Python {results['machine']['python']}; "
        f"{results['seconds']:g} s; results in {arguments.results}"
    )
    try:
        written = plots.draw(results, BENCH)
    except ImportError:
        print("bench: no plots: install the bench extra (pip install -e '.[bench]')")
        return 0
    for path in written:
        print(f"plot: {path.relative_to(REPO)}")
        if arguments.docs:
            shutil.copyfile(path, REPO / "docs" / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
