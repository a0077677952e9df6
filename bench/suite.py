"""The live measurements of `python -m bench`, run inside a private mount namespace.

`python -m bench.suite [--quick] --json FILE` re-runs itself under `unshare -m` (see
bench.hostmounts), builds a GPU-Operator-shaped host on a scratch tmpfs, starts the real
`gpu-device-watcher serve` there and measures, each beside a baseline from the same run:

a. `get` through the socket vs one in-process `scan()`, at 100, 1,000 and 10,000 mounts;
b. whole processes: `path`, `get --format env`, `scan --format env`, bare `python3`;
c. mount/umount over the dev root to subscriber line, beside `findmnt --poll` reacting to the
   same syscalls; mknod/unlink in the dev root to subscriber line;
d. idle CPU ticks and wake-ups, beside a 1-second polling loop;
e. a mount storm at 10,000 mounts: the daemon with fanotify mount events, `findmnt --poll`,
   and the daemon on the mountinfo path (GPU_DEVICE_WATCHER_MOUNT_EVENTS=mountinfo);
f. RSS at start, after many queries, after the storm;
g. throughput with 1, 16 and 128 clients, beside a minimal stdlib server (bench.load echo);
i. the daemon as uid 65534 without capabilities at 10,000 mounts, beside the same as root and
   on the mountinfo path (and an earlier version with --before): back-to-back dev-root
   changes, a storm, RSS after it (bench.unprivileged);
j. kernel uevents: the daemon's CPU under 1,000 unrelated uevents per second beside idle, and
   a module's uevent to subscriber beside mknod to subscriber (bench.uevents).

The JSON it writes is the `live` part of bench/results.json; `python -m bench` adds CRIU,
prints the table and draws the plots.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from bench import uevents, unprivileged
from bench.hostmounts import (
    build_operator_host,
    grow_mount_table,
    mount_tmpfs,
    reexec_unshared,
    scratch_tmpfs,
    umount,
)
from bench.live import (
    Daemon,
    LineSocket,
    compile_bytecode,
    cpu_and_switches,
    get_latency,
    percentile,
    process_times,
    rss_kib,
    scan_latency,
)
from watcher.core.snapshot import HostView
from watcher.probe import scan

DEV_ROOT = "run/nvidia/driver/dev"
DEBOUNCE_MS = 20.0
MODE_ENV = "GPU_DEVICE_WATCHER_MOUNT_EVENTS"
TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """How much of everything: --quick is a run of a few minutes, the default ~8."""

    quick: bool
    event_rounds: int
    cli_runs: int
    idle_s: float
    queries: int
    throughput_s: float
    throughput_repeats: int
    get_requests: int
    scan_repeats: int
    storm_s: float
    storm_rate: float = 200.0
    sizes: tuple[int, ...] = (100, 1_000, 10_000)
    clients: tuple[int, ...] = (1, 16, 128)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 20, 15, 10.0, 20_000, 1.5, 3, 1_000, 10, 10.0)
        return cls(False, 50, 30, 60.0, 100_000, 4.0, 3, 3_000, 30, 30.0)


def summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    return {
        "p50_ms": round(statistics.median(samples), 4),
        "p99_ms": round(percentile(samples, 0.99), 4),
        "n": len(samples),
    }


def ticks(pid: int) -> int:
    return cpu_and_switches(pid)[0]


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def phase(results: dict[str, Any], name: str) -> None:
    """Announce a phase and note the machine's load as it starts: other work on the machine
    (tests run beside the bench) shows up in the figures, and here as the reason."""
    load = os.getloadavg()[0]
    results.setdefault("load", {})[name] = round(load, 2)
    log(f"{name} (load {load:.2f})")


# --- line readers with arrival times --------------------------------------------------------


class TimedLines:
    """Reads lines from a file object in a thread; each with its CLOCK_MONOTONIC arrival."""

    def __init__(self, read_line: Callable[[], bytes], name: str) -> None:
        self.lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self._read_line = read_line
        self.error: BaseException | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                line = self._read_line()
                if not line:
                    return
                self.lines.put((time.monotonic(), line))
        except Exception as error:  # noqa: BLE001 (reported by the reader of the queue)
            self.error = error

    def next(self, timeout: float = TIMEOUT) -> tuple[float, bytes]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout:g} s ({self.error})") from None

    def drain(self) -> list[tuple[float, bytes]]:
        drained = []
        while True:
            try:
                drained.append(self.lines.get_nowait())
            except queue.Empty:
                return drained


@contextmanager
def subscription(daemon: Daemon) -> Iterator[TimedLines]:
    connection = LineSocket(daemon.socket)
    connection.sock.settimeout(None)  # the reader thread blocks for the whole phase
    connection.request(b'{"op":"subscribe"}\n')
    try:
        yield TimedLines(connection.line, "subscriber")
    finally:
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()


@contextmanager
def findmnt_poll(stdout: int | None = subprocess.PIPE) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        ["findmnt", "--poll", "-n", "-r", "-o", "ACTION,TARGET"],
        stdout=stdout,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


def map_of(line: bytes) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(line)["map"]
    return found


def names(device_map: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in device_map["devices"]]


def content(device_map: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in device_map.items() if key not in ("generation", "updated")}


# --- c. change detection -------------------------------------------------------------------


def change_detection(daemon: Daemon, dev_root: Path, plan: Plan) -> dict[str, Any]:
    """Each op is one syscall; the subscriber and findmnt each get one line for it."""
    results: dict[str, Any] = {}
    mount_daemon: list[float] = []
    mount_findmnt: list[float] = []
    node_daemon: list[float] = []
    node = dev_root / "nvidia-modeset"
    with subscription(daemon) as lines, findmnt_poll() as findmnt:
        assert findmnt.stdout is not None
        polled = TimedLines(findmnt.stdout.readline, "findmnt")
        time.sleep(0.3)  # findmnt has read the table and waits
        for _ in range(plan.event_rounds):
            for change in (
                lambda: mount_tmpfs(str(dev_root), "size=64k,mode=755"),
                lambda: umount(str(dev_root)),
            ):
                started = time.monotonic()
                change()
                mount_daemon.append((lines.next()[0] - started) * 1000)
                mount_findmnt.append((polled.next()[0] - started) * 1000)
                # A trailing rescan still under way would shorten the next measurement.
                time.sleep(0.05)
            for change in (
                lambda: os.mknod(node, 0o20666, os.makedev(195, 254)),
                lambda: os.unlink(node),
            ):
                started = time.monotonic()
                change()
                node_daemon.append((lines.next()[0] - started) * 1000)
                time.sleep(0.05)
        stray = polled.drain()
        if stray:
            raise RuntimeError(f"findmnt reported more than the bench did: {stray}")
    results["mount_daemon"] = summary(mount_daemon)
    results["mount_findmnt"] = summary(mount_findmnt)
    results["node_daemon"] = summary(node_daemon)
    results["samples"] = {
        "mount_daemon": mount_daemon,
        "mount_findmnt": mount_findmnt,
        "node_daemon": node_daemon,
    }
    results["debounce_ms"] = DEBOUNCE_MS
    return results


# --- b. whole processes ----------------------------------------------------------------------


def processes(daemon: Daemon, root: Path, proc: Path, base: Path, plan: Plan) -> dict[str, Any]:
    script = str(Path(sys.executable).with_name("gpu-device-watcher"))
    host = ["--root", str(root), "--proc", str(proc), "--config", str(base / "config.toml")]
    commands = {
        "python": [sys.executable, "-c", "import socket, json"],
        "path": [script, "path", "nvidiactl", "--socket", daemon.socket],
        "get_env": [script, "get", "--format", "env", "--socket", daemon.socket],
        "scan_env": [script, "scan", "--format", "env", *host],
    }
    process_times(commands, runs=2)  # warm the page cache and the bytecode
    times = process_times(commands, runs=plan.cli_runs)
    return {
        name: {
            "median_ms": round(statistics.median(samples), 2),
            "min_ms": round(min(samples), 2),
            "samples": [round(sample, 2) for sample in samples],
        }
        for name, samples in times.items()
    }


# --- d. idle -------------------------------------------------------------------------------

POLLING_LOOP = """
import os, sys, time
while True:
    os.listdir(sys.argv[1])
    time.sleep(1)
