"""The one table of `python -m bench`, and the goals of issue 6 checked against it.

Each row is the daemon beside a baseline measured in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.criu_cost import THIS_VENV, WHEEL

MIB = 1024.0


@dataclass(frozen=True)
class Row:
    figure: str
    daemon: str
    baseline: str
    ratio: str
    goal: str = ""
    met: bool | None = None  # None: no goal for this row

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("yes" if self.met else "NO")


def _ms(value: float) -> str:
    if math.isinf(value) or math.isnan(value):
        return "n/a"
    if value < 1:
        return f"{value:.3f}"
    if value < 10:
        return f"{value:.2f}"
    return f"{value:.1f}"


def _pair(summary: dict[str, Any]) -> str:
    return f"{_ms(summary['p50_ms'])} / {_ms(summary['p99_ms'])} ms"


def _x(value: float) -> str:
    if math.isinf(value) or math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}x"
    if value >= 10:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


def _safe_ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def rows(results: dict[str, Any]) -> list[Row]:
    live = results.get("live", {})
    out: list[Row] = []

    out += _query_rows(live)
    out += _process_rows(live)
    out += _event_rows(live)
    out += _idle_rows(live)
    out += _storm_rows(live)
    out += _memory_rows(live)
    out += _throughput_rows(live)
    out += _unprivileged_rows(live.get("unprivileged"))
    out += _uevent_rows(live.get("uevents"))

    # h. CRIU
    criu = results.get("criu")
    if criu and not criu.get("skipped"):
        for stage in ("dump", "restore"):
            base = criu["baseline"][f"{stage}_ms"]
            action = criu["action"][f"{stage}_ms"]
            out.append(
                Row(
                    f"h. CRIU {stage}: time the action adds (median of {criu['runs']})",
                    f"{action - base:+.1f} ms ({action:.1f} ms)",
                    f"no action script {base:.1f} ms",
                    _x(action / base),
                    "",
                    None,
                )
            )
        out += _stage_rows(criu)
        out += _wrapper_rows(criu.get("cuda_checkpoint"), criu["stage_runs"])
    elif criu:
        out.append(Row("h. CRIU", f"skipped: {criu['skipped']}", "", ""))
    out += _flood_rows(results.get("scrape_flood", {}))
    return out


def _query_rows(live: dict[str, Any]) -> list[Row]:
    """a. query"""
    out: list[Row] = []
    for entry in live.get("get_vs_scan", []):
        get, scan = entry["get"], entry["scan"]
        big = entry["mounts"] >= 10_000
        out.append(
            Row(
                f"a. get vs scan() @ {entry['mounts']:,} mounts (p50 / p99)",
                _pair(get),
                f"scan() {_pair(scan)}",
                f"{_x(entry['ratio_p50'])} / {_x(entry['ratio_p99'])}",
                ">= 50x, p99 < 1 ms" if big else "",
                (entry["ratio_p50"] >= 50 and get["p99_ms"] < 1.0) if big else None,
            )
        )
    return out


def _process_rows(live: dict[str, Any]) -> list[Row]:
    """b. whole processes"""
    out: list[Row] = []
    processes = live.get("processes")
    if processes:
        python = processes["python"]["median_ms"]
        for key, label, goal in (
            ("path", "`path nvidiactl`", 1.5),
            ("get_env", "`get --format env`", None),
            ("scan_env", "`scan --format env` (no daemon)", None),
        ):
            median = processes[key]["median_ms"]
            ratio = median / python
            out.append(
                Row(
                    f"b. {label} process (median)",
                    f"{median:.1f} ms",
                    f"python3 -c 'import socket, json' {python:.1f} ms",
                    _x(ratio),
                    f"<= {goal}x" if goal else "",
                    ratio <= goal if goal else None,
                )
            )
    return out


def _event_rows(live: dict[str, Any]) -> list[Row]:
    """c. change detection"""
    out: list[Row] = []
    events = live.get("events")
    if events:
        debounce = events["debounce_ms"]
        mount, findmnt = events["mount_daemon"], events["mount_findmnt"]
        reference = findmnt["p50_ms"] + debounce
        ratio = mount["p50_ms"] / reference
        out.append(
            Row(
                "c. mount/umount -> subscriber (p50 / p99)",
                _pair(mount),
                f"findmnt --poll {_pair(findmnt)}",
                f"{_x(ratio)} of findmnt + {debounce:g} ms debounce",
                "<= 2x, p99 < 100 ms",
                ratio <= 2 and mount["p99_ms"] < 100,
            )
        )
        node = events["node_daemon"]
        out.append(
            Row(
                "c. mknod/unlink -> subscriber (p50 / p99)",
                _pair(node),
                f"the {debounce:g} ms debounce",
                _x(node["p50_ms"] / debounce),
                "p99 < 100 ms",
                node["p99_ms"] < 100,
            )
        )
    return out


def _idle_rows(live: dict[str, Any]) -> list[Row]:
    """d. idle"""
    out: list[Row] = []
    idle = live.get("idle")
    if idle:
        daemon, poller = idle["daemon"], idle["poller"]
        out.append(
            Row(
                f"d. idle {idle['seconds']:g} s: CPU ticks / wake-ups",
                f"{daemon['cpu_ticks']} / {daemon['wakeups']}",
                f"1 s polling loop {poller['cpu_ticks']} / {poller['wakeups']}",
                _x(_safe_ratio(daemon["wakeups"], poller["wakeups"])),
                "0 wake-ups",
                daemon["wakeups"] == 0,
            )
        )
    return out


def _storm_rows(live: dict[str, Any]) -> list[Row]:
    """e. storm"""
    out: list[Row] = []
    auto, fallback = live.get("storm_auto"), live.get("storm_mountinfo")
    findmnt_storm = live.get("storm_findmnt")
    if auto and fallback and findmnt_storm:
        base = findmnt_storm["cpu_share"]
        for label, storm in (("fanotify", auto), ("mountinfo path", fallback)):
            out.append(
                Row(
                    f"e. storm, {label}: CPU share of one core ({storm['ops']:,} ops,"
                    f" {storm['scans']} scans)",
                    f"{storm['cpu_share']:.0%}",
                    f"findmnt --poll {base:.0%}",
                    _x(_safe_ratio(storm["cpu_share"], base)),
                    "< 50%",
                    storm["cpu_share"] < 0.5,
                )
            )
        out.append(
            Row(
                "e. storm: relevant change -> map, during (p50 / p99)",
                f"fanotify {_pair(auto['during'])}",
                f"mountinfo path {_pair(fallback['during'])}",
                _x(_safe_ratio(auto["during"]["p50_ms"], fallback["during"]["p50_ms"])),
                "",
                None,
            )
        )
        out.append(
            Row(
                "e. storm: map equals a fresh scan, after the last op",
                f"fanotify {_ms(auto['after_ms'])} ms",
                f"mountinfo path {_ms(fallback['after_ms'])} ms",
                _x(_safe_ratio(auto["after_ms"], fallback["after_ms"])),
                "<= 250 ms, both",
                max(auto["after_ms"], fallback["after_ms"]) <= 250,
            )
        )
        out.append(
            Row(
                "e. storm: final map correct",
                "yes" if auto["correct"] else "NO",
                "yes" if fallback["correct"] else "NO (mountinfo path)",
                "",
                "both",
                bool(auto["correct"] and fallback["correct"]),
            )
        )
    return out


def _memory_rows(live: dict[str, Any]) -> list[Row]:
    """f. memory"""
    out: list[Row] = []
    memory = live.get("memory")
    if memory and "queries" in memory:
        queries = memory["queries"]
        peak = max(
            memory["start_kib"],
            queries["rss_after_kib"],
            memory.get("after_storm_kib", 0),
            memory.get("mountinfo_after_storm_kib", 0),
        )
        out.append(
            Row(
                f"f. RSS: start / after {queries['queries']:,} queries / after storm",
                f"{memory['start_kib'] / MIB:.1f} / {queries['rss_after_kib'] / MIB:.1f} / "
                f"{memory.get('after_storm_kib', 0) / MIB:.1f} MiB",
                f"python3 (socket, json) {memory['python_kib'] / MIB:.1f} MiB",
                _x(peak / memory["python_kib"]),
                "< 40 MiB",
                peak < 40 * MIB,
            )
        )
        out.append(
            Row(
                f"f. RSS growth over {queries['queries']:,} queries",
                f"{queries['growth_kib']:+,} KiB",
                "",
                "",
                "< 1 MiB",
                queries["growth_kib"] < MIB,
            )
        )
    return out


def _throughput_rows(live: dict[str, Any]) -> list[Row]:
    """g. throughput"""
    out: list[Row] = []
    throughput = live.get("throughput")
    if throughput:
        for clients, figures in throughput["daemon"].items():
            echo = throughput["echo"][clients]
            goal = clients == "16"
            out.append(
                Row(
                    f"g. throughput, {clients} client{'s' if clients != '1' else ''}: req/s (p99)",
                    f"{figures['requests_per_s']:,}/s ({_ms(figures['p99_ms'])} ms)",
                    f"stdlib echo {echo['requests_per_s']:,}/s ({_ms(echo['p99_ms'])} ms)",
                    _x(figures["requests_per_s"] / echo["requests_per_s"]),
                    ">= 10,000/s" if goal else "",
                    figures["requests_per_s"] >= 10_000 if goal else None,
                )
            )
    return out


def _stage_rows(criu: dict[str, Any]) -> list[Row]:
    """The action alone per stage, as ratios to a bare `python -I -c pass` of the interpreter
    it runs on (same run, interleaved): this venv's install and a wheel in a new venv."""
    stages = criu.get("stages", {})
    goals = {"other": 0.5, "pre-dump": 1.6, "pre-restore": 1.6}
    names = {"other": "a stage it ignores", "pre-dump": "pre-dump", "pre-restore": "pre-restore"}
    out = []
    for label in (WHEEL, THIS_VENV):
        ours = stages.get(label)
        if ours is None:
            continue
        python_ms = ours["python"]
        before = stages.get("action (before)")
        for stage, goal in goals.items():
            ratio = ours[stage] / python_ms
            was = f"; before {before[stage] / before['python']:.2f}x" if before else ""
            out.append(
                Row(
                    f"h. CRIU {label} alone, {names[stage]} (median of {criu['stage_runs']})",
                    f"{_ms(ours[stage])} ms",
                    f"python -I -c pass {_ms(python_ms)} ms{was}",
                    _x(ratio),
                    f"<= {goal}x",
                    ratio <= goal,
                )
            )
    return out


