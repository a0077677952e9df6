"""What asking a checkpoint archive costs, against asking the same checkpoint unpacked.

`python -m bench.archive_cost [--gib 4] [--runs 5] [--dir DIR] [--json FILE]` builds one
checkpoint (a `checkpoint/` directory with CRIU's small images, our record and one
`pages-1.img` of the given size, of incompressible bytes as memory pages mostly are, and the
engine's `config.dump` and `spec.dump`), then the archives users hold:

- `plain-last.tar`: plain tar, the record as the last member (after every page);
- `first.tar.zst`: zstd, the record first (the engines' lexical order);
- `last.tar.zst`: zstd, the record last (the worst case: every page decompressed);

and times whole `gpu-device-watcher restore-check --format json` processes on each, beside
the same command on the unpacked directory (the baseline, same run), and beside `tar -tf` on
the plain archive and `zstd -dc | tar -t` on `last.tar.zst` (what the tools do). Each case
is run once to warm the page cache, then `--runs` times; the median wall time and the
largest peak RSS (the child's own `ru_maxrss`, from wait4) are reported. The record's
`used` is empty, so no host is asked: the times are the reading alone.

The archives really take their size on disk (tens of GiB in all at 4 GiB): `--dir` should be
on a filesystem with room; everything built is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results-archives.json")
RECORD = {
    "version": 2,
    "generation": 1,
    "hostname": "bench",
    "kernel": os.uname().release,
    "created": "2026-12-06T00:00:00.000000Z",
    "pid": 1,
    "map": {"driver": {"version": "580.95.05"}, "gpus": []},
    "used": [],
    "libraries": [],
    "checks": [],
}
GOALS = {"plain, record last": 1.3, "zstd, record first": 1.5}
RSS_LIMIT_KIB = 64 * 1024
_CHUNK = 64 * 1024 * 1024


def build(root: Path, size: int) -> dict[str, Path]:
    unpacked = root / "unpacked"
    images = unpacked / "checkpoint"
    images.mkdir(parents=True)
    (images / "gpu-device-watcher.json").write_text(json.dumps(RECORD))
    for name in ("inventory.img", "core-1.img", "mm-1.img", "pagemap-1.img"):
        (images / name).write_bytes(os.urandom(4096))
    # One random chunk repeated: incompressible for zstd (the chunk is larger than its
    # window), and quick to write.
    chunk = os.urandom(min(_CHUNK, size))
    with open(images / "pages-1.img", "wb") as pages:
        written = 0
        while written < size:
            part = chunk[: size - written]
            pages.write(part)
            written += len(part)
    (unpacked / "config.dump").write_text("{}")
    (unpacked / "spec.dump").write_text("{}")
    small = ["checkpoint/core-1.img", "checkpoint/inventory.img", "checkpoint/mm-1.img"]
    small += ["checkpoint/pagemap-1.img"]
    pages_then = ["checkpoint/pages-1.img", "config.dump", "spec.dump"]
    record = ["checkpoint/gpu-device-watcher.json"]
    last = ["checkpoint/", *small, *pages_then, *record]
    first = ["checkpoint/", *record, *small, *pages_then]
    tar = ["tar", "--no-recursion", "-C", str(unpacked)]
    plain = root / "plain-last.tar"
    subprocess.run([*tar, "-cf", str(plain), *last], check=True)
    archives = {"unpacked": unpacked, "plain-last": plain}
    for name, order in (("first", first), ("last", last)):
        target = root / f"{name}.tar.zst"
        with subprocess.Popen([*tar, "-cf", "-", *order], stdout=subprocess.PIPE) as producer:
            subprocess.run(
                ["zstd", "-q", "-1", "-T0", "-o", str(target)], stdin=producer.stdout, check=True
            )
        archives[name] = target
    return archives


def timed(command: list[str], rss_file: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS in KiB, exit status) of one whole process.

    The peak is GNU time's `%M`: Python's subprocess starts children with vfork, and Linux
    carries the parent's peak over an exec into the child's `ru_maxrss`; time forks.
    """
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        check=False,
    )
    elapsed = time.perf_counter() - started
    return elapsed, int(rss_file.read_text().split()[-1]), done.returncode


