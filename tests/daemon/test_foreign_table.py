"""The container deployment: another process's mount table, the files under --root.

A DaemonSet pod runs `serve --root /host --mountinfo /proc/1/mountinfo` with the host's PID
namespace: init's table lists host paths, the files are reached under `/host`. Built here for
real: a "host" process chrooted into the simulated host's root R shows, in its
`/proc/PID/mountinfo`, R's mounts relative to R (host paths), and the daemon is given
`--root R --mountinfo /proc/PID/mountinfo`. Mounts and `nodev` remounts are made on the
"host" side; the map must attribute nodes to the host's mounts and catch the remount.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from watcher.config import foreign_mount_table

from .harness import DEV_ROOT, DRIVER_ROOT, NODES, TIMEOUT, Daemon, Namespace, device, names
from .harness import problem_codes as codes

pytestmark = pytest.mark.realfs

# Chroots into argv[1], says so, then holds still until its stdin closes.
_CHROOTED = (
    "import os, sys; os.chroot(sys.argv[1]); os.chdir('/'); print('in', flush=True); "
    "sys.stdin.read()"
)


@pytest.fixture
def chrooted(host: Namespace) -> Iterator[int]:
    """The pid of a process in the namespace whose root is the simulated host's root."""
    process = subprocess.Popen(
        [
            *("nsenter", "-t", str(host.pid), "-m", "--"),
            *(sys.executable, "-I", "-c", _CHROOTED, str(host.root)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    # A bounded wait for its one line: a reader thread, joined with a timeout.
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(TIMEOUT)
    try:
        assert line == [b"in\n"], f"the chrooted process did not start: {line}"
        yield process.pid
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(TIMEOUT)
        process.stdout.close()
        assert process.stderr is not None
        process.stderr.close()


def _remount(host: Namespace, options: str, path: str) -> None:
    subprocess.run(
        ["nsenter", "-t", str(host.pid), "-m", "--", "mount", "-o", options, host.fs(path)],
        check=True,
        timeout=30,
    )


def test_which_tables_are_another_process_s(namespaces_available: None, tmp_path: Path) -> None:
    assert not foreign_mount_table("/proc/self/mountinfo")
    assert not foreign_mount_table("/proc/thread-self/mountinfo")
    assert not foreign_mount_table(f"/proc/{os.getpid()}/mountinfo")
    assert not foreign_mount_table(
        f"/proc/{os.getpid()}/task/{threading.get_native_id()}/mountinfo"
    )
    # A plain file, and one laid out like procfs but not procfs.
    fixture = tmp_path / "proc" / "1" / "mountinfo"
    fixture.parent.mkdir(parents=True)
    fixture.write_text("")
    assert not foreign_mount_table(str(fixture))
    assert not foreign_mount_table(str(tmp_path / "mountinfo"))
    # A container without hostPID: the daemon is pid 1 there, and /proc/1 is itself.
    as_init = subprocess.run(
        [
            *("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"),
            "import os; from watcher.config import foreign_mount_table as f; "
            "print(os.getpid(), f('/proc/1/mountinfo'))",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert as_init.stdout.split() == ["1", "False"]
    with subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE) as other:
        try:
            assert foreign_mount_table(f"/proc/{other.pid}/mountinfo")
        finally:
            assert other.stdin is not None
            other.stdin.close()
            other.wait(TIMEOUT)


@pytest.mark.parametrize("mode", ["auto", "fanotify"])
def test_another_process_s_table_names_host_paths(
    host: Namespace,
    chrooted: int,
    start_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    # fanotify's statmount names mount points from our root, not the table's: never used.
    monkeypatch.setenv("GPU_DEVICE_WATCHER_MOUNT_EVENTS", mode)
    table = f"/proc/{chrooted}/mountinfo"
    # The premise: that table lists the driver root as a host path, not under R.
    points = [line.split(" ")[4] for line in Path(table).read_text().splitlines()]
    assert DRIVER_ROOT in points, points
    assert not any(point.startswith(str(host.root)) for point in points), points

    daemon = start_daemon("--mountinfo", table)
    daemon.wait_log(r"is another process's mount table")
    assert "fanotify mount events;" not in daemon.log_text
    device_map = daemon.get()["map"]
    assert names(device_map) == sorted(NODES)
    control = device(device_map, "nvidiactl")
    assert control is not None
    assert control["path"] == f"{DEV_ROOT}/nvidiactl"
    assert control["mount"]["mount_point"] == DRIVER_ROOT
    assert control["mount"]["fstype"] == "tmpfs"
    assert control["valid"]

    # A nodev remount of the driver root, made on the host side, is caught...
    _remount(host, "remount,nodev", DRIVER_ROOT)
    device_map = daemon.wait_map(lambda m: not any(d["valid"] for d in m["devices"]))
    control = device(device_map, "nvidiactl")
    assert control is not None
    assert control["mount"]["nodev"]
    assert ("nodev-mount", f"{DEV_ROOT}/nvidiactl") in codes(device_map)
    # ...and so is its undoing.
    _remount(host, "remount,dev", DRIVER_ROOT)
    daemon.wait_map(lambda m: all(d["valid"] for d in m["devices"]))

    # A new mount on the dev root itself: the nodes now sit on it, by its host path.
    host.tmpfs(DEV_ROOT)
    _remount(host, "remount,nodev", DEV_ROOT)
    for name, (major, minor) in NODES.items():
        host.mknod(f"{DEV_ROOT}/{name}", major, minor)
    device_map = daemon.wait_map(
        lambda m: (
            (d := device(m, "nvidiactl")) is not None and d["mount"]["mount_point"] == DEV_ROOT
        )
    )
    control = device(device_map, "nvidiactl")
    assert control is not None
    assert control["mount"]["nodev"]
    assert not control["valid"]

    # The one-shot scan reads the same table the same way.
    scanned = subprocess.run(
        [
            *("nsenter", "-t", str(host.pid), "-m", "--"),
            *(sys.executable, "-m", "watcher", "scan", "--format", "json"),
            *("--root", str(host.root), "--proc", str(host.proc), "--mountinfo", table),
            *("--config", str(host.base / "config.toml")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    control = device(json.loads(scanned.stdout), "nvidiactl")
    assert control is not None
    assert control["mount"]["mount_point"] == DEV_ROOT
    assert control["mount"]["nodev"]
    # Through every change the mount-table path judged them: fanotify never engaged.
    assert "fanotify mount events;" not in daemon.log_text
