"""A mount storm, run as its own process inside the bench's mount namespace.

`python -m bench.storm --dir D --dev-root DEV --rate 200 --seconds 10` mounts and unmounts
tmpfs under D (never under a driver root) at `rate` operations per second, paced against
the clock (a late operation is not made up by a burst, it only shortens the next sleep).
Every `--relevant-every` seconds it also changes the dev root, cycling through: mknod
`nvidia-modeset`, unlink it, mount an empty tmpfs over the dev root, unmount it; the cycle
completes before the storm ends, so the host is as it was. Right after the last storm
operation it makes `nvidia-modeset` once more: the map is right again only once the daemon
has caught up with everything before it.

All times are CLOCK_MONOTONIC (`time.monotonic()`), comparable across processes. Prints one
JSON object: started, ended (the last storm operation), ops, late (operations more than
5 ms behind schedule), relevant ([time, kind] pairs) and final ([time, kind]).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path

from bench.hostmounts import mount_tmpfs, umount

SLOTS = 50
KINDS = ("mknod", "unlink", "cover", "uncover")
NODE = "nvidia-modeset"


def _relevant(kind: str, dev_root: Path) -> None:
    node = dev_root / NODE
    if kind == "mknod":
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(195, 254))
    elif kind == "unlink":
        os.unlink(node)
    elif kind == "cover":
        mount_tmpfs(str(dev_root), "size=64k,mode=755")
    elif kind == "uncover":
        umount(str(dev_root))


def storm(
    directory: Path, dev_root: Path, rate: float, seconds: float, every: float
) -> dict[str, object]:
    slots = [directory / f"s{index}" for index in range(SLOTS)]
    for slot in slots:
        slot.mkdir(parents=True, exist_ok=True)
    total = int(rate * seconds) // 2 * 2  # whole mount/umount pairs
    # Relevant changes: whole cycles, the last one done a second before the storm ends.
    cycles = max(1, int((seconds - 1.0) / every) // len(KINDS)) if every > 0 else 0
    relevant_at = [every * (index + 1) for index in range(cycles * len(KINDS))]
    relevant: list[tuple[float, str]] = []
    late = 0
    clock = time.monotonic
    started = clock()
    next_relevant = 0
    ended = started
    for op in range(total):
        due = started + op / rate
        now = clock()
        if due > now:
            time.sleep(due - now)
        elif now - due > 0.005:
            late += 1
        slot = slots[(op // 2) % SLOTS]
        if op % 2 == 0:
            mount_tmpfs(str(slot), "size=16k")
        else:
            umount(str(slot))
        ended = clock()
        while next_relevant < len(relevant_at) and ended - started >= relevant_at[next_relevant]:
            kind = KINDS[next_relevant % len(KINDS)]
            at = clock()
            _relevant(kind, dev_root)
            relevant.append((at, kind))
            next_relevant += 1
    final_at = clock()
    _relevant("mknod", dev_root)
    return {
        "started": started,
        "ended": ended,
        "ops": total,
        "late": late,
        "relevant": relevant,
        "final": (final_at, "mknod"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--dev-root", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--relevant-every", type=float, default=0.5, help="seconds; 0: only the final change"
    )
    arguments = parser.parse_args(argv)
    result = storm(
        arguments.dir,
        arguments.dev_root,
        arguments.rate,
        arguments.seconds,
        arguments.relevant_every,
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