def measure(command: list[str], runs: int, rss_file: Path) -> dict[str, Any]:
    timed(command, rss_file)  # warm the page cache and the interpreter's files
    seconds, peaks, codes = [], [], set()
    for _ in range(runs):
        elapsed, peak, code = timed(command, rss_file)
        seconds.append(elapsed)
        peaks.append(peak)
        codes.add(code)
    return {
        "median_ms": round(statistics.median(seconds) * 1000, 1),
        "min_ms": round(min(seconds) * 1000, 1),
        "peak_rss_kib": max(peaks),
        "exit": sorted(codes),
    }


def run(size: int, runs: int, scratch: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="gdw-bench-archives-", dir=scratch))
    try:
        started = time.monotonic()
        archives = build(root, size)
        built_s = round(time.monotonic() - started, 1)
        sizes = {name: path.stat().st_size for name, path in archives.items() if path.is_file()}
        check = [sys.executable, "-m", "watcher", "restore-check", "--format", "json"]
        rss = root / "rss"
        pipeline = f"zstd -dc '{archives['last']}' | tar -t"
        cases = {
            "directory (baseline)": measure([*check, str(archives["unpacked"])], runs, rss),
            "plain, record last": measure([*check, str(archives["plain-last"])], runs, rss),
            "zstd, record first": measure([*check, str(archives["first"])], runs, rss),
            "zstd, record last": measure([*check, str(archives["last"])], runs, rss),
            "tar -tf (plain)": measure(["tar", "-tf", str(archives["plain-last"])], runs, rss),
            "zstd -dc | tar -t (record last)": measure(["sh", "-c", pipeline], runs, rss),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = cases["directory (baseline)"]["median_ms"]
    for name, case in cases.items():
        case["ratio"] = round(case["median_ms"] / baseline, 2)
        if name in GOALS:
            case["goal"] = GOALS[name]
            case["met"] = case["ratio"] <= GOALS[name]
        if name.startswith(("directory", "plain", "zstd, record")):
            case["rss_ok"] = case["peak_rss_kib"] < RSS_LIMIT_KIB
    tools = cases["zstd -dc | tar -t (record last)"]["median_ms"]
    cases["zstd, record last"]["vs_zstd_tar"] = round(
        cases["zstd, record last"]["median_ms"] / tools, 2
    )
    return {
        "pages_bytes": size,
        "archive_bytes": sizes,
        "runs": runs,
        "build_s": built_s,
        "cases": cases,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"checkpoint archives: pages {result['pages_bytes'] / 2**30:g} GiB, plain archive "
        f"{result['archive_bytes']['plain-last'] / 2**30:.2f} GiB, median of {result['runs']}",
        f"{'case':<34}{'median':>10}{'ratio':>8}{'peak RSS':>12}  goal",
    ]
    for name, case in result["cases"].items():
        goal = ""
        if "goal" in case:
            goal = f"<= {case['goal']}x {'met' if case['met'] else 'MISSED'}"
        if "rss_ok" in case:
            goal += ("; " if goal else "") + ("RSS < 64 MiB" if case["rss_ok"] else "RSS OVER")
        if "vs_zstd_tar" in case:
            goal += f"; {case['vs_zstd_tar']}x of zstd -dc | tar -t"
        lines.append(
            f"{name:<34}{case['median_ms']:>8.1f}ms{case['ratio']:>7.2f}x"
            f"{case['peak_rss_kib'] / 1024:>9.1f}MiB  {goal}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archive_cost", description=__doc__)
    parser.add_argument("--gib", type=float, default=0.25, help="size of the pages (GiB)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    for tool in ("tar", "zstd", "/usr/bin/time"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.archive_cost: needs {tool}")
    result = run(int(arguments.gib * 2**30), arguments.runs, arguments.dir)
    arguments.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
