"""Kernel events through the real daemon: nodes, mounts, the driver-ready file, overflow.

Each test changes the simulated host inside the daemon's mount namespace and reads what a
subscriber receives. A change must arrive as exactly the next generation with exactly the
expected diff: a missed event fails on a bounded read, a spurious one on the diff.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    DEV_ROOT,
    DRIVER_ROOT,
    NODES,
    UVM_MAJOR,
    VALIDATIONS,
    Daemon,
    Namespace,
    device,
    names,
    problem_codes,
)

pytestmark = pytest.mark.realfs

ALL_NODES = sorted(NODES)


def added(*nodes: str, dev_root: str = DEV_ROOT) -> list[dict[str, str]]:
    return [{"change": "added", "name": n, "path": f"{dev_root}/{n}"} for n in sorted(nodes)]


def removed(*nodes: str, dev_root: str = DEV_ROOT) -> list[dict[str, str]]:
    return [{"change": "removed", "name": n, "path": f"{dev_root}/{n}"} for n in sorted(nodes)]


def test_the_daemon_starts_with_the_operator_layout(daemon: Daemon) -> None:
    reply = daemon.get()
    device_map = reply["map"]
    assert reply["generation"] >= 1
    assert device_map["driver"] == {
        "loaded": True,
        "version": "580.95.05",
        "root": DRIVER_ROOT,
        "dev_root": DEV_ROOT,
        "source": "detected",
        "cuda_checkpoint": None,
    }
    assert names(device_map) == ALL_NODES
    assert all(d["valid"] for d in device_map["devices"])
    control = device(device_map, "nvidiactl")
    assert control is not None
    assert control["mount"]["mount_point"] == DRIVER_ROOT
    assert control["mount"]["fstype"] == "tmpfs"
    assert problem_codes(device_map) == [("not-in-dev", DEV_ROOT)]


def test_node_created_chmodded_and_removed_reach_the_subscriber(
    daemon: Daemon, host: Namespace
) -> None:
    with daemon.subscribe() as subscription:
        assert names(subscription.map) == ALL_NODES

        host.mknod(f"{DEV_ROOT}/nvidia-modeset", 195, 254)
        line = subscription.next()
        assert line["changes"] == added("nvidia-modeset")
        modeset = device(line["map"], "nvidia-modeset")
        assert modeset is not None
        assert (modeset["kind"], modeset["major"], modeset["minor"]) == ("modeset", 195, 254)
        assert modeset["valid"]
        assert modeset["mode"] == "0666"

        host.chmod(f"{DEV_ROOT}/nvidiactl", 0o600)
        line = subscription.next()
        assert line["changes"] == [
            {"change": "changed", "name": "nvidiactl", "path": f"{DEV_ROOT}/nvidiactl"}
        ]
        control = device(line["map"], "nvidiactl")
        assert control is not None
        assert control["mode"] == "0600"

        host.unlink(f"{DEV_ROOT}/nvidia-uvm-tools")
        line = subscription.next()
        assert line["changes"] == removed("nvidia-uvm-tools")
        assert ("missing-node", f"{DEV_ROOT}/nvidia-uvm-tools") in problem_codes(line["map"])

    # The journal reads like sentences, one per change (written before the line was sent).
    daemon.wait_log(rf"nvidia-modeset appeared at {DEV_ROOT}/nvidia-modeset \(195:254\)$")
    daemon.wait_log(rf"nvidiactl changed at {DEV_ROOT}/nvidiactl: mode 0666 -> 0600$")
    daemon.wait_log(rf"nvidia-uvm-tools disappeared from {DEV_ROOT}/nvidia-uvm-tools$")
    daemon.wait_log(r"generation \d+: driver 580\.95\.05, 4 devices in /run/nvidia/driver/dev")


def test_a_wrong_node_is_reported_invalid_and_fixed_live(daemon: Daemon, host: Namespace) -> None:
    with daemon.subscribe() as subscription:
        host.mknod(f"{DEV_ROOT}/nvidia1", 195, 7)
        line = subscription.next()
        assert line["changes"] == added("nvidia1")
        wrong = device(line["map"], "nvidia1")
        assert wrong is not None
        assert not wrong["valid"]
        assert ("wrong-minor", f"{DEV_ROOT}/nvidia1") in problem_codes(line["map"])

        # Replaced in one step, as a tool recreating a node should: one new generation.
        host.mknod(f"{DEV_ROOT}/nvidia1.new", 195, 1)
        host.rename(f"{DEV_ROOT}/nvidia1.new", f"{DEV_ROOT}/nvidia1")
        line = subscription.next()
        fixed = device(line["map"], "nvidia1")
        assert fixed is not None
        assert fixed["valid"]
        assert line["changes"] == [
            {"change": "changed", "name": "nvidia1", "path": f"{DEV_ROOT}/nvidia1"}
        ]
        assert ("wrong-minor", f"{DEV_ROOT}/nvidia1") not in problem_codes(line["map"])
    daemon.wait_log(rf"nvidia1 appeared at {DEV_ROOT}/nvidia1 \(195:7\) \(not valid\)$")


def test_driver_root_replaced_by_a_mount_with_a_new_uvm_major(
    daemon: Daemon, host: Namespace
) -> None:
    """A driver pod restart: its root goes, a new one comes with a new nvidia-uvm major.

    The new root is built aside and moved into place in one step, and /proc/devices is
    rewritten before that: only the mount event can make the daemon look again.
    """
    new_major = UVM_MAJOR + 1
    with daemon.subscribe() as subscription:
        # Not a lazy umount: the daemon must not pin the driver's mount (EBUSY would stop a
        # driver pod from going away).
        host.umount(DRIVER_ROOT, lazy=False)
        line = subscription.next()
        assert line["changes"] == removed(*NODES)
        assert line["map"]["driver"]["dev_root"] is None
        assert ("no-device-root", None) in problem_codes(line["map"])

        host.proc_devices({"nvidia": 195, "nvidia-uvm": new_major})
        stage = host.workdir / "stage"
        host.tmpfs(stage)
        host.populate_dev(
            stage / "dev",
            {**NODES, "nvidia-uvm": (new_major, 0), "nvidia-uvm-tools": (new_major, 1)},
        )
        host.move(stage, DRIVER_ROOT)
        line = subscription.next()
        assert line["changes"] == added(*NODES)
        device_map = line["map"]
        assert device_map["driver"]["dev_root"] == DEV_ROOT
        uvm = device(device_map, "nvidia-uvm")
        tools = device(device_map, "nvidia-uvm-tools")
        assert uvm is not None
        assert tools is not None
        assert (uvm["major"], uvm["minor"], uvm["valid"]) == (new_major, 0, True)
        assert (tools["major"], tools["minor"], tools["valid"]) == (new_major, 1, True)
        assert all(d["valid"] for d in device_map["devices"])
        assert problem_codes(device_map) == [("not-in-dev", DEV_ROOT)]

        # The moved-in mount is watched: a node made in it later is seen.
        host.mknod(f"{DEV_ROOT}/nvidia-modeset", 195, 254)
        assert subscription.next()["changes"] == added("nvidia-modeset")
    daemon.wait_log(rf"nvidia-uvm appeared at {DEV_ROOT}/nvidia-uvm \({new_major}:0\)$")


def test_a_stale_uvm_node_after_a_module_reload_is_found_by_rescan(
    daemon: Daemon, host: Namespace
) -> None:
    """Without the module's uevent (a sandbox without netlink, a reload the kernel did not
    announce), `rescan` is how a caller makes the daemon re-read /proc/devices."""
    host.proc_devices({"nvidia": 195, "nvidia-uvm": UVM_MAJOR + 2})
    before = daemon.request({"op": "status"})["status"]["scans"]
    reply = daemon.request({"op": "rescan"})
    uvm = device(reply["map"], "nvidia-uvm")
    assert uvm is not None
    assert not uvm["valid"]
    assert ("wrong-major", f"{DEV_ROOT}/nvidia-uvm") in problem_codes(reply["map"])
    assert daemon.request({"op": "status"})["status"]["scans"] > before


def test_a_node_made_in_a_fresh_tmpfs_over_the_dev_root_is_seen(
    daemon: Daemon, host: Namespace
) -> None:
    """A watch on a directory is blind once something is mounted over it: it must be re-armed."""
    with daemon.subscribe() as subscription:
        host.tmpfs(DEV_ROOT)
        line = subscription.next()
        assert line["changes"] == removed(*NODES)
        assert line["map"]["driver"]["dev_root"] is None

        host.mknod(f"{DEV_ROOT}/nvidiactl", 195, 255)
        line = subscription.next()
        assert line["changes"] == added("nvidiactl")
        control = device(line["map"], "nvidiactl")
        assert control is not None
        assert control["valid"]
        assert control["mount"]["mount_point"] == DEV_ROOT
        assert line["map"]["driver"]["dev_root"] == DEV_ROOT

        # Unmounted again: the nodes underneath are back, on the driver root's mount.
        host.umount(DEV_ROOT)
        (line,) = subscription.until(lambda m: names(m) == ALL_NODES)
        control = device(line["map"], "nvidiactl")
        assert control is not None
        assert control["mount"]["mount_point"] == DRIVER_ROOT


def test_a_driver_root_mounted_late_and_filled_afterwards_is_seen(
    daemon: Daemon, host: Namespace
) -> None:
    """The driver container starts: an empty mount first, then dev/, then nodes one by one."""
    with daemon.subscribe() as subscription:
        host.umount(DRIVER_ROOT)
        assert subscription.next()["map"]["driver"]["dev_root"] is None
        host.tmpfs(DRIVER_ROOT)
        host.mkdir(DEV_ROOT)
        for name, (major, minor) in NODES.items():
            host.mknod(f"{DEV_ROOT}/{name}", major, minor)
        lines = subscription.until(
            lambda m: names(m) == ALL_NODES and all(d["valid"] for d in m["devices"])
        )
        assert lines[-1]["map"]["driver"]["dev_root"] == DEV_ROOT
        appeared = [c["name"] for line in lines for c in line["changes"]]
        assert sorted(appeared) == ALL_NODES


def test_the_driver_ready_file_makes_the_source_validations(
    daemon: Daemon, host: Namespace
) -> None:
    ready = f"{VALIDATIONS}/driver-ready"
    with daemon.subscribe() as subscription:
        assert subscription.map["driver"]["source"] == "detected"
        # The validations directory does not exist yet: its parent is watched for it.
        host.write(ready, f"IS_HOST_DRIVER=false\nNVIDIA_DRIVER_ROOT={DRIVER_ROOT}\n")
        line = subscription.next()
        assert line["changes"] == []
        assert line["map"]["driver"]["source"] == "validations"
        assert line["map"]["driver"]["dev_root"] == DEV_ROOT

        # driver-ready naming a root without nodes: reported, and the working root kept.
        host.write(ready, "NVIDIA_DRIVER_ROOT=/run/nvidia/elsewhere\n")
        line = subscription.next()
        assert line["map"]["driver"]["dev_root"] == DEV_ROOT
        assert line["map"]["driver"]["source"] == "detected"
        assert ("validations-mismatch", ready) in problem_codes(line["map"])

        host.unlink(ready)
        line = subscription.next()
        assert line["map"]["driver"]["source"] == "detected"
        assert ("validations-mismatch", ready) not in problem_codes(line["map"])


def test_an_inotify_queue_overflow_is_recovered(
    start_daemon: Callable[..., Daemon], host: Namespace
) -> None:
    """More events than the kernel queues. What happens after the overflow is dropped by the
    kernel: here a new nvidia-caps directory, whose watch only the re-arm that IN_Q_OVERFLOW
    triggers can add. A node made in it afterwards proves the recovery."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1_000_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow")
    host.proc_devices({"nvidia": 195, "nvidia-uvm": UVM_MAJOR, "nvidia-caps": 508})
    daemon = start_daemon("--log-level", "debug")
    caps = f"{DEV_ROOT}/nvidia-caps"
    with daemon.subscribe() as subscription:
        # Stopped, the daemon reads nothing: the queue fills and overflows for sure.
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            host.storm("/dev", pairs=limit // 2 + 1000)
            host.mkdir(caps)
            host.mknod(f"{caps}/nvidia-cap1", 508, 1)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        line = subscription.next()
        assert line["changes"] == added("nvidia-caps/nvidia-cap1")
        assert all(d["valid"] for d in line["map"]["devices"])

        host.mknod(f"{caps}/nvidia-cap2", 508, 2)
        assert subscription.next()["changes"] == added("nvidia-caps/nvidia-cap2")
        host.unlink(f"{DEV_ROOT}/nvidia-uvm-tools")
        assert subscription.next()["changes"] == removed("nvidia-uvm-tools")
    daemon.wait_log(r"event: overflow$")
