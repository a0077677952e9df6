"""Host files planted to stop or exhaust the scan, against the real daemon.

driver-ready is written by a driver container, and /proc stand-ins may be anything: a FIFO
there must not block the scan thread, a link to /dev/zero or a file of hundreds of MB must
not exhaust memory. The daemon runs under an address-space limit, so that a regression ends
in a MemoryError of its own rather than in the machine's OOM killer.

A read that blocks in the kernel whatever the flags (a FUSE mount whose server never answers,
as a hung network filesystem does) is the scan watchdog's case: `status` reports the stuck
scan and exits 1, `rescan` answers `busy`, SIGTERM still stops the daemon.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import host as hostfs

from .harness import BUS_ID, TIMEOUT, Client, Daemon, Host, write_config

pytestmark = pytest.mark.reliability

# A daemon reads ~40 MB of interpreter and libraries; 1 GB of address space leaves room for
# threads and never for a /dev/zero read or a 300 MB file decoded to text.
ADDRESS_SPACE = 1 << 30
RSS_BOUND_KIB = 150 * 1024
HUGE = 300 * 1024 * 1024


def limited_python() -> list[str]:
    return ["prlimit", f"--as={ADDRESS_SPACE}", "--", sys.executable, "-m", "watcher"]


def plant(path: Path, kind: str) -> None:
    """Put a FIFO, a link to /dev/zero or a sparse 300 MB file at `path`, in one rename."""
    staged = path.with_name(f".{path.name}.planted")
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    if kind == "fifo":
        os.mkfifo(staged)
    elif kind == "zero":
        staged.symlink_to("/dev/zero")
    else:
        with staged.open("wb") as file:
            file.truncate(HUGE)
    staged.rename(path)


def problems(device_map: dict[str, Any]) -> list[str]:
    return [f"{p['code']}: {p['message']}" for p in device_map["problems"]]


def start(base: Path, host: Host, name: str, **env: str) -> Daemon:
    config = write_config(base / f"{name}.toml")
    args = host.options(base / f"{name}.sock", config, "/proc/self/mountinfo")
    return Daemon(args, base / f"{name}.log", python=limited_python(), env=env)


KINDS = {"fifo": "a FIFO", "zero": "a symlink (not followed)", "huge": "larger than"}


@pytest.fixture
def prlimit() -> None:
    if subprocess.run(["prlimit", "--version"], capture_output=True, check=False).returncode:
        pytest.skip("prlimit(1) not found: cannot bound the daemon's memory for this test")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_driver_ready_planted_while_running(
    base: Path, host: Host, prlimit: None, kind: str, record: Callable[..., None]
) -> None:
    daemon = start(base, host, f"ready-{kind}")
    try:
        before = daemon.get()["map"]
        assert any(d["name"] == "nvidia-uvm" for d in before["devices"]), before
        plant(host.fs("/run/nvidia/validations/driver-ready"), kind)
        # The validations directory is watched: the planted file is read by the next scan.
        warned = daemon.wait_map(
            lambda m: any("driver-ready cannot be read" in p for p in problems(m))
        )
        assert any(KINDS[kind] in p for p in problems(warned)), problems(warned)
        # The map stays live: a node removed now is gone from the map.
        host.fs("/run/nvidia/driver/dev/nvidia-uvm").unlink()
        after = daemon.wait_map(lambda m: all(d["name"] != "nvidia-uvm" for d in m["devices"]))
        assert after["generation"] > warned["generation"]
        with Client(daemon.socket) as client:
            assert client.ask({"op": "rescan"})["ok"]
            status = client.ask({"op": "status"})["status"]
        assert status["scan_stuck"] is False, status
        rss = daemon.rss_kib()
        assert rss < RSS_BOUND_KIB, f"{rss} KiB"
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    record(f"driver-ready planted as {KINDS[kind]} while serving", 1, 0, rss_kib=rss)


# Each /proc stand-in the scan reads, planted as each hostile kind in turn.
PROC_FILES = {
    "fifo": "devices",
    "zero": "driver/nvidia/version",
    "huge": f"driver/nvidia/gpus/{BUS_ID}/information",
}


@pytest.mark.parametrize("kind", sorted(PROC_FILES))
def test_proc_files_planted(
    base: Path, host: Host, prlimit: None, kind: str, record: Callable[..., None]
) -> None:
    relative = PROC_FILES[kind]
    daemon = start(base, host, f"proc-{kind}")
    try:
        before = daemon.get()["map"]
        assert before["driver"]["loaded"] and before["gpus"], before
        plant(host.proc / relative, kind)
        # /proc is not watched (the kernel reports no changes there): a rescan reads it.
        with Client(daemon.socket) as client:
            reply = client.ask({"op": "rescan"})
        assert reply["ok"], reply
        device_map = reply["map"]
        if relative == "devices":
            assert not device_map["driver"]["loaded"]
            assert any(KINDS[kind] in p for p in problems(device_map)), problems(device_map)
        elif relative.endswith("version"):
            assert device_map["driver"]["version"] is None
        else:
            assert device_map["gpus"] == [], device_map["gpus"]
        rss = daemon.rss_kib()
        assert rss < RSS_BOUND_KIB, f"{rss} KiB"
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    record(f"/proc/{relative} planted as {KINDS[kind]}", 1, 0, rss_kib=rss)


# --- a read that blocks whatever the flags: the watchdog ------------------------------------


@contextlib.contextmanager
def unanswered_fuse(target: Path) -> Iterator[None]:
    """A FUSE filesystem at `target` whose server never answers: every lookup under it
    blocks (killably) until the connection is closed, as on a hung network filesystem."""
    try:
        fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        pytest.skip(f"/dev/fuse cannot be opened here ({error}): no blocking filesystem to mount")
    try:
        target.mkdir(parents=True, exist_ok=True)
        try:
            hostfs.mount(
                "gdw-hung",
                target,
                "fuse",
                0,
                f"fd={fuse},rootmode=40000,user_id=0,group_id=0",
            )
        except OSError as error:
            pytest.skip(f"cannot mount a FUSE filesystem here ({error})")
        try:
            yield
        finally:
            hostfs.umount(target)
    finally:
        # Closing the device aborts the connection: a blocked lookup fails with ENOTCONN.
        os.close(fuse)


def status_command(socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--socket", socket_path],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_a_stuck_scan_is_reported_and_sigterm_still_stops(
    base: Path, host: Host, record: Callable[..., None]
) -> None:
    gpu_dir = host.proc / f"driver/nvidia/gpus/{BUS_ID}"
    # The mountinfo judge reads only the mount table: nothing but the scan touches the mount.
    daemon = start(
        base,
        host,
        "stuck",
        GPU_DEVICE_WATCHER_SCAN_DEADLINE="1",
        GPU_DEVICE_WATCHER_MOUNT_EVENTS="mountinfo",
    )
    try:
        assert status_command(daemon.socket).returncode == 0
        with unanswered_fuse(gpu_dir):
            # The mount itself is a mount-table change: the scan it starts blocks on the
            # GPU's information file, inside the hung filesystem.
            deadline = time.monotonic() + TIMEOUT
            while (done := status_command(daemon.socket)).returncode == 0:
                assert time.monotonic() < deadline, f"never reported stuck: {done.stdout}"
                time.sleep(0.2)
            assert done.returncode == 1, done
            assert "scan_stuck" in done.stdout and "True" in done.stdout, done.stdout
            assert done.stderr.startswith("gpu-device-watcher: a scan has been running"), done
            assert "a scan has not finished after 1 s" in daemon.log_text
            started = time.monotonic()
            with Client(daemon.socket) as client:
                reply = client.ask({"op": "rescan"})
            assert reply["error"]["code"] == "busy", reply
            assert time.monotonic() - started < TIMEOUT
            # Still answering the last map meanwhile.
            assert daemon.get()["ok"]
            stopped_at = time.monotonic()
            assert daemon.stop() == 0, daemon.log_tail()
            stop_s = time.monotonic() - stopped_at
    finally:
        if daemon.alive():
            daemon.kill()
    assert "Traceback" not in daemon.log_text, daemon.log_tail()
    record("a scan blocked in a hung filesystem (FUSE)", 1, 0, sigterm_to_exit_s=round(stop_s, 2))


def test_a_scan_that_ends_late_clears_the_report(base: Path, host: Host) -> None:
    gpu_dir = host.proc / f"driver/nvidia/gpus/{BUS_ID}"
    daemon = start(
        base,
        host,
        "late",
        GPU_DEVICE_WATCHER_SCAN_DEADLINE="1",
        GPU_DEVICE_WATCHER_MOUNT_EVENTS="mountinfo",
    )
    try:
        with unanswered_fuse(gpu_dir):
            deadline = time.monotonic() + TIMEOUT
            while status_command(daemon.socket).returncode == 0:
                assert time.monotonic() < deadline, "never reported stuck"
                time.sleep(0.2)
        # The connection aborted (the lookup failed), the mount is gone: the scan ends.
        deadline = time.monotonic() + TIMEOUT
        while (done := status_command(daemon.socket)).returncode != 0:
            assert time.monotonic() < deadline, f"still stuck: {done.stdout}"
            time.sleep(0.2)
        assert "the overdue scan finished after" in daemon.log_text
        with Client(daemon.socket) as client:
            assert client.ask({"op": "rescan"})["ok"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