"""


def idle(daemon: Daemon, dev_root: Path, seconds: float) -> dict[str, Any]:
    poller = subprocess.Popen([sys.executable, "-c", POLLING_LOOP, str(dev_root)])
    try:
        time.sleep(1.5)  # both settled: the poller started, the daemon read its last hang-up
        before = {"daemon": cpu_and_switches(daemon.pid), "poller": cpu_and_switches(poller.pid)}
        time.sleep(seconds)
        after = {"daemon": cpu_and_switches(daemon.pid), "poller": cpu_and_switches(poller.pid)}
    finally:
        poller.terminate()
        poller.wait(TIMEOUT)
    result: dict[str, Any] = {"seconds": seconds}
    for who in ("daemon", "poller"):
        cpu, voluntary, involuntary = (a - b for a, b in zip(after[who], before[who], strict=True))
        result[who] = {
            "cpu_ticks": cpu,
            "wakeups": voluntary,
            "involuntary": involuntary,
        }
    result["daemon"]["threads"] = len(os.listdir(f"/proc/{daemon.pid}/task"))
    return result


# --- g. throughput ---------------------------------------------------------------------------


def load(path: str, clients: int, seconds: float, requests: int | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.load", "run", "--socket", path]
    command += ["--clients", str(clients), "--seconds", str(seconds)]
    if requests is not None:
        command += ["--requests", str(requests)]
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, check=True, timeout=seconds * 4 + 120
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextmanager
def echo_server(base: Path, reply: bytes) -> Iterator[str]:
    path = str(base / "echo.sock")
    reply_file = base / "echo.reply"
    reply_file.write_bytes(reply)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.load", "echo", "--socket", path, "--reply", str(reply_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the echo server did not start")
        yield path
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


def throughput(daemon: Daemon, base: Path, plan: Plan) -> dict[str, Any]:
    reply = LineSocket(daemon.socket)
    try:
        get_reply = reply.request(b'{"op":"get"}\n') + b"\n"
    finally:
        reply.close()
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        "daemon": {n: [] for n in plan.clients},
        "echo": {n: [] for n in plan.clients},
    }
    with echo_server(base, get_reply) as echo_path:
        for _ in range(plan.throughput_repeats):
            for clients in plan.clients:
                # Interleaved, so that drifting load on the machine hits both alike.
                runs["daemon"][clients].append(load(daemon.socket, clients, plan.throughput_s))
                runs["echo"][clients].append(load(echo_path, clients, plan.throughput_s))
    result: dict[str, Any] = {"reply_bytes": len(get_reply), "seconds": plan.throughput_s}
    for who, by_clients in runs.items():
        result[who] = {
            str(clients): {
                "requests_per_s": round(statistics.median(r["requests_per_s"] for r in repeats)),
                "p99_ms": round(statistics.median(r["p99_ms"] for r in repeats), 4),
                "p50_ms": round(statistics.median(r["p50_ms"] for r in repeats), 4),
                "repeats": len(repeats),
            }
            for clients, repeats in by_clients.items()
        }
    return result


def memory_under_queries(daemon: Daemon, plan: Plan) -> dict[str, Any]:
    """RSS before and after `plan.queries` gets (16 clients), after a warm-up of 10%."""
    load(daemon.socket, 16, 600, requests=plan.queries // 10)
    before = rss_kib(daemon.pid)
    started = time.monotonic()
    result = load(daemon.socket, 16, 600, requests=plan.queries)
    after = rss_kib(daemon.pid)
    return {
        "queries": result["requests"],
        "seconds": round(time.monotonic() - started, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "growth_kib": after - before,
    }


# --- a. get vs scan ---------------------------------------------------------------------------


def get_vs_scan(daemon: Daemon, view: HostView, base: Path, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for size in plan.sizes:
        mounts = grow_mount_table(base / "mounts", size)
        daemon.settle()
        gets: list[float] = []
        scans: list[float] = []
        repeats = 3
        scan_repeats = plan.scan_repeats if size >= 10_000 else plan.scan_repeats * 3
        for _ in range(repeats):
            gets += get_latency(daemon, plan.get_requests // repeats)
            scans += scan_latency(view, max(1, scan_repeats // repeats))
        get_summary, scan_summary = summary(gets), summary(scans)
        rows.append(
            {
                "mounts": mounts,
                "get": get_summary,
                "scan": scan_summary,
                "ratio_p50": round(scan_summary["p50_ms"] / get_summary["p50_ms"], 1),
                "ratio_p99": round(scan_summary["p99_ms"] / get_summary["p99_ms"], 1),
                "daemon_last_scan_ms": daemon.request({"op": "status"})["status"]["last_scan_ms"],
            }
        )
        log(f"get vs scan at {mounts} mounts: {rows[-1]['ratio_p50']}x")
    return rows


# --- e. the storm ----------------------------------------------------------------------------

STORM_PREDICATES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "mknod": lambda m: "nvidia-modeset" in names(m),
    "unlink": lambda m: "nvidia-modeset" not in names(m),
    "cover": lambda m: m["driver"]["dev_root"] is None,
    "uncover": lambda m: m["driver"]["dev_root"] is not None,
}


def _run_storm(
    base: Path, dev_root: Path, plan: Plan, watched: dict[str, int]
) -> tuple[dict[str, Any], dict[str, list[tuple[float, int]]]]:
    """Run bench.storm; sample the CPU ticks of the `watched` pids every 250 ms meanwhile."""
    storm_dir = base / "storm"
    command = [sys.executable, "-m", "bench.storm", "--dir", str(storm_dir)]
    command += ["--dev-root", str(dev_root), "--rate", str(plan.storm_rate)]
    command += ["--seconds", str(plan.storm_s)]
    samples: dict[str, list[tuple[float, int]]] = {who: [] for who in watched}
    generator = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE)
    try:
        while generator.poll() is None:
            now = time.monotonic()
            for who, pid in watched.items():
                samples[who].append((now, ticks(pid)))
            time.sleep(0.25)
        out, _ = generator.communicate(timeout=TIMEOUT)
    finally:
        if generator.poll() is None:
            generator.kill()
            generator.wait(TIMEOUT)
    if generator.returncode != 0:
        raise RuntimeError(f"bench.storm failed ({generator.returncode})")
    report: dict[str, Any] = json.loads(out)
    return report, samples


def _cpu_share(samples: list[tuple[float, int]], start: float, end: float) -> float:
    inside = [(t, n) for t, n in samples if start <= t <= end + 0.3]
    if len(inside) < 2:
        return float("nan")
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return round((n1 - n0) * TICK_S / (t1 - t0), 3)


def _series(samples: list[tuple[float, int]], start: float) -> list[tuple[float, float]]:
    series = []
    for (t0, n0), (t1, n1) in itertools.pairwise(samples):
        if t1 > t0:
            series.append((round(t1 - start, 3), round((n1 - n0) * TICK_S / (t1 - t0), 3)))
    return series


def reset_host(dev_root: Path) -> None:
    """Undo the storm's final mknod, so that the next storm starts from the same host."""
    node = dev_root / "nvidia-modeset"
    if node.exists():
        node.unlink()
        time.sleep(0.3)


