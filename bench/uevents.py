"""j. Kernel uevents: what a flood of unrelated ones costs the daemon, and how fast a
module's reaches a subscriber.

Run by `bench.suite` (phase j) in its private mount namespace, as root, with one daemon of
its own on a GPU-Operator-shaped host; each figure beside a baseline from the same run:

- CPU: the daemon's utime+stime over a window while idle, then over a window of the same
  length while the kernel sends 1,000 unrelated uevents per second (root writes `add` to
  /sys/devices/virtual/mem/null/uevent: a synthetic uevent, sent by the kernel itself to every
  uevent listener on the machine, as a network interface or a loop device coming and going
  would be). Beside it the daemon's voluntary context switches (its wake-ups) and its
  `uevents` counter, which must not move.
- latency: the uvm major in the simulated /proc/devices changed and the module's uevent sent
  (root sends the kernel's bytes on the kernel's group: this kernel may have no loadable
  modules), to the subscriber's line; beside it a mknod in the dev root to its line (the
  inotify path), same daemon.

`python -m bench.suite --only j --json FILE` runs this phase alone.
"""

from __future__ import annotations

import errno
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from bench.hostmounts import build_operator_host
from bench.live import Daemon, cpu_and_switches, event_latency, node_events, percentile
from tests.support.host import proc_devices_text

SYNTHETIC = Path("/sys/devices/virtual/mem/null/uevent")
FLOOD_RATE = 1000
SO_RCVBUFFORCE = 33
UVM_MAJOR = 509
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def module_message(action: str, name: str) -> bytes:
    """A module's uevent as the kernel writes it (lib/kobject_uevent.c)."""
    devpath = f"/module/{name}"
    keys = [f"ACTION={action}", f"DEVPATH={devpath}", "SUBSYSTEM=module", "SEQNUM=1"]
    return (f"{action}@{devpath}\0" + "\0".join(keys) + "\0").encode()


def flood(seconds: float, rate: int = FLOOD_RATE) -> tuple[int, int]:
    """Synthetic `add` uevents of /dev/null at `rate` per second for `seconds`: how many were
    written, and how many a listener without a filter received (proof that they were sent)."""
    fd = os.open(SYNTHETIC, os.O_WRONLY)
    plain = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 15)
    # Root may grow the queue past rmem_max: 1,000 messages of ~150 bytes a second.
    plain.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    plain.bind((0, 1))
    sent = received = 0
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < seconds:
            # Paced on the clock: catch up in a burst, then sleep a little.
            while sent < elapsed * rate:
                os.pwrite(fd, b"add", 0)
                sent += 1
            received += _drain(plain)
            time.sleep(0.002)
    finally:
        os.close(fd)
        plain.close()
    return sent, received


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(16384)
        except BlockingIOError:
            return count
        except OSError as error:
            # The queue overflowed while this process waited for the CPU: the count is then
            # a lower bound, which is all the proof needs.
            if error.errno != errno.ENOBUFS:
                raise
            continue
        count += 1


def cpu_window(daemon: Daemon, seconds: float, during: bool) -> dict[str, Any]:
    """The daemon's CPU and wake-ups over `seconds`, idle or under the flood."""
    before = cpu_and_switches(daemon.pid)
    uevents_before = daemon.request({"op": "status"})["status"]["uevents"]
    sent = received = 0
    started = time.monotonic()
    if during:
        sent, received = flood(seconds)
    else:
        time.sleep(seconds)
    wall = time.monotonic() - started
    after = cpu_and_switches(daemon.pid)
    uevents_after = daemon.request({"op": "status"})["status"]["uevents"]
    ticks, voluntary, involuntary = (a - b for a, b in zip(after, before, strict=True))
    return {
        "seconds": round(wall, 3),
        "uevents_sent": sent,
        "received_without_filter": received,
        "cpu_s": round(ticks * TICK_S, 3),
        "core_percent": round(100 * ticks * TICK_S / wall, 3),
        "voluntary_switches": voluntary,
        "involuntary_switches": involuntary,
        "uevents_counted": uevents_after - uevents_before,
    }


def module_events(daemon: Daemon, proc: Path, rounds: int) -> list[float]:
    """nvidia_uvm "reloaded" with another major: /proc/devices changed, then its uevent."""
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)

    def reload(major: int) -> None:
        text = proc_devices_text({"nvidia": 195, "nvidia-uvm": major})
        (proc / "devices").write_text(text)
        sender.sendto(module_message("add", "nvidia_uvm"), (0, 1))

    try:
        return event_latency(
            daemon, rounds, lambda: reload(UVM_MAJOR + 2), lambda: reload(UVM_MAJOR)
        )
    finally:
        sender.close()


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "n": len(samples),
    }


def run(base: Path, seconds: float, rounds: int) -> dict[str, Any]:
    if not os.access(SYNTHETIC, os.W_OK):
        return {"skipped": f"{SYNTHETIC} is not writable: no synthetic uevents here"}
    root, proc = build_operator_host(base)
    results: dict[str, Any] = {"flood_rate": FLOOD_RATE}
    daemon = Daemon(root, proc, base, name="uevents")
    try:
        if "uevents are unavailable" in daemon.log_text:
            return {"skipped": "the daemon has no uevent socket here (its log says so)"}
        daemon.settle()
        results["idle"] = cpu_window(daemon, seconds, during=False)
        results["flood"] = cpu_window(daemon, seconds, during=True)
        dev_root = root / "run/nvidia/driver/dev"
        results["uevent_to_subscriber"] = summary(module_events(daemon, proc, rounds))
        results["mknod_to_subscriber"] = summary(node_events(daemon, dev_root, rounds))
    finally:
        results["daemon_exit"] = daemon.stop()
    return results
