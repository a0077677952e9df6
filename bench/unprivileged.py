"""i. The daemon as the shipped unit runs it: uid 65534, no capabilities, 10,000 mounts.

Run by `bench.suite` (phase i) inside its private mount namespace. On a GPU-Operator-shaped
host with a mount table grown to 10,000 lines, one daemon after the other, each measured
the same way in the same run:

- `nobody`: this version as uid 65534 with every capability dropped (`setpriv`): no fanotify
  mount events, the statmount judge where the kernel has it;
- `nobody, mountinfo path`: the same with GPU_DEVICE_WATCHER_MOUNT_EVENTS=mountinfo, the
  fallback of a kernel or process without statmount;
- `root`: this version as root (fanotify mount events where the kernel has them);
- `nobody, before` (with `--before TREE`): an earlier version as uid 65534.

For each: back to back, a tmpfs mounted over the dev root and unmounted as soon as the
subscriber has seen it, from the umount to the line showing the nodes again; then a storm
of 200 mount and umount per second outside the driver roots (bench.storm, as in phase e):
the daemon's CPU share, how long after the storm the map equals a fresh scan, the scans it
ran, RSS after.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.hostmounts import build_operator_host, grow_mount_table, mount_tmpfs, umount
from bench.live import Daemon

NOBODY = 65534
REPO = Path(__file__).resolve().parents[1]


def nobody_command(tree: Path) -> list[str]:
    """The CLI of `tree` as uid 65534 with no capabilities, on this venv's packages."""
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    return [
        *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        *("--inh-caps=-all", "--bounding-set=-all", "--"),
        *(sys.executable, "-I", "-c"),
        f"import sys; sys.path[:0] = [{str(tree)!r}, {site!r}]; "
        "from watcher.cli import main; sys.exit(main(sys.argv[1:]))",
    ]


def back_to_back(daemon: Daemon, dev_root: Path, rounds: int) -> dict[str, Any]:
    """A tmpfs over the dev root; as soon as the subscriber has seen it, its umount: from
    the umount to the subscriber's line showing the nodes again (the scan for the mount
    has just ended, so a daemon that spaces scans by their cost holds this one back)."""
    from bench.suite import STORM_PREDICATES, map_of, subscription  # noqa: PLC0415

    samples: list[float] = []
    with subscription(daemon) as lines:
        for _ in range(rounds):
            for predicate, change in (
                ("cover", lambda: mount_tmpfs(str(dev_root), "size=64k,mode=755")),
                ("uncover", lambda: umount(str(dev_root))),
            ):
                started = time.monotonic()
                change()
                while True:
                    arrived, line = lines.next()
                    if STORM_PREDICATES[predicate](map_of(line)):
                        break
                if predicate == "uncover":
                    samples.append((arrived - started) * 1000)
            time.sleep(0.3)
    return {
        "rounds": rounds,
        "p50_ms": round(statistics.median(samples), 2),
        "max_ms": round(max(samples), 2),
        "samples": [round(sample, 2) for sample in samples],
    }


def run(plan: Any, base: Path, before: Path | None) -> dict[str, Any]:
    """Phase i on a fresh host under `base` (a scratch tmpfs of the bench's namespace)."""
    from bench.suite import _mode_line, storm_with_daemon  # noqa: PLC0415
    from watcher.core.snapshot import HostView  # noqa: PLC0415

    base.chmod(0o755)
    root, proc = build_operator_host(base)
    dev_root = root / "run/nvidia/driver/dev"
    view = HostView(root=str(root), proc=str(proc))
    mounts = grow_mount_table(base / "mounts", 10_000)
    run_dir = base / "run-nobody"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    variants: list[tuple[str, list[str] | None, dict[str, str]]] = [
        ("nobody", nobody_command(REPO), {}),
        (
            "nobody, mountinfo path",
            nobody_command(REPO),
            {"GPU_DEVICE_WATCHER_MOUNT_EVENTS": "mountinfo"},
        ),
        ("root", None, {}),
    ]
    if before is not None:
        variants.append(("nobody, before", nobody_command(before), {}))
    results: dict[str, Any] = {"mounts": mounts, "load": os.getloadavg()}
    rounds = plan.event_rounds
    for index, (label, command, env) in enumerate(variants):
        name = f"h{index}"
        daemon = Daemon(
            root,
            proc,
            base,
            env=env,
            name=name,
            command=command,
            socket_dir=run_dir if command is not None else None,
        )
        entry: dict[str, Any] = {}
        try:
            time.sleep(1.0)
            # A first mount change (auto as root switches to fanotify there), played out.
            (base / "first").mkdir(exist_ok=True)
            mount_tmpfs(str(base / "first"))
            umount(str(base / "first"))
            time.sleep(1.0)
            daemon.settle()
            entry.update(mode=_mode_line(daemon), load=os.getloadavg())
            entry["back_to_back"] = back_to_back(daemon, dev_root, rounds)
            daemon.settle()
            entry["storm"] = storm_with_daemon(daemon, view, base, dev_root, plan)
            entry["rss_after_storm_kib"] = entry["storm"]["rss_kib"]
            entry["warnings"] = [line for line in daemon.log_text.splitlines() if " ERROR " in line]
        finally:
            entry["exit"] = daemon.stop()
        results[label] = entry
        shutil.rmtree(base / "storm", ignore_errors=True)
    return results