def storm_with_daemon(
    daemon: Daemon, view: HostView, base: Path, dev_root: Path, plan: Plan
) -> dict[str, Any]:
    reset_host(dev_root)
    scans_before = daemon.request({"op": "status"})["status"]["scans"]
    with subscription(daemon) as lines:
        report, samples = _run_storm(base, dev_root, plan, {"daemon": daemon.pid})
        final_at, _ = report["final"]
        # The final change must arrive; then a quiet second for anything trailing.
        arrivals: list[tuple[float, dict[str, Any]]] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            arrived, line = lines.next(max(0.1, deadline - time.monotonic()))
            arrivals.append((arrived, map_of(line)))
            if arrived >= final_at and STORM_PREDICATES["mknod"](arrivals[-1][1]):
                break
        time.sleep(1.0)
        arrivals += [(t, map_of(line)) for t, line in lines.drain()]
    fresh = json.loads(msgspec.json.encode(scan(view)))
    live = daemon.request({"op": "get"})["map"]
    correct = content(live) == content(fresh)

    # During: each relevant change to the first line after it that shows it.
    during = []
    for at, kind in report["relevant"]:
        shown = next((t for t, m in arrivals if t >= at and STORM_PREDICATES[kind](m)), None)
        during.append((shown - at) * 1000 if shown is not None else float("inf"))
    # After: from the last storm operation (and the final mknod right behind it) to the
    # line after which the map equals a fresh scan and stays so.
    settled = next(
        (t for t, m in reversed(arrivals) if content(m) == content(fresh) and t >= final_at),
        None,
    )
    after_ms = (settled - report["ended"]) * 1000 if settled is not None else float("inf")
    status = daemon.request({"op": "status"})["status"]
    return {
        "ops": report["ops"],
        "late_ops": report["late"],
        "seconds": round(report["ended"] - report["started"], 2),
        "cpu_share": _cpu_share(samples["daemon"], report["started"], report["ended"]),
        "cpu_series": _series(samples["daemon"], report["started"]),
        "during": summary(during),
        "during_samples": [round(sample, 2) for sample in during],
        "after_ms": round(after_ms, 1),
        "correct": correct,
        "scans": status["scans"] - scans_before,
        "publications": len(arrivals),
        "rss_kib": rss_kib(daemon.pid),
    }


