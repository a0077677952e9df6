"""Kernel event sources against the real kernel: inotify, mountinfo polling, tmpfs mounts.

Tests that mount run their body in a fresh interpreter started by
`unshare --mount --propagation private` (`python -m tests.sources.test_watches SCENARIO DIR`).
A child process, rather than unsharing the pytest process or a fork of it, because:

* unsharing pytest itself would move every later test into that namespace;
* `os.fork()` of a pytest process that may hold threads (anyio worker threads from other
  tests) is unsafe and warns on Python 3.12+, which `filterwarnings = error` turns into a
  failure; and `os.unshare` does not exist on 3.11;
* the namespace dies with the child, so its mounts can never leak into the host, even when
  a scenario fails half-way: the parent checks the host mount table afterwards.

Every wait is bounded by `anyio.fail_after`; the only sleeps are short idle windows in
which nothing may be reported.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

import anyio
import pytest
from anyio.abc import TaskStatus

from tests.nsrun import run_scenario_module
from tests.support.processes import namespace_problem
from watcher.sources.inotify import (
    IN_CREATE,
    IN_ISDIR,
    OVERFLOW,
    TreeWatcher,
    describe_mask,
)
from watcher.sources.mounts import MountTableWatcher

NVIDIA_SUBDIRS = ("nvidia-caps", "nvidia-caps-imex-channels")
WAIT_S = 5.0
IDLE_WINDOW_S = 0.3

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of character devices needs root")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """The `on_change` callback: keeps every reason and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._arrived = anyio.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self._arrived.set()
        self._arrived = anyio.Event()

    def clear(self) -> None:
        self.reasons.clear()

    async def wait_for(self, fragment: str, timeout: float = WAIT_S) -> str:
        """The first reason containing `fragment`, waiting at most `timeout` seconds."""
        with anyio.fail_after(timeout):
            while True:
                for reason in self.reasons:
                    if fragment in reason:
                        return reason
                await self._arrived.wait()

    async def wait_for_count(self, count: int, timeout: float = WAIT_S) -> None:
        with anyio.fail_after(timeout):
            while len(self.reasons) < count:
                await self._arrived.wait()

    async def expect_silence(self, seconds: float = IDLE_WINDOW_S) -> None:
        self.clear()
        await anyio.sleep(seconds)
        assert self.reasons == []


class Source(Protocol):
    async def run(
        self, on_change: Callable[[str], None], *, task_status: TaskStatus[None]
    ) -> None: ...


@asynccontextmanager
async def running(source: Source) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    async with anyio.create_task_group() as group:
        await group.start(partial(source.run, recorder))
        yield recorder
        group.cancel_scope.cancel()


def make_node(path: Path, minor: int = 255) -> None:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(195, minor))


# --- TreeWatcher, in the test's own mount namespace --------------------------------------


def test_describe_mask_names_every_bit() -> None:
    assert describe_mask(IN_CREATE | IN_ISDIR) == "IN_CREATE|IN_ISDIR"
    assert describe_mask(0) == "0x0"


@needs_root
@pytest.mark.anyio
async def test_mknod_chmod_unlink_are_each_reported(tmp_path: Path) -> None:
    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([tmp_path])
        async with running(watcher) as changes:
            make_node(tmp_path / "nvidiactl")
            assert await changes.wait_for("IN_CREATE") == f"IN_CREATE {tmp_path}/nvidiactl"

            os.chmod(tmp_path / "nvidiactl", 0o600)
            assert await changes.wait_for("IN_ATTRIB") == f"IN_ATTRIB {tmp_path}/nvidiactl"

            (tmp_path / "nvidiactl").unlink()
            assert await changes.wait_for("IN_DELETE") == f"IN_DELETE {tmp_path}/nvidiactl"


@needs_root
@pytest.mark.anyio
async def test_names_filter_keeps_busy_neighbours_quiet(tmp_path: Path) -> None:
    # On a real /dev every `echo > /dev/null` is an IN_CLOSE_WRITE on the watched directory.
    def nvidia_only(name: str) -> bool:
        return name.startswith("nvidia")

    with TreeWatcher(subdirs=NVIDIA_SUBDIRS, names=nvidia_only) as watcher:
        watcher.set_targets([tmp_path])
        async with running(watcher) as changes:
            (tmp_path / "null").write_text("written and closed")
            (tmp_path / "tty0").mkdir()
            make_node(tmp_path / "nvidiactl")
            assert await changes.wait_for("IN_CREATE") == f"IN_CREATE {tmp_path}/nvidiactl"
            assert changes.reasons == [f"IN_CREATE {tmp_path}/nvidiactl"]


