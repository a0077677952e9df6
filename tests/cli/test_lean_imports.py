"""The fast paths for mount changes, and the fallback beside them, both checked for results.

- `watcher.sources.fanotify`: fanotify mount events + statmount decide which mount changes
  can move the map (Linux 6.15+); tested against the real kernel in a private namespace.
- `watcher.probe.MountCache`: rescans reuse the filtered mount table until a relevant
  mount change invalidates it.
- The daemon in both modes (`GPU_DEVICE_WATCHER_MOUNT_EVENTS=auto`, and `mountinfo`, the
  fallback that every kernel has): relevant mounts, remounts and a storm of irrelevant
  mounts give the same maps; with fanotify the storm costs no rescans.

Scenarios that mount run in a fresh interpreter under `unshare --mount` (see
tests/sources/test_watches.py for why):
`python -m tests.cli.test_lean_imports SCENARIO DIR`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from tests.daemon.harness import (
    DEV_ROOT,
    DRIVER_ROOT,
    NODES,
    Daemon,
    Namespace,
    device,
    mounts_under,
    names,
    operator_namespace,
    problem_codes,
    scratch_base,
)
from tests.nsrun import run_scenario_module
from watcher.core.mountinfo import PathFilter, parse_mountinfo
from watcher.core.snapshot import HostView, ScanPaths
from watcher.daemon.scanning import mount_filter
from watcher.probe import MountCache, read_host
from watcher.sources.fanotify import (
    FAN_MNT_ATTACH,
    FAN_MNT_DETACH,
    MountEvent,
    MountEvents,
    MountEventsUnavailable,
    parse_events,
    same_mount_namespace,
    unsuitable,
)

REPO = Path(__file__).resolve().parents[2]
MODE_ENV = "GPU_DEVICE_WATCHER_MOUNT_EVENTS"
WAIT_S = 10.0


# --- pure: event decoding, the path filter, the mount cache ---------------------------------


def _event(mask: int, *mount_ids: int) -> bytes:
    records = b"".join(struct.pack("=BBHIQ", 7, 0, 16, 0, mount_id) for mount_id in mount_ids)
    return struct.pack("=IBBHQii", 24 + len(records), 3, 0, 24, mask, -1, 1) + records


def test_parse_events_reads_attach_detach_and_move() -> None:
    data = (
        _event(FAN_MNT_ATTACH, 1 << 31 | 5)
        + _event(FAN_MNT_DETACH, 1 << 31 | 6)
        + _event(FAN_MNT_ATTACH | FAN_MNT_DETACH, 1 << 31 | 7)
    )
    events, overflow = parse_events(data)
    assert events == [
        MountEvent(FAN_MNT_ATTACH, 1 << 31 | 5),
        MountEvent(FAN_MNT_DETACH, 1 << 31 | 6),
        MountEvent(FAN_MNT_ATTACH | FAN_MNT_DETACH, 1 << 31 | 7),
    ]
    assert not overflow


def test_parse_events_flags_overflow_and_survives_garbage() -> None:
    overflow_event = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x4000, -1, 0)
    events, overflow = parse_events(overflow_event + _event(FAN_MNT_ATTACH, 9))
    assert overflow
    assert events == [MountEvent(FAN_MNT_ATTACH, 9)]
    # A length that runs past the buffer or below the header ends decoding, never loops.
    for garbage in (b"\xff" * 30, struct.pack("=IBBHQii", 3, 3, 0, 24, 0, -1, 0), b"", b"\0"):
        assert parse_events(garbage)[0] == []
    # An info record of another type (a file handle) is skipped.
    other = struct.pack("=BBHIQ", 1, 0, 16, 0, 42)
    mixed = struct.pack("=IBBHQii", 24 + 32, 3, 0, 24, FAN_MNT_ATTACH, -1, 1) + other
    mixed += struct.pack("=BBHIQ", 7, 0, 16, 0, 43)
    assert parse_events(mixed)[0] == [MountEvent(FAN_MNT_ATTACH, 43)]


def test_path_filter_covers_plain_paths_and_wants_escaped_ones() -> None:
    relevant = PathFilter(["/run/nvidia/driver/dev", "/a b"])
    for path in ("/", "/run", "/run/nvidia/driver", "/run/nvidia/driver/dev/x", "/a b/c"):
        assert relevant.covers(path), path
    for path in ("/run/other", "/tmp", "/run/nvidia/driver/devx", "/a"):
        assert not relevant.covers(path), path
    assert relevant.wants("/a\\040b/c")
    # statmount gives plain paths: a backslash there is a backslash, never an escape.
    assert not relevant.covers("/a\\040b/c")


def test_path_filter_ancestors_of_keeps_a_driver_root_but_not_its_other_mounts() -> None:
    relevant = PathFilter(["/run/nvidia/driver/dev"], ancestors_of=["/run/nvidia/driver", "/"])
    for path in ("/", "/run", "/run/nvidia/driver", "/run/nvidia/driver/dev/shm"):
        assert relevant.covers(path), path
    for path in ("/run/nvidia/driver/proc", "/run/nvidia/driver/etc/hosts", "/tmp"):
        assert not relevant.covers(path), path
    assert relevant.key != PathFilter(["/run/nvidia/driver/dev"]).key


def test_the_daemon_judges_mounts_against_every_path_a_scan_reads() -> None:
    view = HostView(root="/host", proc="/host/proc", validations_dir="/run/nvidia/validations")
    paths = ScanPaths(
        ("/run/nvidia/driver/dev", "/dev"), ("/run/nvidia/driver", "/"), view.validations_dir
    )
    relevant = mount_filter(view, paths)
    for path in (
        "/host/run/nvidia/driver/dev/nvidia-caps",  # in a dev root
        "/host/dev",  # /dev, always listed
        "/host/run/nvidia/validations",  # driver-ready
        "/host/proc/driver/nvidia",  # what a scan reads from proc
        "/host/run/nvidia/driver",  # a driver root itself
        "/host",
        "/",
    ):
        assert relevant.covers(path), path
    for path in ("/host/run/nvidia/driver/usr/lib", "/host/var/lib/kubelet/pods/x", "/run"):
        assert not relevant.covers(path), path


def test_same_mount_namespace() -> None:
    assert same_mount_namespace("/proc/self/mountinfo")
    assert same_mount_namespace(f"/proc/{os.getpid()}/mountinfo")
    assert not same_mount_namespace("/tmp/mountinfo")
    assert not same_mount_namespace("/proc/self/mounts")
    with pytest.raises(MountEventsUnavailable, match="not this process"):
        MountEvents.open("/nonexistent/mountinfo", PathFilter(["/dev"]))


@pytest.mark.parametrize(
    ("cap_eff", "seccomp", "why"),
    [
        ("000001ffffffffff", "0", None),
        ("000001ffffdfffff", "0", "need CAP_SYS_ADMIN"),  # bit 21 cleared
        ("0000000000000000", "2", "need CAP_SYS_ADMIN"),
        ("000001ffffffffff", "2", "seccomp filter"),
    ],
)
def test_auto_tries_fanotify_only_where_it_can_work(
    tmp_path: Path, cap_eff: str, seccomp: str, why: str | None
) -> None:
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython3\nCapEff:\t{cap_eff}\nSeccomp:\t{seccomp}\n")
    found = unsuitable(str(status))
    assert (found is None) if why is None else (found is not None and why in found), found
    assert unsuitable(str(tmp_path / "missing")) is not None


def _line(mount_id: int, mount_point: str, options: str = "rw") -> str:
    return f"{mount_id} 1 0:{mount_id} / {mount_point} {options} - tmpfs tmpfs rw"


def test_mount_cache_reuses_the_table_until_invalidated(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    table.write_text(_line(1, "/") + "\n" + _line(2, str(root / "dev")) + "\n")
    view = HostView(root=str(root), proc=str(tmp_path / "proc"), mountinfo=str(table))
    cache = MountCache()

    first = read_host(view, mount_cache=cache)
    assert [entry.id for entry in first.mounts.entries] == [1, 2]
    table.write_text(_line(1, "/") + "\n" + _line(3, str(root / "dev"), "rw,nodev") + "\n")
    assert read_host(view, mount_cache=cache).mounts is first.mounts
    # Without the cache (and after invalidate) the table is read again.
    assert [entry.id for entry in read_host(view).mounts.entries] == [1, 3]
    cache.invalidate()
    again = read_host(view, mount_cache=cache)
    assert [entry.id for entry in again.mounts.entries] == [1, 3]
    assert read_host(view, mount_cache=cache).mounts is again.mounts


def test_mount_cache_is_keyed_by_the_paths_and_never_keeps_a_table_read_during_a_change(
    tmp_path: Path,
) -> None:
    cache = MountCache()
    relevant = parse_mountinfo(_line(1, "/"), PathFilter(["/dev"]))
    key = ("/proc/self/mountinfo", ("/dev",))
    epoch = cache.epoch
    cache.invalidate()  # a change reported while that table was being read
    cache.store(key, relevant, epoch)
    assert cache.lookup(key) is None
    cache.store(key, relevant, cache.epoch)
    assert cache.lookup(key) is relevant
    assert cache.lookup(("/proc/self/mountinfo", ("/dev", "/x/dev"))) is None
    assert cache.lookup(("/other/mountinfo", ("/dev",))) is None


# --- MountEvents against the kernel, in a private mount namespace ---------------------------


@functools.cache
def _kernel_has_mount_events() -> str | None:
    """None when fanotify mount events work here, else why not (probed in a namespace)."""
    probe = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", sys.executable, "-c"),
            "from watcher.core.mountinfo import PathFilter as P;"
            "from watcher.sources.fanotify import MountEvents as M;"
            "M.open('/proc/self/mountinfo', P(['/dev'])).close()",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return None if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def mount_events_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: fanotify mount marks and mounts in a private namespace")
    why = _kernel_has_mount_events()
    if why is not None:
        pytest.skip(f"no fanotify mount events on this kernel ({why}); the fallback is tested")


def run_scenario(name: str, scratch: Path) -> None:
    result = run_scenario_module("tests.cli.test_lean_imports", name, scratch, timeout=120)
    assert result.returncode == 0, f"scenario {name} failed:\n{result.stdout}{result.stderr}"
    assert mounts_under(scratch) == [], "a mount leaked"


@pytest.mark.realfs
def test_mount_events_judge_attach_detach_move_and_remount(
    mount_events_kernel: None, tmp_path: Path
) -> None:
    run_scenario("judge", tmp_path)


@pytest.mark.realfs
def test_mount_events_recover_from_a_queue_overflow(
    mount_events_kernel: None, tmp_path: Path
) -> None:
    run_scenario("overflow", tmp_path)


@pytest.mark.realfs
def test_mount_events_follow_new_paths_and_report_while_running(
    mount_events_kernel: None, tmp_path: Path
) -> None:
    run_scenario("running", tmp_path)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, timeout=30)


def _umount(*args: str) -> None:
    subprocess.run(["umount", *args], check=True, timeout=30)


def _elsewhere_is_irrelevant(events: MountEvents, other: Path) -> None:
    """Mounted, remounted, unmounted elsewhere: no reason, no recheck hit."""
    _mount("-t", "tmpfs", "gdw-other", str(other))
    assert events.drain() == []
    _mount("-o", "remount,nodev", str(other))
    assert events.recheck() is None
    _umount(str(other))
    assert events.drain() == []


def _over_the_dev_root(events: MountEvents, dev: Path) -> None:
    """Attached over the dev root, remounted (no fanotify event), detached."""
    _mount("-t", "tmpfs", "gdw-dev", str(dev))
    assert events.drain() == [f"mount attached on {dev}"]
    assert events.recheck() is None
    _mount("-o", "remount,nodev", str(dev))
    assert events.drain() == []
    assert events.recheck() == f"mount on {dev} changed (remount or move)"
    assert events.recheck() is None
    _umount(str(dev))
    assert events.drain() == [f"mount detached from {dev}"]


def _a_driver_root_by_itself(events: MountEvents, scratch: Path, dev: Path) -> None:
    """A driver root counts by itself and its ancestors, not by what is mounted below it."""
    driver = scratch / "root"
    (driver / "usr").mkdir()
    events.set_filter(PathFilter([str(dev)], ancestors_of=[str(driver)]))
    _mount("-t", "tmpfs", "gdw-usr", str(driver / "usr"))
    assert events.drain() == []
    _mount("-t", "tmpfs", "gdw-driver", str(driver))
    assert events.drain() == [f"mount attached on {driver}"]
    _umount(str(driver))
    assert events.drain() == [f"mount detached from {driver}"]
    _umount(str(driver / "usr"))
    assert events.drain() == []


async def scenario_judge(scratch: Path) -> None:
    _mount("-t", "tmpfs", "gdw-scratch", str(scratch))
    dev = scratch / "root/dev"
    other = scratch / "elsewhere"
    dev.mkdir(parents=True)
    other.mkdir()
    with MountEvents.open("/proc/self/mountinfo", PathFilter([str(dev)])) as events:
        # Known from the listing: the root and the scratch tmpfs are ancestors of dev.
        assert set(events.relevant.values()) >= {"/", str(scratch)}
        assert events.drain() == []

        _elsewhere_is_irrelevant(events, other)

        _over_the_dev_root(events, dev)

        # Below the dev root, and moved in from elsewhere (one event, both bits).
        (dev / "nvidia-caps").mkdir()
        _mount("-t", "tmpfs", "gdw-caps", str(dev / "nvidia-caps"))
        assert events.drain() == [f"mount attached on {dev}/nvidia-caps"]
        _mount("-t", "tmpfs", "gdw-stage", str(other))
        assert events.drain() == []
        _mount("--move", str(other), str(dev))
        assert events.drain() == [f"mount moved from {other} to {dev}"]
        # ... and out again: the mount point it left is what makes it relevant.
        _mount("--move", str(dev), str(other))
        assert events.drain() == [f"mount moved from {dev} to {other}"]
        _umount(str(other))
        assert events.drain() == []

        # A lazy unmount of a whole tree: every relevant mount in it is reported.
        _umount("-l", str(dev / "nvidia-caps"))
        assert events.drain() == [f"mount detached from {dev}/nvidia-caps"]

        # A mount attached and gone before it was read: nothing remains, nothing reported.
        _mount("-t", "tmpfs", "gdw-blink", str(other))
        _umount(str(other))
        assert events.drain() == []
        # An ancestor remounted: a relevant change as well.
        _mount("-o", "remount,noexec", str(scratch))
        assert events.recheck() == f"mount on {scratch} changed (remount or move)"

        _a_driver_root_by_itself(events, scratch, dev)
    _umount("-l", str(scratch))


async def scenario_running(scratch: Path) -> None:
    _mount("-t", "tmpfs", "gdw-scratch", str(scratch))
    first, second = scratch / "a/dev", scratch / "b/dev"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    reasons: list[str] = []
    arrived = anyio.Event()

    def record(reason: str) -> None:
        reasons.append(reason)
        arrived.set()

    with MountEvents.open("/proc/self/mountinfo", PathFilter([str(first)])) as events:
        _mount("-t", "tmpfs", "gdw-b", str(second))  # not relevant yet
        async with anyio.create_task_group() as group:
            await group.start(events.run, record)
            # An idle run reports nothing, and 100 irrelevant mounts nothing either.
            for index in range(50):
                target = scratch / f"churn{index}"
                target.mkdir()
                _mount("-t", "tmpfs", "gdw-churn", str(target))
                _umount(str(target))
            await anyio.sleep(0.3)
            assert reasons == []

            _mount("-t", "tmpfs", "gdw-a", str(first))
            with anyio.fail_after(WAIT_S):
                await arrived.wait()
            assert reasons == [f"mount attached on {first}"]

            # The dev root moved to b: b's existing mount is relevant from now on.
            events.set_filter(PathFilter([str(second)]))
            assert str(second) in events.relevant.values()
            assert str(first) not in events.relevant.values()
            reasons.clear()
            arrived = anyio.Event()
            _umount(str(first))
            _mount("-o", "remount,nodev", str(second))
            assert events.recheck() == f"mount on {second} changed (remount or move)"
            _umount(str(second))
            with anyio.fail_after(WAIT_S):
                await arrived.wait()
            assert reasons == [f"mount detached from {second}"]
            group.cancel_scope.cancel()
        # Closed while running: run() returns.
        async with anyio.create_task_group() as group:
            await group.start(events.run, record)
            events.close()
    _umount("-l", str(scratch))


async def scenario_overflow(scratch: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _mount("-t", "tmpfs", "gdw-scratch", str(scratch))
    dev, churn = scratch / "dev", scratch / "churn"
    dev.mkdir()
    churn.mkdir()
    with MountEvents.open("/proc/self/mountinfo", PathFilter([str(dev)])) as events:
        relevant = events.relevant
        # More events than the queue holds (16,384): the kernel drops the rest and says so.
        for _ in range(8_500):
            assert libc.mount(b"gdw", bytes(churn), b"tmpfs", 0, None) == 0, ctypes.get_errno()
            assert libc.umount2(bytes(churn), 0) == 0, ctypes.get_errno()
        _mount("-t", "tmpfs", "gdw-dev", str(dev))  # lost in the overflow: found by the resync
        assert events.drain() == ["fanotify queue overflow"]
        assert set(events.relevant.values()) == {*relevant.values(), str(dev)}
        assert events.drain() == []
        _umount(str(dev))
        assert events.drain() == [f"mount detached from {dev}"]
    _umount("-l", str(scratch))


SCENARIOS: dict[str, Callable[[Path], Awaitable[None]]] = {
    "judge": scenario_judge,
    "running": scenario_running,
    "overflow": scenario_overflow,
}


# --- the daemon in both modes ---------------------------------------------------------------


@pytest.fixture(params=["auto", "fanotify", "mountinfo"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The harness hands the daemon this process's environment.
    monkeypatch.setenv(MODE_ENV, request.param)
    yield request.param


@pytest.fixture
def started(mode: str, start_daemon: Callable[..., Daemon], host: Namespace) -> Daemon:
    """A daemon past its switch to fanotify mount events (where the kernel has them)."""
    daemon = start_daemon()
    line = daemon.wait_log(r"mount changes: ")
    if mode == "mountinfo":
        assert line.endswith(f"every mountinfo wake-up rescans ({MODE_ENV}=mountinfo)"), line
    elif mode == "fanotify":
        if _kernel_has_mount_events() is None:
            assert "fanotify mount events;" in line, line
    else:
        # auto: nothing is listed until mounts change; the first change makes the switch.
        assert line.endswith("fanotify mount events from the first mount change"), line
        if _kernel_has_mount_events() is None:
            host.tmpfs(host.workdir / "first")
            daemon.wait_log(r"mount changes: fanotify mount events;")
            host.umount(host.workdir / "first", lazy=False)
    # Whatever the switch or those mounts caused is over before the test looks.
    daemon.request({"op": "rescan"})
    return daemon


def _remount(host: Namespace, options: str, path: str) -> None:
    subprocess.run(
        ["nsenter", "-t", str(host.pid), "-m", "--", "mount", "-o", options, host.fs(path)],
        check=True,
        timeout=30,
    )


@pytest.mark.realfs
def test_relevant_mounts_and_remounts_reach_the_map(started: Daemon, host: Namespace) -> None:
    daemon = started
    with daemon.subscribe() as subscription:
        # A remount gives no fanotify event: only the mountinfo wake-up can reveal it.
        _remount(host, "remount,nodev", DRIVER_ROOT)
        line = subscription.until(lambda m: not any(d["valid"] for d in m["devices"]))[-1]
        control = device(line["map"], "nvidiactl")
        assert control is not None
        assert control["mount"]["nodev"]
        assert ("nodev-mount", f"{DEV_ROOT}/nvidiactl") in problem_codes(line["map"])
        _remount(host, "remount,dev", DRIVER_ROOT)
        subscription.until(lambda m: all(d["valid"] for d in m["devices"]))

        host.tmpfs(DEV_ROOT)
        assert subscription.next()["map"]["driver"]["dev_root"] is None
        host.umount(DEV_ROOT)
        subscription.until(lambda m: names(m) == sorted(NODES))


@pytest.mark.realfs
def test_a_storm_of_irrelevant_mounts_leaves_the_map_right(
    mode: str, started: Daemon, host: Namespace
) -> None:
    daemon = started
    churn = host.workdir / "churn"
    host.mkdir(churn)
    scans_before = daemon.request({"op": "status"})["status"]["scans"]
    with daemon.subscribe() as subscription:
        started_at = time.monotonic()
        for index in range(150):
            target = churn / f"m{index % 10}"
            host.tmpfs(target)
            host.umount(target, lazy=False)
            if index == 75:
                # One relevant change in the middle of it, seen in time.
                host.mknod(f"{DEV_ROOT}/nvidia-modeset", 195, 254)
        subscription.until(lambda m: "nvidia-modeset" in names(m))
        assert time.monotonic() - started_at < 30
    # No change line was spurious, and the map equals a fresh full scan.
    live = daemon.get()["map"]
    fresh = daemon.request({"op": "rescan"})["map"]
    assert live["generation"] == fresh["generation"]
    assert {k: v for k, v in live.items() if k != "updated"} == {
        k: v for k, v in fresh.items() if k != "updated"
    }
    scans = daemon.request({"op": "status"})["status"]["scans"] - scans_before
    if mode != "mountinfo" and _kernel_has_mount_events() is None:
        # The mknod, and the `rescan` just asked for: the 300 mount changes cost none.
        assert scans <= 3, scans
    assert "Traceback" not in daemon.log_text


@pytest.fixture
def start_daemon(host: Namespace, base: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start() -> Daemon:
        daemon = Daemon(host, base / "gdw.sock", config=base / "config.toml")
        started.append(daemon)
        daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.close()


@pytest.fixture
def host(base: Path) -> Iterator[Namespace]:
    with operator_namespace(base) as namespace:
        yield namespace


@pytest.fixture
def base() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: private mount namespaces, tmpfs, mknod")
    with scratch_base("gdw-p-") as directory:
        yield directory


if __name__ == "__main__":
    scenario, scratch_dir = sys.argv[1:]
    anyio.run(SCENARIOS[scenario], Path(scratch_dir))