def _wrapper_rows(wrapper: dict[str, Any] | None, runs: int) -> list[Row]:
    """The cuda-checkpoint wrapper: a pass-through call beside the binary it runs, and a
    restore that adds a device map beside a bare `python -I -c pass` (same run)."""
    if not wrapper:
        return []
    direct, wrapped = wrapper["direct"]["wall_ms"], wrapper["wrapped"]["wall_ms"]
    python, restore = wrapper["python"]["wall_ms"], wrapper["restore"]["wall_ms"]
    added = wrapped - direct
    return [
        Row(
            f"h. cuda-checkpoint wrapper, pass-through call, time added (median of {runs})",
            f"{added:+.2f} ms ({_ms(wrapped)} ms)",
            f"{wrapper['stand_in']} stand-in run directly {_ms(direct)} ms",
            _x(_safe_ratio(wrapped, direct)),
            "<= 2 ms added",
            added <= 2.0,
        ),
        Row(
            f"h. cuda-checkpoint wrapper, --action restore with a device map (median of {runs})",
            f"{_ms(restore)} ms",
            f"python -I -c pass {_ms(python)} ms",
            _x(_safe_ratio(restore, python)),
            "<= 1.6x",
            _safe_ratio(restore, python) <= 1.6,
        ),
    ]