@needs_root
@pytest.mark.anyio
async def test_events_queued_before_run_are_reported(tmp_path: Path) -> None:
    with TreeWatcher() as watcher:
        watcher.set_targets([tmp_path])
        make_node(tmp_path / "nvidia-uvm", 0)
        async with running(watcher) as changes:
            await changes.wait_for(f"IN_CREATE {tmp_path}/nvidia-uvm")


@needs_root
@pytest.mark.anyio
async def test_missing_target_is_awaited_through_its_nearest_ancestor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dev = run / "nvidia" / "driver" / "dev"
    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([dev])
        assert watcher.watched_paths == {str(run)}
        async with running(watcher) as changes:
            # Siblings of the awaited name are noise on a busy /run.
            (run / "unrelated.pid").write_text("1\n")
            await changes.expect_silence()

            for step in (run / "nvidia", run / "nvidia" / "driver", dev):
                changes.clear()
                step.mkdir()
                await changes.wait_for(f"IN_CREATE|IN_ISDIR {step}")
                assert str(step) in watcher.watched_paths

            # Re-armed on its own: nodes in the new dev root are seen at once ...
            make_node(dev / "nvidiactl")
            await changes.wait_for(f"IN_CREATE {dev}/nvidiactl")

            # ... and still after the owner re-arms, as it does after every mount change.
            watcher.set_targets([dev])
            assert watcher.watched_paths == {str(dev)}
            make_node(dev / "nvidia0", 0)
            await changes.wait_for(f"IN_CREATE {dev}/nvidia0")


@needs_root
@pytest.mark.anyio
async def test_tree_created_at_once_is_found_by_the_rearm(tmp_path: Path) -> None:
    dev = tmp_path / "driver" / "dev"
    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([dev])
        async with running(watcher) as changes:
            # Created while the watcher cannot read: no event ever names dev or its node.
            (dev / "nvidia-caps").mkdir(parents=True)
            make_node(dev / "nvidia-caps" / "nvidia-cap1", 1)
            await changes.wait_for(f"IN_CREATE|IN_ISDIR {tmp_path}/driver")
            assert watcher.watched_paths == {str(dev), str(dev / "nvidia-caps")}


@needs_root
@pytest.mark.anyio
async def test_new_caps_directory_gets_a_watch(tmp_path: Path) -> None:
    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([tmp_path])
        async with running(watcher) as changes:
            caps = tmp_path / "nvidia-caps"
            caps.mkdir()
            await changes.wait_for(f"IN_CREATE|IN_ISDIR {caps}")
            assert str(caps) in watcher.watched_paths

            make_node(caps / "nvidia-cap1", 1)
            await changes.wait_for(f"IN_CREATE {caps}/nvidia-cap1")

            channels = tmp_path / "nvidia-caps-imex-channels"
            channels.mkdir()
            make_node(channels / "channel0", 0)
            await changes.wait_for(f"IN_CREATE|IN_ISDIR {channels}")
            chmod_target = channels / "channel0"
            os.chmod(chmod_target, 0o600)
            await changes.wait_for(f"IN_ATTRIB {chmod_target}")


