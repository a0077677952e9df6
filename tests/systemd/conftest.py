"""Fixtures of the systemd suite: a simulated host, and a listener for sd_notify datagrams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import Host, NotifyListener, build_host


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return build_host(tmp_path)


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    notify = NotifyListener()
    yield notify
    notify.close()
