"""The live daemon, side by side with what it replaces, in one run.

Run as root: `python -m bench.live [--quick]`. It re-runs itself in a private mount
namespace, builds a GPU-Operator-shaped host there (bench.hostmounts), starts the real
`gpu-device-watcher serve` in the same namespace, and measures:

1. `get` through the socket (p50/p99 of 2,000 requests on one connection) beside one
   in-process `scan()`, at 1,000 and 10,000 mounts;
2. `gpu-device-watcher path nvidiactl` as a whole process beside `python3 -c "import socket,
   json"` on the same interpreter (medians of 30 interleaved runs);
3. event to subscriber line: mknod in the dev root, and a tmpfs holding nodes moved over
   the dev root (p50/p99 of 50 each, default 20 ms debounce);
4. an idle daemon's CPU ticks and voluntary context switches (all threads) over 30 s
   (5 s with --quick).

Prints one table and writes bench/results-live.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.hostmounts import (
    OPERATOR_NODES,
    build_operator_host,
    grow_mount_table,
    make_nodes,
    mount_tmpfs,
    move_mount,
    reexec_unshared,
    scratch_tmpfs,
)
from tests.support.daemonproc import DaemonProcess
from watcher.core.snapshot import HostView
from watcher.probe import scan

RESULTS = Path(__file__).with_name("results-live.json")
DEV_ROOT = "run/nvidia/driver/dev"
GET = b'{"op":"get"}\n'
TIMEOUT = 30.0
TARGETS = {
    "event_p50_ms": 30.0,
    "event_p99_ms": 100.0,
    "path_ratio": 1.5,
    "idle_wakeups": 0,
}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class LineSocket:
    """A blocking JSON Lines connection, kept lean so that it measures the daemon."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buffer = b""

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
        return line

    def request(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        return self.line()

    def close(self) -> None:
        self.sock.close()


class Daemon(DaemonProcess):
    """The real daemon on the benchmark's host (in this unshared namespace), ready."""

    def __init__(
        self,
        root: Path,
        proc: Path,
        base: Path,
        *,
        env: dict[str, str] | None = None,
        name: str = "gdw",
        config_text: str = "",
        config_name: str = "config.toml",
        command: list[str] | None = None,
        socket_dir: Path | None = None,
    ) -> None:
        """`command` runs the CLI instead of `python -m watcher` (as another user, another
        version); `socket_dir`: where it may create its socket (default `base`)."""
        config = base / config_name
        config.write_text(config_text)
        # Another user's daemon must be able to read it (and a file it does not own is
        # refused unless root owns it and nobody else may write it).
        config.chmod(0o600 if command is None else 0o644)
        socket_path = (socket_dir or base) / f"{name}.sock"
        super().__init__(
            [
                *(command or [sys.executable, "-m", "watcher"]),
                *("serve", "--root", str(root)),
                *("--proc", str(proc), "--socket", str(socket_path), "--config", str(config)),
            ],
            socket_path=socket_path,
            # The notify socket is an abstract one of its own: a daemon run as another user
            # can send to it too.
            env=env,
        )
        try:
            self.wait_ready(TIMEOUT)
        except AssertionError as error:
            self.close()
            raise RuntimeError(f"the daemon did not get ready: {error}") from None

    def settle(self) -> None:
        """Let the events of a mount storm play out: rescan, then once more after a pause."""
        self.request({"op": "rescan"})
        time.sleep(0.5)
        self.request({"op": "rescan"})

    def stop(self, number: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        returncode = super().stop(number, timeout)
        self.close()
        return returncode


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --- 1. get versus scan ------------------------------------------------------------------


def get_latency(daemon: Daemon, requests: int) -> list[float]:
    connection = LineSocket(daemon.socket)
    try:
        for _ in range(200):
            connection.request(GET)
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            connection.request(GET)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        connection.close()
    return samples


def scan_latency(view: HostView, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        scan(view)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


# --- 2. the CLI as a whole process ---------------------------------------------------------


def compile_bytecode() -> None:
    """Write watcher's .pyc files as an install would; with PYTHONDONTWRITEBYTECODE set and
    stale ones, every run of the CLI would compile its modules again and measure that."""
    import compileall  # noqa: PLC0415

    import watcher  # noqa: PLC0415

    compileall.compile_dir(str(Path(watcher.__file__).parent), quiet=1)


def process_times(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall time of each command, interleaved so that drifting load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, check=False)
            times[name].append((time.perf_counter() - started) * 1000)
            if done.returncode != 0:
                raise RuntimeError(f"{command} failed: {done.stderr.decode(errors='replace')}")
    return times


# --- 3. event to subscriber --------------------------------------------------------------


def event_latency(
    daemon: Daemon, rounds: int, change: Callable[[], None], undo: Callable[[], None]
) -> list[float]:
    """Time from just before `change()` to the subscriber line it causes."""
    subscriber = LineSocket(daemon.socket)
    try:
        subscriber.request(b'{"op":"subscribe"}\n')
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            change()
            subscriber.line()
            samples.append((time.perf_counter() - started) * 1000)
            undo()
            subscriber.line()
            # Let any trailing rescan of the undo finish: one already under way would
            # shorten the next measurement.
            time.sleep(0.05)
    finally:
        subscriber.close()
    return samples


def node_events(daemon: Daemon, dev_root: Path, rounds: int) -> list[float]:
    node = dev_root / "nvidia-modeset"

    def create() -> None:
        os.mknod(node, 0o20666, os.makedev(195, 254))

    return event_latency(daemon, rounds, create, lambda: os.unlink(node))


def mount_events(daemon: Daemon, dev_root: Path, stage: Path, rounds: int) -> list[float]:
    """A tmpfs already holding a node, moved over the dev root in one step and back again:
    each move is exactly one mount event, and each changes the map."""
    stage.mkdir()
    mount_tmpfs(str(stage), "size=64k,mode=755")
    make_nodes(stage, {"nvidiactl": OPERATOR_NODES["nvidiactl"]})
    return event_latency(
        daemon,
        rounds,
        lambda: move_mount(str(stage), str(dev_root)),
        lambda: move_mount(str(dev_root), str(stage)),
    )


# --- 4. idle ------------------------------------------------------------------------------


def cpu_and_switches(pid: int) -> tuple[int, int, int]:
    """(utime+stime ticks, voluntary, involuntary context switches) summed over all threads."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    voluntary = involuntary = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as file:
            for line in file:
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return ticks, voluntary, involuntary


def idle(daemon: Daemon, seconds: float) -> dict[str, Any]:
    threads = len(os.listdir(f"/proc/{daemon.pid}/task"))
    before = cpu_and_switches(daemon.pid)
    time.sleep(seconds)
    after = cpu_and_switches(daemon.pid)
    ticks, voluntary, involuntary = (a - b for a, b in zip(after, before, strict=True))
    return {
        "seconds": seconds,
        "threads": threads,
        "cpu_ticks": ticks,
        "voluntary_ctxt_switches": voluntary,
        "nonvoluntary_ctxt_switches": involuntary,
    }


def trace_wakeups(pid: int, seconds: float) -> list[str]:
    """What an idle daemon that does wake up is doing: its syscalls, by strace -f."""
    if shutil.which("strace") is None:
        return ["strace is not installed"]
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as output:
        tracer = subprocess.Popen(
            ["strace", "-f", "-tt", "-o", output.name, "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(seconds)
        tracer.terminate()
        tracer.wait(TIMEOUT)
        return output.read().splitlines()[:60]


# --- the run ------------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "n": len(samples),
    }


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "targets": TARGETS}
    script = Path(sys.executable).with_name("gpu-device-watcher")
    with scratch_tmpfs() as base:
        root, proc = build_operator_host(base)
        dev_root = root / DEV_ROOT
        daemon = Daemon(root, proc, base)
        try:
            # 3. events, at the namespace's own small mount table.
            results["event_node"] = summary(node_events(daemon, dev_root, 50))
            results["event_mount"] = summary(mount_events(daemon, dev_root, base / "stage", 50))

            # 2. the CLI as a whole process.
            compile_bytecode()
            times = process_times(
                {
                    "path": [str(script), "path", "nvidiactl", "--socket", daemon.socket],
                    "python": [sys.executable, "-c", "import socket, json"],
                },
                runs=30,
            )
            path_ms, python_ms = (statistics.median(times[k]) for k in ("path", "python"))
            results["cli_path"] = {
                "path_median_ms": round(path_ms, 2),
                "python_median_ms": round(python_ms, 2),
                # Less disturbed by other load on the machine than the medians.
                "path_min_ms": round(min(times["path"]), 2),
                "python_min_ms": round(min(times["python"]), 2),
                "ratio": round(path_ms / python_ms, 3),
                "runs": 30,
            }

            # 4. idle.
            daemon.settle()
            # The last client's hang-up is still to be read by the daemon: not idleness.
            time.sleep(1.0)
            results["idle"] = idle(daemon, 5.0 if quick else 30.0)
            if results["idle"]["cpu_ticks"] or results["idle"]["voluntary_ctxt_switches"]:
                results["idle"]["strace"] = trace_wakeups(daemon.pid, 10.0)

            # 1. get versus scan as the mount table grows.
            view = HostView(root=str(root), proc=str(proc))
            results["get_vs_scan"] = []
            for size in (1_000, 10_000):
                mounts = grow_mount_table(base / "mounts", size)
                daemon.settle()
                get = get_latency(daemon, 2_000)
                scanned = scan_latency(view, 10 if quick else 30)
                results["get_vs_scan"].append(
                    {
                        "mounts": mounts,
                        "get": summary(get),
                        "scan": summary(scanned),
                        "ratio_p50": round(statistics.median(scanned) / statistics.median(get)),
                        "daemon_last_scan_ms": daemon.request({"op": "status"})["status"][
                            "last_scan_ms"
                        ],
                    }
                )
        finally:
            log = daemon.log_text
            results["daemon_exit"] = daemon.stop()
            results["daemon_warnings"] = [
                line for line in log.splitlines() if " WARNING " in line or " ERROR " in line
            ]
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("figure", "daemon", "beside", "ratio", "target")]
    for entry in results["get_vs_scan"]:
        get, scanned = entry["get"], entry["scan"]
        rows.append(
            (
                f"get vs scan() @ {entry['mounts']:,} mounts (p50 / p99)",
                f"{get['p50_ms']:.3f} / {get['p99_ms']:.3f} ms",
                f"{scanned['p50_ms']:.2f} / {scanned['p99_ms']:.2f} ms",
                f"{entry['ratio_p50']:,}x faster",
                "",
            )
        )
    cli = results["cli_path"]
    rows.append(
        (
            "`path nvidiactl` process vs python3 -c 'import socket, json' (median, min)",
            f"{cli['path_median_ms']:.1f} ms ({cli['path_min_ms']:.1f})",
            f"{cli['python_median_ms']:.1f} ms ({cli['python_min_ms']:.1f})",
            f"{cli['ratio']:.2f}x",
            f"<= {TARGETS['path_ratio']}x",
        )
    )
    for key, what in (
        ("event_node", "mknod -> subscriber"),
        ("event_mount", "mount -> subscriber"),
    ):
        entry = results[key]
        rows.append(
            (
                f"{what} (p50 / p99, n={entry['n']}, debounce 20 ms)",
                f"{entry['p50_ms']:.1f} / {entry['p99_ms']:.1f} ms",
                "",
                "",
                f"< {TARGETS['event_p50_ms']:g} / < {TARGETS['event_p99_ms']:g} ms",
            )
        )
    idle_figures = results["idle"]
    rows.append(
        (
            f"idle {idle_figures['seconds']:g} s: CPU ticks / voluntary ctx switches",
            f"{idle_figures['cpu_ticks']} / {idle_figures['voluntary_ctxt_switches']}",
            f"({idle_figures['threads']} threads)",
            "",
            "0 / 0",
        )
    )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 s idle window, fewer scans")
    arguments = parser.parse_args()
    reexec_unshared()
    results = run(arguments.quick)
    print(table(results))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