@needs_root
@pytest.mark.anyio
async def test_symlinks_and_other_subdirectories_are_not_followed(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    elsewhere = tmp_path / "elsewhere"
    dev.mkdir()
    elsewhere.mkdir()
    (dev / "pts").mkdir()
    (dev / "nvidia-caps").symlink_to(elsewhere)
    linked_dev = tmp_path / "linked-dev"
    linked_dev.symlink_to(elsewhere)

    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([dev, linked_dev])
        # The symlink target itself is watched (its replacement matters), never its referent.
        assert watcher.watched_paths == {str(dev), str(linked_dev)}
        async with running(watcher) as changes:
            make_node(elsewhere / "nvidia-cap1", 1)
            make_node(dev / "pts" / "0", 0)
            await changes.expect_silence()

            make_node(dev / "nvidiactl")
            await changes.wait_for(f"IN_CREATE {dev}/nvidiactl")


@needs_root
@pytest.mark.anyio
async def test_deleted_and_recreated_target_is_watched_again(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    with TreeWatcher() as watcher:
        watcher.set_targets([dev])
        async with running(watcher) as changes:
            dev.rmdir()
            await changes.wait_for(f"IN_DELETE_SELF {dev}")
            assert watcher.watched_paths == {str(tmp_path)}

            dev.mkdir()
            await changes.wait_for(f"IN_CREATE|IN_ISDIR {dev}")
            make_node(dev / "nvidiactl")
            await changes.wait_for(f"IN_CREATE {dev}/nvidiactl")


@pytest.mark.anyio
async def test_queue_overflow_is_reported_and_the_watcher_recovers(tmp_path: Path) -> None:
    queue_limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if queue_limit > 200_000:
        pytest.skip(f"max_queued_events is {queue_limit}: too large to overflow quickly")
    with TreeWatcher() as watcher:
        watcher.set_targets([tmp_path])
        # Not reading yet: each file gives IN_CREATE and IN_DELETE, distinct names so the
        # kernel cannot merge them.
        for index in range(queue_limit // 2 + 64):
            path = tmp_path / f"f{index}"
            path.touch()
            path.unlink()
        async with running(watcher) as changes:
            await changes.wait_for(OVERFLOW)
            # Everything read in the wake-up that met the overflow is folded into it.
            assert changes.reasons[-1] == OVERFLOW

            changes.clear()
            (tmp_path / "after").touch()
            await changes.wait_for(f"IN_CREATE {tmp_path}/after")


@pytest.mark.anyio
async def test_close_ends_a_waiting_run(tmp_path: Path) -> None:
    watcher = TreeWatcher()
    watcher.set_targets([tmp_path])
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            await group.start(watcher.run, Recorder())
            watcher.close()
    watcher.close()
    with pytest.raises(ValueError, match="closed"):
        watcher.set_targets([tmp_path])


# --- MountTableWatcher on a plain file (no namespace needed) -----------------------------


@pytest.mark.anyio
async def test_plain_file_mount_table_falls_back_to_inotify(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text("22 1 0:21 / / rw - ext4 /dev/root rw\n")
    with MountTableWatcher(table) as watcher:
        assert not watcher.pollable
        async with running(watcher) as changes:
            replacement = tmp_path / "mountinfo.new"
            replacement.write_text("22 1 0:21 / / ro - ext4 /dev/root ro\n")
            replacement.replace(table)
            await changes.wait_for(f"IN_MOVED_TO {table}")


@pytest.mark.anyio
async def test_close_ends_a_waiting_mount_table_run() -> None:
    watcher = MountTableWatcher()
    assert watcher.pollable
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            await group.start(watcher.run, Recorder())
            watcher.close()
    watcher.close()
    with pytest.raises(ValueError, match="closed"):
        await watcher.run(Recorder())


# --- In a private mount namespace ---------------------------------------------------------


@pytest.fixture(scope="module")
def private_mount_namespace() -> None:
    if (problem := namespace_problem(("unshare", "mount", "umount"))) is not None:
        pytest.skip(f"needs root and a private mount namespace with tmpfs mounts: {problem}")


def run_in_private_mount_namespace(scenario: str, scratch: Path) -> None:
    result = run_scenario_module("tests.sources.test_watches", scenario, scratch, timeout=60)
    assert result.returncode == 0, f"scenario {scenario} failed:\n{result.stdout}{result.stderr}"
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text(), "a mount leaked"


@pytest.mark.realfs
def test_mount_remount_umount_each_wake_once_and_idle_never(
    private_mount_namespace: None, tmp_path: Path
) -> None:
    run_in_private_mount_namespace("mount_table_cycle", tmp_path)


@pytest.mark.realfs
def test_mount_before_run_is_reported(private_mount_namespace: None, tmp_path: Path) -> None:
    run_in_private_mount_namespace("mount_before_run", tmp_path)


@pytest.mark.realfs
def test_mount_while_the_callback_runs_is_reported(
    private_mount_namespace: None, tmp_path: Path
) -> None:
    run_in_private_mount_namespace("mount_during_callback", tmp_path)


@pytest.mark.realfs
def test_mount_over_watched_dir_is_blind_until_rearmed(
    private_mount_namespace: None, tmp_path: Path
) -> None:
    run_in_private_mount_namespace("tree_mount_over", tmp_path)


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


def wake_up_pending(watcher: MountTableWatcher) -> bool:
    """Whether the kernel holds a wake-up the watcher has not taken yet: its epoll fd is
    readable exactly then. A fact of the kernel, not of how long anyone waited."""
    epoll = watcher._epoll
    assert epoll is not None, "not a pollable mount table"
    readable, _, _ = select.select([epoll.fileno()], [], [], 0)
    return bool(readable)


async def scenario_mount_table_cycle(scratch: Path) -> None:
    """One report per mount, remount and umount, and none while nothing changes.

    No idle window decides it (an earlier version slept and compared CPU time, which a
    loaded machine can break): the watcher is parked (every task blocked) and its epoll holds
    nothing, so no wake-up can come until the mount table changes again. A watcher that
    spun (an edge-triggered entry left undrained) would keep its epoll readable."""
    target = scratch / "mnt"
    target.mkdir()
    with MountTableWatcher() as watcher:
        async with running(watcher) as changes:
            await anyio.wait_all_tasks_blocked()
            assert not wake_up_pending(watcher)
            assert changes.reasons == []

            for operation in (
                partial(mount, "-t", "tmpfs", "gdw-test", str(target)),
                partial(mount, "-o", "remount,ro", str(target)),
                partial(umount, target),
            ):
                changes.clear()
                # Returns once the kernel has made the change and woken the table's waiters.
                operation()
                await changes.wait_for("mount table changed")
                await anyio.wait_all_tasks_blocked()
                assert not wake_up_pending(watcher), "a second wake-up for one change"
                assert changes.reasons == ["mount table changed (/proc/self/mountinfo)"]


async def scenario_mount_before_run(scratch: Path) -> None:
    with MountTableWatcher() as watcher:
        mount("-t", "tmpfs", "gdw-test", str(scratch))
        async with running(watcher) as changes:
            await changes.wait_for("mount table changed")


async def scenario_mount_during_callback(scratch: Path) -> None:
    # The change lands after the wake-up and before the next wait is registered: the window
    # in which an EPOLLPRI registration lost it (see watcher/sources/mounts.py).
    changes = Recorder()
    mounts_left = ["first", "second"]

    def mount_next_then_record(reason: str) -> None:
        if mounts_left:
            mount("-t", "tmpfs", f"gdw-{mounts_left.pop(0)}", str(scratch))
        changes(reason)

    with MountTableWatcher() as watcher:
        mount_next_then_record("kick-off")
        async with anyio.create_task_group() as group:
            await group.start(watcher.run, mount_next_then_record)
            await changes.wait_for_count(3)
            await anyio.sleep(0.2)
            group.cancel_scope.cancel()
    reason = "mount table changed (/proc/self/mountinfo)"
    assert changes.reasons == ["kick-off", reason, reason]


async def scenario_tree_mount_over(scratch: Path) -> None:
    dev = scratch / "dev"
    dev.mkdir()
    with TreeWatcher(subdirs=NVIDIA_SUBDIRS) as watcher:
        watcher.set_targets([dev])
        async with running(watcher) as changes:
            make_node(dev / "nvidiactl")
            await changes.wait_for(f"IN_CREATE {dev}/nvidiactl")

            # The kernel fact: nothing reports the mount, nor anything inside it.
            mount("-t", "tmpfs", "gdw-test", str(dev))
            make_node(dev / "nvidia0", 0)
            await changes.expect_silence()

            watcher.set_targets([dev])
            make_node(dev / "nvidia1", 1)
            await changes.wait_for(f"IN_CREATE {dev}/nvidia1")

            # An umount is reported, and the covered directory is watched again unasked.
            changes.clear()
            umount(dev)
            await changes.wait_for(f"IN_UNMOUNT|IN_ISDIR {dev}")
            make_node(dev / "nvidia2", 2)
            await changes.wait_for(f"IN_CREATE {dev}/nvidia2")


SCENARIOS: dict[str, Callable[[Path], Awaitable[None]]] = {
    "mount_table_cycle": scenario_mount_table_cycle,
    "mount_before_run": scenario_mount_before_run,
    "mount_during_callback": scenario_mount_during_callback,
    "tree_mount_over": scenario_tree_mount_over,
}

if __name__ == "__main__":
    name, scratch_dir = sys.argv[1:]
    anyio.run(SCENARIOS[name], Path(scratch_dir))