def _uevent_rows(phase: dict[str, Any] | None) -> list[Row]:
    """j. 1,000 unrelated uevents per second against idle; a module's uevent to subscriber."""
    if not phase:
        return []
    if phase.get("skipped"):
        return [Row("j. uevents", f"skipped: {phase['skipped']}", "", "")]
    idle, flood = phase["idle"], phase["flood"]
    added = flood["core_percent"] - idle["core_percent"]
    rate = flood["uevents_sent"] / flood["seconds"]
    uevent, mknod = phase["uevent_to_subscriber"], phase["mknod_to_subscriber"]
    return [
        Row(
            f"j. daemon CPU under {rate:,.0f} unrelated uevents/s "
            f"({flood['voluntary_switches']} wake-ups, {flood['uevents_counted']} counted)",
            f"{flood['core_percent']:.2f}% of a core",
            f"idle {idle['core_percent']:.2f}% ({idle['voluntary_switches']} wake-ups)",
            f"{added:+.2f} pts",
            "< 5% of a core",
            flood["core_percent"] < 5,
        ),
        Row(
            "j. module uevent -> subscriber: p50 / p99",
            _pair(uevent),
            f"mknod -> subscriber {_pair(mknod)}",
            _x(_safe_ratio(uevent["p50_ms"], mknod["p50_ms"])),
            "<= 100 ms",
            uevent["p99_ms"] <= 100,
        ),
    ]


