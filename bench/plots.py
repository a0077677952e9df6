"""The plots of `python -m bench`: small PNGs, drawn with matplotlib (the `bench` extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Kept small: they are copied into docs/ and shown there.
SIZE = (6.4, 3.6)
DPI = 80


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415 (optional: only `python -m bench` needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def draw(results: dict[str, Any], directory: Path) -> list[Path]:
    """Every plot the results allow; returns the files written."""
    plt = _pyplot()
    live = results.get("live", {})
    written: list[Path] = []
    for name, painter, key in (
        ("bench-get-vs-scan.png", _get_vs_scan, "get_vs_scan"),
        ("bench-events.png", _events, "events"),
        ("bench-storm.png", _storm, "storm_auto"),
        ("bench-throughput.png", _throughput, "throughput"),
        ("bench-unprivileged.png", _unprivileged, "unprivileged"),
    ):
        if key not in live:
            continue
        figure, axes = plt.subplots(figsize=SIZE, dpi=DPI)
        painter(axes, live)
        figure.tight_layout()
        path = directory / name
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
        written.append(path)
    return written


def _get_vs_scan(axes: Any, live: dict[str, Any]) -> None:
    rows = live["get_vs_scan"]
    mounts = [row["mounts"] for row in rows]
    for key, label, colour in (
        ("scan", "one-shot scan() in process", "tab:red"),
        ("get", "get through the socket", "tab:blue"),
    ):
        p50 = [row[key]["p50_ms"] for row in rows]
        p99 = [row[key]["p99_ms"] for row in rows]
        axes.plot(mounts, p50, "o-", color=colour, label=f"{label}, p50")
        axes.plot(mounts, p99, "x--", color=colour, alpha=0.6, label=f"{label}, p99")
    for row in rows:
        axes.annotate(
            f"{row['ratio_p50']:,.0f}x",
            (row["mounts"], math.sqrt(row["get"]["p50_ms"] * row["scan"]["p50_ms"])),
            ha="center",
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("mounts in the table")
    axes.set_ylabel("ms per answer")
    axes.set_title("a. the map on request: get vs a one-shot scan")
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)


def _events(axes: Any, live: dict[str, Any]) -> None:
    samples = live["events"]["samples"]
    debounce = live["events"]["debounce_ms"]
    for key, label, colour in (
        ("mount_findmnt", "findmnt --poll: mount/umount", "tab:gray"),
        ("mount_daemon", "daemon: mount/umount -> subscriber", "tab:blue"),
        ("node_daemon", "daemon: mknod/unlink -> subscriber", "tab:green"),
    ):
        values = sorted(samples[key])
        if not values:
            continue
        fractions = [(index + 1) / len(values) for index in range(len(values))]
        axes.step(values, fractions, where="post", color=colour, label=label)
    axes.axvline(debounce, color="black", linestyle=":", linewidth=1, label="debounce")
    axes.set_xscale("log")
    axes.set_xlabel("ms from the syscall to the line")
    axes.set_ylabel("fraction of changes")
    axes.set_title("c. change detection (cumulative)")
    axes.legend(fontsize=7, loc="center")
    axes.grid(True, which="both", alpha=0.3)


def _storm(axes: Any, live: dict[str, Any]) -> None:
    for key, label, colour in (
        ("storm_findmnt", "findmnt --poll", "tab:gray"),
        ("storm_mountinfo", "daemon, mountinfo path", "tab:orange"),
        ("storm_auto", "daemon, fanotify mount events", "tab:blue"),
    ):
        storm = live.get(key)
        if not storm:
            continue
        series = storm["cpu_series"]
        axes.plot(
            [t for t, _ in series],
            [share * 100 for _, share in series],
            color=colour,
            label=f"{label} ({storm['cpu_share']:.0%})",
        )
    axes.axhline(50, color="black", linestyle=":", linewidth=1, label="goal: < 50%")
    rate = live.get("plan", {}).get("storm_rate", 200)
    axes.set_xlabel(f"seconds into the storm ({rate:g} mount/umount per s at 10,000 mounts)")
    axes.set_ylabel("CPU, % of one core")
    axes.set_ylim(0, 110)
    axes.set_title("e. mount storm: CPU while mounts churn elsewhere")
    axes.legend(fontsize=7, loc="center right")
    axes.grid(True, alpha=0.3)


_VARIANTS = (
    ("nobody, before", "uid 65534, before", "tab:gray"),
    ("nobody, mountinfo path", "uid 65534, mountinfo path", "tab:orange"),
    ("nobody", "uid 65534, statmount judge", "tab:green"),
    ("root", "root, fanotify", "tab:blue"),
)


def _unprivileged(axes: Any, live: dict[str, Any]) -> None:
    """i. The storm's CPU per variant; the back-to-back umounts as a strip beside it."""
    phase = live["unprivileged"]
    inset = axes.inset_axes((0.62, 0.45, 0.35, 0.4))
    for index, (key, label, colour) in enumerate(_VARIANTS):
        entry = phase.get(key)
        if not entry:
            continue
        storm = entry["storm"]
        series = storm["cpu_series"]
        axes.plot(
            [t for t, _ in series],
            [share * 100 for _, share in series],
            color=colour,
            label=f"{label} ({storm['cpu_share']:.0%}, {storm['scans']} scans)",
        )
        samples = entry["back_to_back"]["samples"]
        inset.scatter(samples, [index] * len(samples), s=6, color=colour)
    axes.axhline(20, color="black", linestyle=":", linewidth=1, label="goal uid 65534: < 20%")
    axes.set_xlabel("seconds into the storm (200 mount/umount per s at 10,000 mounts)")
    axes.set_ylabel("CPU, % of one core")
    axes.set_ylim(0, 60)
    axes.set_title("i. unprivileged: storm CPU; inset: back-to-back umount -> subscriber")
    axes.legend(fontsize=7, loc="upper left")
    axes.grid(True, alpha=0.3)
    inset.axvline(60, color="black", linestyle=":", linewidth=1)
    inset.set_yticks([])
    inset.set_xlabel("ms (goal p50 < 60)", fontsize=7)
    inset.tick_params(labelsize=7)


def _throughput(axes: Any, live: dict[str, Any]) -> None:
    throughput = live["throughput"]
    clients = list(throughput["daemon"])
    positions = range(len(clients))
    width = 0.38
    for offset, key, label, colour in (
        (-width / 2, "daemon", "gpu-device-watcher", "tab:blue"),
        (width / 2, "echo", "stdlib echo server (no parsing)", "tab:gray"),
    ):
        values = [throughput[key][n]["requests_per_s"] for n in clients]
        bars = axes.bar([p + offset for p in positions], values, width, color=colour, label=label)
        for bar, n in zip(bars, clients, strict=True):
            axes.annotate(
                f"p99 {throughput[key][n]['p99_ms']:.2f} ms",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    axes.axhline(10_000, color="black", linestyle=":", linewidth=1, label="goal @16: 10,000/s")
    axes.set_xticks(list(positions), [f"{n} client{'s' if n != '1' else ''}" for n in clients])
    axes.set_ylabel("get requests per second")
    axes.set_title("g. throughput, closed loop")
    axes.legend(fontsize=7)
    axes.grid(True, axis="y", alpha=0.3)
