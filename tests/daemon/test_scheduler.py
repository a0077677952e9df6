"""The rescan scheduler alone: a fake clock, a fake scan, no files and no threads.

The fake sleep advances the fake clock at once (and yields), so the tests read the
debounce and the spacing off the clock at which each scan started.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest

from watcher.daemon.scheduler import RescanScheduler

TIMEOUT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Clock:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


@dataclass
class FakeScan:
    """Records (start time, full, rearm); each scan takes `duration` of the fake clock."""

    clock: Clock
    duration: float = 0.0
    calls: list[tuple[float, bool, bool]] = field(default_factory=list)
    gate: anyio.Event | None = None
    fail: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, *, full: bool, rearm: bool) -> None:
        self.calls.append((self.clock.now, full, rearm))
        if self.gate is not None:
            await self.gate.wait()
        self.clock.now += self.duration
        done, self.done = self.done, anyio.Event()
        done.set()
        if self.fail:
            raise RuntimeError("scan failed")

    async def next_done(self) -> None:
        with anyio.fail_after(TIMEOUT):
            await self.done.wait()


@asynccontextmanager
async def running(
    debounce: float = 0.02, duration: float = 0.0
) -> AsyncIterator[tuple[RescanScheduler, FakeScan, Clock]]:
    clock = Clock()
    scan = FakeScan(clock, duration)
    scheduler = RescanScheduler(scan, debounce_s=debounce, clock=clock, sleep=clock.sleep)
    async with anyio.create_task_group() as group:
        await group.start(scheduler.run)
        yield scheduler, scan, clock
        group.cancel_scope.cancel()


async def settle() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_a_burst_of_requests_is_one_scan_after_the_debounce() -> None:
    async with running(debounce=0.02) as (scheduler, scan, clock):
        start = clock.now
        for _ in range(50):
            scheduler.request()
        await scan.next_done()
        await settle()
        assert len(scan.calls) == 1
        started, full, rearm = scan.calls[0]
        assert started == pytest.approx(start + 0.02)
        # Debounced rescans reuse the mount table; the first one arms the watches.
        assert (full, rearm) == (False, True)


@pytest.mark.anyio
async def test_the_debounce_window_is_not_reset_by_later_requests() -> None:
    """A continuous storm must not starve the map of updates."""
    async with running(debounce=0.05) as (scheduler, scan, clock):
        scheduler.request()
        await anyio.lowlevel.checkpoint()
        clock.now += 0.01  # the storm goes on inside the window
        scheduler.request()
        await scan.next_done()
        assert scan.calls[0][0] == pytest.approx(1000.0 + 0.05 + 0.01)


@pytest.mark.anyio
async def test_a_slow_scan_spaces_the_next_by_twice_its_duration() -> None:
    async with running(debounce=0.02, duration=0.1) as (scheduler, scan, clock):
        scheduler.request()
        await scan.next_done()
        first_end = clock.now
        scheduler.request()
        await scan.next_done()
        # debounce (0.02), then the rest of 2 x 0.1 s after the first scan ended.
        assert scan.calls[1][0] == pytest.approx(first_end + 0.2)
        assert clock.sleeps == pytest.approx([0.02, 0.02, 0.18])


@pytest.mark.anyio
async def test_a_fast_scan_is_not_held_back() -> None:
    async with running(debounce=0.02, duration=0.0) as (scheduler, scan, clock):
        for _ in range(3):
            scheduler.request()
            await scan.next_done()
        assert clock.sleeps == pytest.approx([0.02, 0.02, 0.02])


@pytest.mark.anyio
async def test_a_rearm_asked_during_a_scan_goes_to_the_next_scan() -> None:
    async with running() as (scheduler, scan, _):
        scheduler.request()
        await scan.next_done()  # the first scan arms the watches
        scan.gate = anyio.Event()
        scheduler.request()
        with anyio.fail_after(TIMEOUT):
            while len(scan.calls) < 2:
                await anyio.lowlevel.checkpoint()
        # A mount lands while the second scan runs (without a re-arm).
        scheduler.request_rearm()
        scan.gate.set()
        await scan.next_done()
        scan.gate = None
        await scan.next_done()
        assert [rearm for _, _, rearm in scan.calls] == [True, False, True]


@pytest.mark.anyio
async def test_scans_never_overlap_and_now_is_full() -> None:
    async with running() as (scheduler, scan, _):
        scan.gate = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(scheduler.now)
            group.start_soon(scheduler.now)
            await settle()
            assert len(scan.calls) == 1  # the second waits for the first
            scan.gate.set()
        assert [full for _, full, _ in scan.calls] == [True, True]


@pytest.mark.anyio
async def test_a_failing_scan_keeps_the_loop_and_rearms_next_time() -> None:
    async with running() as (scheduler, scan, _):
        scan.fail = True
        scheduler.request_rearm()
        await scan.next_done()
        scan.fail = False
        scheduler.request()
        await scan.next_done()
        assert [rearm for _, _, rearm in scan.calls] == [True, True]


@pytest.mark.anyio
async def test_concurrent_client_rescans_share_one_scan() -> None:
    """100 clients asking at once cost one scan (plus the one already under way)."""
    async with running() as (scheduler, scan, _):
        scan.gate = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(scheduler.now)  # a scan under way when the requests come
            await settle()
            for _ in range(100):
                group.start_soon(scheduler.on_request)
            await settle()
            scan.gate.set()
        assert len(scan.calls) == 2
        assert scan.calls[1][1] is True  # a client's rescan reads everything


@pytest.mark.anyio
async def test_back_to_back_client_rescans_keep_the_spacing() -> None:
    """One client asking in a loop cannot make the daemon scan without pause."""
    async with running(duration=0.1) as (scheduler, scan, clock):
        for _ in range(5):
            await scheduler.on_request()
        starts = [started for started, _, _ in scan.calls]
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        # Each scan takes 0.1 s and the next waits 2 x 0.1 s more: a third of a core at most.
        assert gaps == pytest.approx([0.3] * 4)
        assert clock.sleeps == pytest.approx([0.2] * 4)