def _unprivileged_rows(phase: dict[str, Any] | None) -> list[Row]:
    """i. uid 65534 without capabilities at 10,000 mounts, beside root and the fallback."""
    if not phase:
        return []
    nobody = phase.get("nobody")
    fallback = phase.get("nobody, mountinfo path")
    root = phase.get("root")
    before = phase.get("nobody, before")
    if not (nobody and fallback and root):
        return []
    reference = before or fallback
    reference_name = "before" if before else "mountinfo path"
    out = []
    for label, entry, goal_p50, goal_max in (
        ("uid 65534", nobody, 60.0, 150.0),
        ("root, fanotify", root, None, None),
    ):
        b2b, ref = entry["back_to_back"], reference["back_to_back"]
        met = None if goal_p50 is None else b2b["p50_ms"] < goal_p50 and b2b["max_ms"] < goal_max
        out.append(
            Row(
                f"i. back to back: dev-root umount -> subscriber, {label} (p50 / max)",
                f"{_ms(b2b['p50_ms'])} / {_ms(b2b['max_ms'])} ms",
                f"{reference_name} {_ms(ref['p50_ms'])} / {_ms(ref['max_ms'])} ms",
                _x(_safe_ratio(b2b["p50_ms"], ref["p50_ms"])),
                "" if goal_p50 is None else f"p50 < {goal_p50:g} ms, max < {goal_max:g} ms",
                met,
            )
        )
    for label, entry, goal in (("uid 65534", nobody, 0.2), ("root, fanotify", root, 0.1)):
        storm, ref = entry["storm"], reference["storm"]
        out.append(
            Row(
                f"i. storm, {label}: CPU share of one core ({storm['ops']:,} ops,"
                f" {storm['scans']} scans)",
                f"{storm['cpu_share']:.0%}",
                f"{reference_name} {ref['cpu_share']:.0%} ({ref['scans']} scans)",
                _x(_safe_ratio(storm["cpu_share"], ref["cpu_share"])),
                f"< {goal:.0%}",
                storm["cpu_share"] < goal,
            )
        )
    entries = {"uid 65534": nobody, "root": root, "mountinfo path": fallback}
    after = max(entry["storm"]["after_ms"] for entry in entries.values())
    out.append(
        Row(
            "i. storm: map equals a fresh scan after the last op / final map correct",
            ", ".join(
                f"{name} {_ms(entry['storm']['after_ms'])} ms "
                f"{'yes' if entry['storm']['correct'] else 'NO'}"
                for name, entry in entries.items()
            ),
            "",
            "",
            "<= 250 ms, correct",
            after <= 250 and all(entry["storm"]["correct"] for entry in entries.values()),
        )
    )
    peak = max(nobody["rss_after_storm_kib"], root["rss_after_storm_kib"])
    out.append(
        Row(
            "i. RSS after the storm: uid 65534 / root",
            f"{nobody['rss_after_storm_kib'] / MIB:.1f} / {root['rss_after_storm_kib'] / MIB:.1f}"
            " MiB",
            f"{reference_name} {reference['rss_after_storm_kib'] / MIB:.1f} MiB",
            _x(_safe_ratio(peak, reference["rss_after_storm_kib"])),
            "< 40 MiB",
            peak < 40 * MIB,
        )
    )
    return out


def _flood_rows(flood: dict[str, Any]) -> list[Row]:
    """k. The Unix socket's `get` while /metrics is flooded, against `get` idle."""
    rows = []
    for label, entry in flood.items():
        name = "" if label == "this" else f" ({label})"
        rows.append(
            Row(
                f"k. get under {entry['scrapers']} unthrottled scrapers{name} (p50 / p99)",
                _pair(entry["flood"]),
                f"get idle {_pair(entry['idle'])}",
                f"{_x(entry['ratio_p50'])} / {_x(entry['ratio_p99'])}",
                "p99 <= 3x" if label == "this" else "",
                entry["ratio_p99"] <= 3 if label == "this" else None,
            )
        )
    return rows


def table(results: dict[str, Any]) -> str:
    header = Row("figure", "gpu-device-watcher", "baseline (same run)", "ratio", "goal", None)
    body = rows(results)
    cells = [(r.figure, r.daemon, r.baseline, r.ratio, r.goal, r.verdict) for r in body]
    cells.insert(
        0, (*(getattr(header, f) for f in ("figure", "daemon", "baseline")), "ratio", "goal", "met")
    )
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| figure | gpu-device-watcher | baseline (same run) | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows(results):
        cells = (row.figure, row.daemon, row.baseline, row.ratio, row.goal, row.verdict)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report [RESULTS]`: the table of a finished run, as Markdown."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument(
        "results", type=Path, nargs="?", default=Path(__file__).with_name("results.json")
    )
    arguments = parser.parse_args(argv)
    print(markdown(json.loads(arguments.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
