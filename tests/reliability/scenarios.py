"""Scenarios that mount things: run by `harness.run_scenario` inside a private mount namespace.

`python -m tests.reliability.scenarios NAME` reads its parameters as JSON on stdin, mounts a
tmpfs on the work directory (so everything it makes dies with the namespace), starts the
daemon *in the same namespace* (its `/proc/self/mountinfo` is ours), drives the host and
prints measured counts as JSON on stdout. Assertions are the pytest side's job; a scenario
only counts, so a failure report shows every number, not just the first mismatch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.reliability.harness import (
    MAJORS,
    MS_NOSUID,
    OPERATOR_ROOT,
    Client,
    Daemon,
    Host,
    content,
    jitter,
    mknod,
    mount,
    reference_map,
    settle,
    umount,
    write_atomic,
    write_config,
)

MOUNTINFO = "/proc/self/mountinfo"


class Checker:
    """Settle (no new generation for `quiet` s), then compare the live map with a fresh scan.

    A divergence is looked at again after a longer quiet period: `late` if the daemon got
    there after all (it published later than `quiet`), `lost` if it never did.
    """

    def __init__(self, host: Host, config: Path, client: Client, quiet: float) -> None:
        self.host, self.config, self.client, self.quiet = host, config, client, quiet
        self.generation = client.ask({"op": "get"})["generation"]
        self.checks = 0
        self.late = 0
        self.lost = 0
        self.examples: list[dict[str, Any]] = []
        self.settle_s: list[float] = []

    def check(self, label: str) -> bool:
        started = time.monotonic()
        self.generation, _ = settle(self.client, self.generation, self.quiet)
        self.settle_s.append(time.monotonic() - started)
        self.checks += 1
        live = content(self.client.ask({"op": "get"})["map"])
        reference = reference_map(self.host, MOUNTINFO, self.config)
        if live == reference:
            return True
        self.generation, _ = settle(self.client, self.generation, 2.0)
        live = content(self.client.ask({"op": "get"})["map"])
        reference = reference_map(self.host, MOUNTINFO, self.config)
        if live == reference:
            self.late += 1
            return True
        self.lost += 1
        if len(self.examples) < 3:
            self.examples.append({"label": label, "daemon": live, "scan": reference})
        return False

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.settle_s) or [0.0]
        return {
            "checks": self.checks,
            "late": self.late,
            "lost": self.lost,
            "examples": self.examples,
            "settle_p50_s": round(ordered[len(ordered) // 2], 4),
            "settle_max_s": round(ordered[-1], 4),
        }


def _start(params: dict[str, Any], **config: Any) -> tuple[Host, Path, Daemon, Client]:
    base = Path(params["workdir"])
    mount(base)
    host = Host(base)
    host.populate()
    config_path = write_config(base / "config.toml", **config)
    socket_path = base / "gdw.sock"
    args = host.options(socket_path, config_path, MOUNTINFO)
    if params.get("log_level"):
        args += ["--log-level", params["log_level"]]
    daemon = Daemon(args, Path(params["log"]))
    return host, config_path, daemon, Client(socket_path)


def _finish(daemon: Daemon, client: Client, result: dict[str, Any]) -> dict[str, Any]:
    client.close()
    result["daemon_alive_at_end"] = daemon.alive()
    result["daemon_exit"] = daemon.stop()
    return result


# --- 1. driver-container restarts ----------------------------------------------------------


def _new_majors(
    rng: random.Random, uvm_major: int, counts: dict[str, int]
) -> tuple[dict[str, int], int]:
    """The majors a new driver registers: nvidia-uvm's maybe another, the core's maybe none."""
    majors = dict(MAJORS)
    if rng.random() < 0.5:
        uvm_major = rng.choice([m for m in range(500, 512) if m != uvm_major])
        counts["major_changes"] += 1
    majors["nvidia-uvm"] = uvm_major
    if rng.random() < 0.05:
        majors = {"nvidia-uvm": uvm_major}  # the core module failed to load
        counts["unloaded"] += 1
    return majors, uvm_major


def _uvm_appears_lazily(
    rng: random.Random,
    host: Host,
    checker: Checker,
    dev: Path,
    *,
    majors: dict[str, int],
    uvm_major: int,
    counts: dict[str, int],
) -> int:
    """nvidia-uvm appears lazily, on the first CUDA call, maybe after a look; returns its
    major, which changes when nvidia-uvm is reloaded alone."""
    if rng.random() < 0.7:
        counts["lazy_uvm"] += 1
        if rng.random() < 0.4:
            checker.check("before nvidia-uvm appeared")
        else:
            jitter(rng, 0.02)
        mknod(dev / "nvidia-uvm", uvm_major, 0)
        mknod(dev / "nvidia-uvm-tools", uvm_major, 1)
        if rng.random() < 0.2:
            # nvidia-uvm reloaded alone: new major, nodes recreated by nvidia-modprobe.
            counts["uvm_reloads"] += 1
            uvm_major = rng.choice([m for m in range(500, 512) if m != uvm_major])
            majors["nvidia-uvm"] = uvm_major
            host.set_majors(majors)
            for minor, name in enumerate(("nvidia-uvm", "nvidia-uvm-tools")):
                (dev / name).unlink()
                mknod(dev / name, uvm_major, minor)
    return uvm_major


def restarts(params: dict[str, Any]) -> dict[str, Any]:
    """Unmount and remount the driver root, with changing uvm majors and lazy nodes."""
    host, config, daemon, client = _start(params)
    rng = random.Random(params["seed"])
    checker = Checker(host, config, client, params["quiet"])
    driver_root = host.fs(OPERATOR_ROOT)
    uvm_major = MAJORS["nvidia-uvm"]
    counts = {
        "cycles": 0,
        "major_changes": 0,
        "unloaded": 0,
        "lazy_uvm": 0,
        "nested_dev": 0,
        "uvm_reloads": 0,
        "down_checks": 0,
    }
    up = False
    for _ in range(params["cycles"]):
        counts["cycles"] += 1
        # The driver pod stops: sometimes its uvm node goes first, then its root.
        if up:
            if rng.random() < 0.3:
                (driver_root / "dev/nvidia-uvm").unlink(missing_ok=True)
                jitter(rng, 0.003)
            umount(driver_root)
            up = False
        if rng.random() < 0.25:
            counts["down_checks"] += 1
            checker.check("driver root unmounted")
        jitter(rng, 0.005)
        # The new driver registers its majors (uvm's is dynamic) before its root appears.
        majors, uvm_major = _new_majors(rng, uvm_major, counts)
        host.set_majors(majors)
        mount(driver_root)
        up = True
        jitter(rng, 0.003)
        dev = driver_root / "dev"
        dev.mkdir()
        if rng.random() < 0.3:
            mount(dev, flags=MS_NOSUID)
            counts["nested_dev"] += 1
        jitter(rng, 0.003)
        host.nodes(dev, uvm=False)
        uvm_major = _uvm_appears_lazily(
            rng, host, checker, dev, majors=majors, uvm_major=uvm_major, counts=counts
        )
        checker.check("driver up")
    return _finish(daemon, client, {**counts, **checker.summary()})


# --- 2. inotify overflow, directories deleted and recreated --------------------------------


def _overflow_log_lines(log: Path) -> int:
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if line.endswith("event: overflow")
    )


def _overflow_then_a_change(
    params: dict[str, Any],
    daemon: Daemon,
    checker: Checker,
    *,
    dev: Path,
    fresh_dev: Callable[[Path], None],
    log: Path,
    before: int,
) -> dict[str, int]:
    """Overflow rounds with the dev directory replaced while the queue is full, each followed
    by a change in the new directory (see `churn`)."""
    overflow = {"rounds": 0, "events_queued": 0, "recovered": 0, "later_change_seen": 0}
    for round_number in range(params["overflow_rounds"]):
        overflow["rounds"] += 1
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            for number in range(params["overflow_files"]):
                junk = dev / f"junk{number}"
                junk.touch()  # IN_CREATE, IN_OPEN, IN_CLOSE_WRITE (two in our mask)
                junk.unlink()  # IN_DELETE
            overflow["events_queued"] += 3 * params["overflow_files"]
            shutil.rmtree(dev)
            fresh_dev(dev)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        overflow["recovered"] += checker.check(f"overflow round {round_number}")
        os.chmod(dev / "nvidiactl", 0o600 if round_number % 2 == 0 else 0o640)
        overflow["later_change_seen"] += checker.check(f"change after overflow {round_number}")
    overflow["overflow_events_logged"] = _overflow_log_lines(log) - before
    return overflow


def churn(params: dict[str, Any]) -> dict[str, Any]:
    params = {**params, "log_level": "debug"}
    host, config, daemon, client = _start(params)
    rng = random.Random(params["seed"])
    checker = Checker(host, config, client, params["quiet"])
    driver_root = host.fs(OPERATOR_ROOT)
    mount(driver_root)
    dev = driver_root / "dev"

    def fresh_dev(path: Path, *, uvm: bool = True) -> None:
        host.nodes(path, MAJORS["nvidia-uvm"], uvm=uvm)
        mknod(path / "nvidia-caps/nvidia-cap1", MAJORS["nvidia-caps"], 1, 0o400)

    fresh_dev(dev)
    checker.check("initial")
    log = Path(params["log"])
    before = _overflow_log_lines(log)

    # Overflow: stop the daemon so nothing drains its queue, queue far more than 16,384
    # events, then replace the watched dev directory while the queue is full (its
    # IN_DELETE_SELF and IN_IGNORED are dropped by the kernel) and continue the daemon. Every
    # event means a full rescan, so the map after that is right anyway; what only the
    # overflow handling (re-arm every watch) gets right is the *next* change, made in the new
    # directory, which the old, dead watch would never report.
    overflow = _overflow_then_a_change(
        params, daemon, checker, dev=dev, fresh_dev=fresh_dev, log=log, before=before
    )

    # Watched directories deleted, renamed and recreated.
    recreate = {"rounds": 0, "steps": 0, "recovered": 0}
    validations = host.fs("/run/nvidia/validations")

    def step(label: str, action: Callable[[], None]) -> None:
        action()
        jitter(rng, 0.002)
        recreate["steps"] += 1
        recreate["recovered"] += checker.check(label)

    for _ in range(params["recreate_rounds"]):
        recreate["rounds"] += 1
        step("dev removed", lambda: shutil.rmtree(dev))
        step("dev recreated", lambda: fresh_dev(dev))
        step(
            "dev renamed away, another made",
            lambda: (dev.rename(driver_root / "dev.old"), fresh_dev(dev, uvm=False)),
        )
        step(
            "dev swapped back", lambda: (shutil.rmtree(dev), (driver_root / "dev.old").rename(dev))
        )
        step("caps dir removed", lambda: shutil.rmtree(dev / "nvidia-caps"))
        step(
            "caps dir recreated",
            lambda: mknod(dev / "nvidia-caps/nvidia-cap2", MAJORS["nvidia-caps"], 2, 0o444),
        )
        step(
            "driver-ready written",
            lambda: write_atomic(
                validations / "driver-ready",
                f"NVIDIA_DRIVER_ROOT={OPERATOR_ROOT}\nIS_HOST_DRIVER=false\n",
            ),
        )
        step("validations dir removed", lambda: shutil.rmtree(validations))
        step(
            "validations dir recreated, driver-ready pointing at /",
            lambda: write_atomic(validations / "driver-ready", "NVIDIA_DRIVER_ROOT=/\n"),
        )
        step("validations cleared", (validations / "driver-ready").unlink)
        step("host /dev removed", lambda: shutil.rmtree(host.fs("/dev")))
        step(
            "host /dev recreated with a stale nvidiactl",
            lambda: mknod(host.fs("/dev/nvidiactl"), 195, 254),
        )
        step("host /dev emptied", lambda: host.fs("/dev/nvidiactl").unlink())
    result = {"overflow": overflow, "recreate": recreate, **checker.summary()}
    return _finish(daemon, client, result)


# --- 4. a mount point that is not UTF-8 ----------------------------------------------------


def odd_bytes(params: dict[str, Any]) -> dict[str, Any]:
    """A driver root whose path holds the bytes FF FE, on a tmpfs whose source is FF FE too."""
    base = Path(params["workdir"])
    mount(base)
    host = Host(base)
    host.populate()
    odd_root = b"/run/\xff\xfe/driver"
    fs_root = os.fsencode(host.root) + odd_root
    os.makedirs(fs_root)
    mount(os.fsdecode(fs_root), source=b"\xff\xfe")
    host.nodes(Path(os.fsdecode(fs_root)) / "dev", MAJORS["nvidia-uvm"])
    # The GPU Operator's driver-ready file names it (a host path with those bytes).
    write_atomic(
        host.fs("/run/nvidia/validations/driver-ready"), b"NVIDIA_DRIVER_ROOT=" + odd_root + b"\n"
    )
    config = write_config(base / "config.toml")
    command = [
        sys.executable,
        "-m",
        "watcher",
        "scan",
        "--root",
        str(host.root),
        "--proc",
        str(host.proc),
        "--mountinfo",
        MOUNTINFO,
        "--config",
        str(config),
    ]
    done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    result: dict[str, Any] = {
        "scan_exit": done.returncode,
        "scan_stderr": done.stderr.decode(errors="replace")[-2000:],
        "scan_json": None,
    }
    try:
        result["scan_json"] = json.loads(done.stdout.decode("utf-8"))
    except ValueError as error:
        result["scan_stdout_error"] = f"{error}: {done.stdout[:300]!r}"
    socket_path = base / "gdw.sock"
    try:
        daemon = Daemon(host.options(socket_path, config, MOUNTINFO), Path(params["log"]))
    except Exception as error:  # noqa: BLE001 (reported to the test, which fails on it)
        result["daemon_error"] = str(error)
        return result
    with Client(socket_path) as client:
        result["get"] = client.ask({"op": "get"})
        result["path"] = client.ask({"op": "path", "name": "nvidiactl"})
        # A change under that root must still be seen (the watch on a non-UTF-8 path).
        generation = result["get"]["generation"]
        os.unlink(fs_root + b"/dev/nvidia0")
        reply = client.ask({"op": "wait", "after": generation, "timeout": 5})
        result["change_seen"] = bool(reply.get("ok")) and all(
            device["name"] != "nvidia0" for device in reply["map"]["devices"]
        )
    result["daemon_exit"] = daemon.stop()
    return result


SCENARIOS = {"restarts": restarts, "churn": churn, "odd_bytes": odd_bytes}


def main() -> None:
    params = json.loads(sys.stdin.buffer.read())
    try:
        result = SCENARIOS[sys.argv[1]](params)
    finally:
        # A scenario that failed half-way must not leave its daemon running.
        for daemon in Daemon.instances:
            if daemon.alive():
                daemon.kill()
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
