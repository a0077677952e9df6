"""Host files planted to stop or exhaust the scan, against the real daemon.

driver-ready is written by a driver container, and /proc stand-ins may be anything: a FIFO
there must not block the scan thread, a link to /dev/zero or a file of hundreds of MB must
not exhaust memory. The daemon runs under an address-space limit, so that a regression ends
in a MemoryError of its own rather than in the machine's OOM killer.

A read that blocks in the kernel whatever the flags (a FUSE mount whose server never answers,
as a hung network filesystem does; made in a private mount namespace the daemon joins, so
nothing else on the machine can trip over it) is the scan watchdog's case: `status` reports
the stuck scan and exits 1, `rescan` answers `busy`, SIGTERM still stops the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import PRIVATE_MOUNTS, REPO

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


def start(base: Path, host: Host, name: str, prefix: Sequence[str] = (), **env: str) -> Daemon:
    config = write_config(base / f"{name}.toml")
    args = host.options(base / f"{name}.sock", config, "/proc/self/mountinfo")
    return Daemon(args, base / f"{name}.log", python=[*prefix, *limited_python()], env=env)


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


# Run in a private mount namespace (the daemon joins it): opens /dev/fuse, and on "mount" on
# stdin mounts a FUSE filesystem served by nobody at argv[1]; exits at EOF on stdin, which
# closes the device and so aborts the connection (a blocked lookup then fails, ENOTCONN).
_HOLDER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from tests.support.host import mount
try:
    fuse = os.open("/dev/fuse", os.O_RDWR)
except OSError as error:
    print("skip: /dev/fuse cannot be opened here (%s)" % error, flush=True)
    sys.exit(0)
print("ready", flush=True)
if sys.stdin.readline().strip() == "mount":
    try:
        mount("gdw-hung", sys.argv[1], "fuse", 0,
              "fd=%d,rootmode=40000,user_id=0,group_id=0" % fuse)
    except OSError as error:
        print("skip: cannot mount a FUSE filesystem here (%s)" % error, flush=True)
        sys.exit(0)
    print("mounted", flush=True)
    sys.stdin.read()
"""


class HungFilesystem:
    """A private mount namespace in which a FUSE filesystem whose server never answers can
    be mounted at `target`: every lookup under it blocks (killably) until `abort()`, as on a
    hung network filesystem. `prefix` runs a command inside that namespace."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._holder = subprocess.Popen(
            [*PRIVATE_MOUNTS, sys.executable, "-c", _HOLDER, str(target), str(REPO)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect("ready")
        self.prefix = ["nsenter", "-t", str(self._holder.pid), "-m", "--"]

    def _expect(self, word: str) -> None:
        assert self._holder.stdout is not None
        ready, _, _ = select.select([self._holder.stdout], [], [], TIMEOUT)
        line = self._holder.stdout.readline().strip() if ready else "(nothing)"
        if line.startswith("skip: "):
            self.close()
            pytest.skip(line.removeprefix("skip: "))
        assert line == word, f"the namespace holder said {line!r}, not {word!r}"

    def mount(self) -> None:
        assert self._holder.stdin is not None
        self._holder.stdin.write("mount\n")
        self._holder.stdin.flush()
        self._expect("mounted")

    def abort(self) -> None:
        """Close the device: the connection aborts and every blocked lookup fails."""
        if self._holder.stdin is not None and not self._holder.stdin.closed:
            self._holder.stdin.close()
        self._holder.wait(TIMEOUT)

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait(TIMEOUT)
        for pipe in (self._holder.stdin, self._holder.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def hung(host: Host, namespaces: None) -> Iterator[HungFilesystem]:
    holder = HungFilesystem(host.proc / f"driver/nvidia/gpus/{BUS_ID}")
    try:
        yield holder
    finally:
        holder.close()


def status_command(socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--socket", socket_path],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_a_stuck_scan_is_reported_and_sigterm_still_stops(
    base: Path, host: Host, hung: HungFilesystem, record: Callable[..., None]
) -> None:
    # The mountinfo judge reads only the mount table: nothing but the scan touches the mount.
    daemon = start(
        base,
        host,
        "stuck",
        hung.prefix,
        GPU_DEVICE_WATCHER_SCAN_DEADLINE="1",
        GPU_DEVICE_WATCHER_MOUNT_EVENTS="mountinfo",
    )
    try:
        assert status_command(daemon.socket).returncode == 0
        # The mount is a mount-table change: the scan it starts blocks on the GPU's
        # information file, inside the hung filesystem.
        hung.mount()
        deadline = time.monotonic() + TIMEOUT
        while (done := status_command(daemon.socket)).returncode == 0:
            assert time.monotonic() < deadline, f"never reported stuck: {done.stdout}"
            time.sleep(0.2)
        assert done.returncode == 1, done
        assert re.search(r"^scan_stuck +True$", done.stdout, re.MULTILINE), done.stdout
        assert done.stderr.startswith("gpu-device-watcher: a scan has been running"), done
        assert "a scan has not finished after 1 s" in daemon.log_text
        started = time.monotonic()
        with Client(daemon.socket) as client:
            reply = client.ask({"op": "rescan"})
        assert reply["error"]["code"] == "busy", reply
        assert time.monotonic() - started < TIMEOUT
        # The last map is still served meanwhile.
        assert daemon.get()["ok"]
        stopped_at = time.monotonic()
        assert daemon.stop() == 0, daemon.log_tail()
        stop_s = time.monotonic() - stopped_at
    finally:
        if daemon.alive():
            daemon.kill()
    assert "Traceback" not in daemon.log_text, daemon.log_tail()
    record("a scan blocked in a hung filesystem (FUSE)", 1, 0, sigterm_to_exit_s=round(stop_s, 2))


def test_a_scan_that_ends_late_clears_the_report(
    base: Path, host: Host, hung: HungFilesystem
) -> None:
    daemon = start(
        base,
        host,
        "late",
        hung.prefix,
        GPU_DEVICE_WATCHER_SCAN_DEADLINE="1",
        GPU_DEVICE_WATCHER_MOUNT_EVENTS="mountinfo",
    )
    try:
        hung.mount()
        deadline = time.monotonic() + TIMEOUT
        while status_command(daemon.socket).returncode == 0:
            assert time.monotonic() < deadline, "never reported stuck"
            time.sleep(0.2)
        # The connection aborts, the blocked lookup fails: the scan ends.
        hung.abort()
        deadline = time.monotonic() + TIMEOUT
        while (done := status_command(daemon.socket)).returncode != 0:
            assert time.monotonic() < deadline, f"still stuck: {done.stdout}"
            time.sleep(0.2)
        assert "the overdue scan finished after" in daemon.log_text
        with Client(daemon.socket) as client:
            assert client.ask({"op": "rescan"})["ok"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
