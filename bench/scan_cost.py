"""What one `scan` costs at 1,000 and 10,000 mounts, beside merely reading the table.

Run as root: `python -m bench.scan_cost`. It re-runs itself in a private mount namespace,
grows the real mount table there, and times, in the same run:

- baseline: read /proc/self/mountinfo and split() it into fields;
- scan: one full `watcher.probe.scan()` of the default host view.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from bench.hostmounts import grow_mount_table, reexec_unshared, scratch_tmpfs
from watcher.core.snapshot import HostView
from watcher.probe import scan

SIZES = (1_000, 10_000)
REPEATS = 30


def _read_and_split() -> None:
    with open("/proc/self/mountinfo") as file:
        for line in file.read().splitlines():
            line.split()


def _timed(action: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    reexec_unshared()
    view = HostView()
    rows = []
    with scratch_tmpfs() as scratch:
        for size in SIZES:
            mounts = grow_mount_table(scratch, size)
            baseline = statistics.median(_timed(_read_and_split, REPEATS))
            scanned = statistics.median(_timed(lambda: scan(view), REPEATS))
            rows.append((mounts, baseline, scanned))
    print(f"{'mounts':>7}  {'read+split ms':>13}  {'scan ms':>8}  {'scan/read':>9}")
    for mounts, baseline, scanned in rows:
        print(f"{mounts:>7}  {baseline:>13.2f}  {scanned:>8.2f}  {scanned / baseline:>8.1f}x")


if __name__ == "__main__":
    main()
