"""What the metrics endpoint costs the daemon.

Run as root: `python -m bench.metrics_cost [--quick]`. It re-runs itself in a private mount
namespace, builds a GPU-Operator-shaped host (bench.hostmounts) whose driver root ships a
`cuda-checkpoint`, and starts the real daemon twice: once with `metrics_listen` and
`nfd_features_file`, once without. It measures:

1. scrape latency: 300 `GET /metrics`, one TCP connection each (as a scraper without
   keep-alive), client-side wall time to the last byte; median and p99;
2. the daemon's CPU (utime+stime from /proc/PID/stat, all threads) over 60 s idle and over
   60 s with one scrape per second (10 s each with --quick);
3. RSS (VmRSS) of the daemon with metrics against the daemon without, after start and after
   the scrapes.

Prints a table and writes bench/results-metrics.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from bench.hostmounts import build_operator_host, reexec_unshared, scratch_tmpfs
from bench.live import Daemon, cpu_and_switches, rss_kib

RESULTS = Path(__file__).with_name("results-metrics.json")
TIMEOUT = 30.0
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(daemon: Daemon) -> float:
    """utime + stime of the daemon, all threads."""
    return cpu_and_switches(daemon.pid)[0] / TICK


def scrape(port: int) -> float:
    """Seconds from connect to the last byte of one scrape."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"scrape answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def cpu_over(daemon: Daemon, seconds: float, port: int | None) -> float:
    """CPU seconds the daemon used over `seconds`, scraping once a second when `port`."""
    before = cpu_seconds(daemon)
    start = time.monotonic()
    for second in range(int(seconds)):
        if port is not None:
            scrape(port)
        # Paced on the clock, not on the scrape: one per second however long each takes.
        time.sleep(max(0.0, start + second + 1 - time.monotonic()))
    return cpu_seconds(daemon) - before


def run(quick: bool) -> dict[str, Any]:
    seconds = 10.0 if quick else 60.0
    with scratch_tmpfs() as base:
        root, proc = build_operator_host(base)
        cuda = root / "run/nvidia/driver/usr/bin/cuda-checkpoint"
        cuda.parent.mkdir(parents=True)
        cuda.write_bytes(b"#!/bin/sh\n")
        cuda.chmod(0o755)
        (base / "features.d").mkdir()
        port = free_port()
        plain = Daemon(root, proc, base, name="plain", config_name="plain.toml")
        published = Daemon(
            root,
            proc,
            base,
            name="metrics",
            config_name="metrics.toml",
            config_text=f'metrics_listen = "127.0.0.1:{port}"\n'
            f'nfd_features_file = "{base}/features.d/gpu-device-watcher"\n',
        )
        try:
            rss_start = {"plain": rss_kib(plain.pid), "metrics": rss_kib(published.pid)}
            for _ in range(20):  # warm up: imports done, buffers grown
                scrape(port)
            latencies = [scrape(port) for _ in range(300)]
            rss_scraped = {"plain": rss_kib(plain.pid), "metrics": rss_kib(published.pid)}
            idle = cpu_over(published, seconds, None)
            scraped = cpu_over(published, seconds, port)
            plain_idle = cpu_over(plain, seconds, None)
        finally:
            plain.stop()
            published.stop()
    ordered = sorted(latencies)
    return {
        "scrape_ms": {
            "median": round(statistics.median(latencies) * 1000, 3),
            "p99": round(ordered[round(0.99 * (len(ordered) - 1))] * 1000, 3),
            "count": len(latencies),
        },
        "cpu": {
            "seconds": seconds,
            "idle_cpu_s": round(idle, 3),
            "one_scrape_per_s_cpu_s": round(scraped, 3),
            "idle_without_metrics_cpu_s": round(plain_idle, 3),
            "tick_s": 1 / TICK,
        },
        "rss_kib": {
            "without_metrics_at_start": rss_start["plain"],
            "with_metrics_at_start": rss_start["metrics"],
            "without_metrics_after_scrapes": rss_scraped["plain"],
            "with_metrics_after_scrapes": rss_scraped["metrics"],
        },
    }


def table(results: dict[str, Any]) -> str:
    scrape_ms, cpu, rss = results["scrape_ms"], results["cpu"], results["rss_kib"]
    seconds = cpu["seconds"]
    return "\n".join(
        [
            f"scrape latency         median {scrape_ms['median']} ms, p99 {scrape_ms['p99']} ms"
            f" ({scrape_ms['count']} scrapes)",
            f"daemon CPU, {seconds:g} s idle      {cpu['idle_cpu_s']} s"
            f" ({100 * cpu['idle_cpu_s'] / seconds:.2f}% of a core)",
            f"daemon CPU, 1 scrape/s       {cpu['one_scrape_per_s_cpu_s']} s"
            f" ({100 * cpu['one_scrape_per_s_cpu_s'] / seconds:.2f}% of a core)",
            f"idle, without metrics        {cpu['idle_without_metrics_cpu_s']} s",
            f"RSS at start                 {rss['with_metrics_at_start']} KiB with,"
            f" {rss['without_metrics_at_start']} KiB without"
            f" (+{rss['with_metrics_at_start'] - rss['without_metrics_at_start']} KiB)",
            f"RSS after 320 scrapes        {rss['with_metrics_after_scrapes']} KiB with,"
            f" {rss['without_metrics_after_scrapes']} KiB without"
            f" (+{rss['with_metrics_after_scrapes'] - rss['without_metrics_after_scrapes']} KiB)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s CPU windows instead of 60 s")
    options = parser.parse_args()
    reexec_unshared()
    results = run(options.quick)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
