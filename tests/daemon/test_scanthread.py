"""The scan watchdog in process: a scan that blocks in its thread, against a short deadline."""

from __future__ import annotations

import logging
import threading

import anyio
import pytest

from watcher.daemon.scanthread import DEFAULT_SCAN_DEADLINE_S, ScanRunner, parse_deadline
from watcher.daemon.state import Counters

TIMEOUT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, DEFAULT_SCAN_DEADLINE_S), ("", DEFAULT_SCAN_DEADLINE_S), ("2.5", 2.5)],
)
def test_the_deadline_from_the_environment(text: str | None, expected: float) -> None:
    assert parse_deadline(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "soon", "nan", "inf", "3601"])
def test_a_bad_deadline_names_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="GPU_DEVICE_WATCHER_SCAN_DEADLINE"):
        parse_deadline(text)


@pytest.mark.anyio
async def test_an_overdue_scan_is_reported_until_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    counters = Counters()
    runner = ScanRunner(counters, deadline_s=0.1)
    release = threading.Event()
    overdue_seen = anyio.Event()

    def blocked_scan() -> str:
        release.wait(TIMEOUT)
        return "map"

    async def watch() -> None:
        while not counters.scan_overdue:
            await anyio.sleep(0.01)
        assert counters.scan_started is not None
        overdue_seen.set()
        release.set()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            assert await runner.run(blocked_scan) == "map"
    assert overdue_seen.is_set()
    assert (counters.scan_overdue, counters.scan_started) == (False, None)
    messages = [record.getMessage() for record in caplog.records]
    assert any("has not finished after 0.1 s" in message for message in messages), messages
    assert any("overdue scan finished after" in message for message in messages), messages
    assert all(record.levelno <= logging.ERROR for record in caplog.records)


@pytest.mark.anyio
async def test_cancelling_abandons_a_stuck_scan() -> None:
    counters = Counters()
    runner = ScanRunner(counters, deadline_s=0.05)
    release = threading.Event()
    try:
        with anyio.fail_after(TIMEOUT):
            with anyio.move_on_after(0.3):
                await runner.run(lambda: release.wait(TIMEOUT))
        # Cancelled while the thread is still blocked: the caller goes on, and the thread
        # is a daemon thread that cannot hold the interpreter at exit.
        stuck = [t for t in threading.enumerate() if t.name == "gdw-scan"]
        assert stuck and all(thread.daemon for thread in stuck)
    finally:
        release.set()


@pytest.mark.anyio
async def test_an_exception_in_the_scan_reaches_the_caller() -> None:
    def failing() -> None:
        raise OSError("boom")

    with anyio.fail_after(TIMEOUT), pytest.raises(OSError, match="boom"):
        await ScanRunner(Counters()).run(failing)
