"""Does a flood of scrapes slow the Unix socket?

Run as root: `python -m bench.scrape_flood [--quick] [--before DIR]`. It re-runs itself in a
private mount namespace, builds a GPU-Operator-shaped host (bench.hostmounts), starts the real
daemon with `metrics_listen`, and measures `get` round trips on the Unix socket, one client,
back to back: idle, and while eight scraper processes hit `/metrics` as fast as they can (one
TCP connection per scrape, no pause), in turn, three rounds of each. The row is the `get` p99
under the flood against the `get` p99 idle, measured in the same run on the same daemon.
`--before DIR` measures the daemon of an earlier checkout (DIR holds its `watcher/`) the same
way, beside it.

Prints a table and writes bench/results-scrape-flood.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.hostmounts import build_operator_host, reexec_unshared, scratch_tmpfs
from bench.live import GET, Daemon, LineSocket, cpu_and_switches, percentile

RESULTS = Path(__file__).with_name("results-scrape-flood.json")
SCRAPERS = 8
ROUNDS = 3
TICK = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape_forever(port: int, seconds: float) -> None:
    """One scraper: connect, GET, read to the close, again; prints its status counts."""
    counts: dict[str, int] = {}
    # Stopped by SIGTERM: the counts are printed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                    connection.sendall(REQUEST)
                    reply = b""
                    while chunk := connection.recv(1 << 16):
                        reply += chunk
                key = reply[9:12].decode(errors="replace") or "closed"
            except OSError as error:
                key = type(error).__name__
            counts[key] = counts.get(key, 0) + 1
    finally:
        print(json.dumps(counts), flush=True)


def flood(port: int, seconds: float) -> list[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "bench.scrape_flood", "--scrape", str(port), str(seconds)]
    return [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
        )
        for _ in range(SCRAPERS)
    ]


def gets_for(daemon: Daemon, seconds: float) -> tuple[list[float], float]:
    """Back-to-back `get` round trips (ms) for `seconds`, and the daemon's CPU share meanwhile."""
    connection = LineSocket(daemon.socket)
    samples: list[float] = []
    try:
        for _ in range(200):
            connection.request(GET)
        cpu_before, started = cpu_and_switches(daemon.pid)[0], time.monotonic()
        deadline = started + seconds
        while (now := time.perf_counter()) and time.monotonic() < deadline:
            connection.request(GET)
            samples.append((time.perf_counter() - now) * 1000)
        cpu = (cpu_and_switches(daemon.pid)[0] - cpu_before) / TICK
        share = cpu / (time.monotonic() - started)
    finally:
        connection.close()
    return samples, share


def measure(daemon: Daemon, port: int, seconds: float, rounds: int = ROUNDS) -> dict[str, Any]:
    """Idle and flood phases in turn, `rounds` of each: on a shared machine, load that comes
    and goes then falls on both alike."""
    idle: list[float] = []
    loaded: list[float] = []
    idle_cpu = flood_cpu = 0.0
    scrapes: dict[str, int] = {}
    for _ in range(rounds):
        samples, share = gets_for(daemon, seconds / rounds)
        idle += samples
        idle_cpu += share / rounds
        # Long enough to outlast the phase under load; stopped right after it.
        scrapers = flood(port, seconds=600)
        try:
            time.sleep(1.0)  # every scraper started and hitting the endpoint
            samples, share = gets_for(daemon, seconds / rounds)
            loaded += samples
            flood_cpu += share / rounds
        finally:
            for scraper in scrapers:
                scraper.terminate()
        for scraper in scrapers:
            out, _ = scraper.communicate(timeout=30)
            for key, count in json.loads(out or "{}").items():
                scrapes[key] = scrapes.get(key, 0) + count
    row: dict[str, Any] = {}
    for name, samples in (("idle", idle), ("flood", loaded)):
        row[name] = {
            "p50_ms": round(percentile(samples, 0.5), 3),
            "p99_ms": round(percentile(samples, 0.99), 3),
            "count": len(samples),
        }
    row["ratio_p99"] = round(row["flood"]["p99_ms"] / row["idle"]["p99_ms"], 1)
    row["ratio_p50"] = round(row["flood"]["p50_ms"] / row["idle"]["p50_ms"], 1)
    row["scrapers"] = SCRAPERS
    row["seconds"] = seconds
    row["daemon_cpu_share"] = {"idle": round(idle_cpu, 3), "flood": round(flood_cpu, 3)}
    row["scrapes"] = scrapes
    return row


def run(quick: bool, before: Path | None) -> dict[str, Any]:
    seconds = 3.0 if quick else 15.0
    results: dict[str, Any] = {}
    with scratch_tmpfs() as base:
        root, proc = build_operator_host(base)
        variants: list[tuple[str, list[str] | None]] = [("this", None)]
        if before is not None:
            # -c puts the working directory (this checkout) first on sys.path: put the
            # earlier checkout before it.
            start = (
                f"import sys; sys.path.insert(0, {str(before.resolve())!r}); "
                "from watcher.cli import main; sys.exit(main())"
            )
            variants.append(("before", [sys.executable, "-c", start]))
        for label, command in variants:
            port = free_port()
            daemon = Daemon(
                root,
                proc,
                base,
                name=label,
                config_name=f"{label}.toml",
                config_text=f'metrics_listen = "127.0.0.1:{port}"\n',
                command=command,
            )
            try:
                results[label] = measure(daemon, port, seconds)
            finally:
                daemon.stop()
    return results


def table(results: dict[str, Any]) -> str:
    lines = []
    for label, row in results.items():
        idle, loaded = row["idle"], row["flood"]
        lines.append(
            f"{label:>6}: get p99 idle {idle['p99_ms']} ms, under {row['scrapers']} scrapers "
            f"{loaded['p99_ms']} ms ({row['ratio_p99']}x); p50 {idle['p50_ms']} -> "
            f"{loaded['p50_ms']} ms ({row['ratio_p50']}x); {idle['count']}/{loaded['count']} "
            f"gets; daemon CPU {row['daemon_cpu_share']['idle']:.0%} -> "
            f"{row['daemon_cpu_share']['flood']:.0%} of a core; scrapes {row['scrapes']}"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--scrape":
        scrape_forever(int(sys.argv[2]), float(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per phase, not 15 s")
    parser.add_argument("--before", type=Path, help="an earlier checkout, measured beside this")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    options = parser.parse_args()
    reexec_unshared()
    results = run(options.quick, options.before)
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