def storm_with_findmnt(base: Path, dev_root: Path, plan: Plan) -> dict[str, Any]:
    reset_host(dev_root)
    with findmnt_poll(stdout=subprocess.DEVNULL) as findmnt:
        time.sleep(0.5)
        report, samples = _run_storm(base, dev_root, plan, {"findmnt": findmnt.pid})
    return {
        "ops": report["ops"],
        "cpu_share": _cpu_share(samples["findmnt"], report["started"], report["ended"]),
        "cpu_series": _series(samples["findmnt"], report["started"]),
    }


# --- the run ---------------------------------------------------------------------------------


def python_rss_kib() -> int:
    """RSS of a bare interpreter that imported socket and json (the client baseline)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import socket, json, sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        return rss_kib(process.pid)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(TIMEOUT)


def run(plan: Plan, only: str = "abcdefg") -> dict[str, Any]:
    """Every phase in one daemon's life (the storm on the mountinfo path in a second one);
    `only` picks phases by letter, for working on one of them."""
    results: dict[str, Any] = {"plan": plan.__dict__}
    memory: dict[str, Any] = {}
    results["memory"] = memory
    compile_bytecode()
    with scratch_tmpfs() as base:
        root, proc = build_operator_host(base)
        host = _BenchHost(root, proc, base, HostView(root=str(root), proc=str(proc)))
        daemon = Daemon(root, proc, base, name="auto")
        try:
            time.sleep(1.0)
            memory["start_kib"] = rss_kib(daemon.pid)
            first_mount_change(daemon, base)
            # The mount events mode of a daemon is what its log says it uses.
            results["mode_auto"] = _mode_line(daemon)
            memory["python_kib"] = python_rss_kib()
            _auto_phases(results, plan, only, daemon, host)
        finally:
            results["warnings_auto"] = _warnings(daemon)
            results["daemon_exit_auto"] = daemon.stop()
        if "e" not in only:
            return results
        _mountinfo_storm(results, plan, host)
    return results


class _BenchHost(NamedTuple):
    """The simulated GPU Operator host every phase of `run` works on."""

    root: Path
    proc: Path
    base: Path
    view: HostView


def _auto_phases(
    results: dict[str, Any], plan: Plan, only: str, daemon: Daemon, host: _BenchHost
) -> None:
    """The phases run against the first daemon (mount events as it chooses them)."""
    memory = results["memory"]
    root, proc, base, view = host
    dev_root = root / DEV_ROOT
    if "c" in only:
        phase(results, "c. change detection")
        results["events"] = change_detection(daemon, dev_root, plan)
    if "b" in only:
        phase(results, "b. whole processes")
        results["processes"] = processes(daemon, root, proc, base, plan)
    if "d" in only:
        phase(results, "d. idle")
        daemon.settle()
        results["idle"] = idle(daemon, dev_root, plan.idle_s)
    if "f" in only:
        phase(results, "f. memory under queries")
        memory["queries"] = memory_under_queries(daemon, plan)
    if "g" in only:
        phase(results, "g. throughput")
        results["throughput"] = throughput(daemon, base, plan)
    if "a" in only:
        phase(results, "a. get vs scan")
        results["get_vs_scan"] = get_vs_scan(daemon, view, base, plan)
    else:
        grow_mount_table(base / "mounts", plan.sizes[-1])
    memory["at_10k_kib"] = rss_kib(daemon.pid)
    if "e" in only:
        phase(results, "e. storm, fanotify")
        results["storm_auto"] = storm_with_daemon(daemon, view, base, dev_root, plan)
        memory["after_storm_kib"] = results["storm_auto"]["rss_kib"]


def _mountinfo_storm(results: dict[str, Any], plan: Plan, host: _BenchHost) -> None:
    """The storm against findmnt --poll and against a daemon on the mountinfo path."""
    memory = results["memory"]
    root, proc, base, view = host
    dev_root = root / DEV_ROOT
    phase(results, "e. storm, findmnt --poll")
    results["storm_findmnt"] = storm_with_findmnt(base, dev_root, plan)
    phase(results, "e. storm, mountinfo path")
    fallback = Daemon(root, proc, base, env={MODE_ENV: "mountinfo"}, name="mountinfo")
    try:
        time.sleep(1.0)
        results["mode_mountinfo"] = _mode_line(fallback)
        results["storm_mountinfo"] = storm_with_daemon(fallback, view, base, dev_root, plan)
        memory["mountinfo_after_storm_kib"] = results["storm_mountinfo"]["rss_kib"]
    finally:
        results["warnings_mountinfo"] = _warnings(fallback)
        results["daemon_exit_mountinfo"] = fallback.stop()


def _mode_line(daemon: Daemon) -> str:
    """What the daemon says it uses for mount changes now (its last word on it)."""
    found = "unknown"
    for line in daemon.log_text.splitlines():
        if "mount changes:" in line:
            found = line.split("mount changes:", 1)[1].strip()
    return found


def first_mount_change(daemon: Daemon, base: Path) -> None:
    """A mount and umount away from the driver roots: in `auto` mode the daemon switches to
    fanotify mount events at the first mount change; let that happen before measuring."""
    target = base / "first"
    target.mkdir(exist_ok=True)
    mount_tmpfs(str(target))
    umount(str(target))
    # The switch, or the word that this kernel or process cannot (the auto daemon then stays
    # on the mountinfo path); neither within the timeout: measure as it is.
    with contextlib.suppress(AssertionError):
        daemon.wait_log("mount changes: fanotify|every mountinfo wake-up rescans", TIMEOUT)
    daemon.settle()


def _warnings(daemon: Daemon) -> list[str]:
    return [
        line
        for line in daemon.log_text.splitlines()
        if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--only", default="abcdefgij", help="phases to run, by letter")
    parser.add_argument(
        "--before", type=Path, help="phase i: a checkout of an earlier version, run beside"
    )
    arguments = parser.parse_args(argv)
    for tool in ("unshare", "findmnt", "setpriv"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed")
    reexec_unshared()
    plan = Plan.make(arguments.quick)
    results = run(plan, arguments.only) if set(arguments.only) - {"i", "j"} else {}
    if "i" in arguments.only:
        phase(results, "i. unprivileged, 10,000 mounts")
        with scratch_tmpfs() as base:
            results["unprivileged"] = unprivileged.run(plan, base, arguments.before)
    if "j" in arguments.only:
        phase(results, "j. uevents")
        with scratch_tmpfs() as base:
            results["uevents"] = uevents.run(base, plan.idle_s, plan.event_rounds)
    arguments.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
