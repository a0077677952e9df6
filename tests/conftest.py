"""Options for the whole test tree (pytest reads `pytest_addoption` only from the top conftest)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability", "fault, soak and abuse tests (tests/reliability)")
    group.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="long runs: multiply the reliability suite's counts by --soak-factor",
    )
    group.addoption(
        "--soak-factor",
        type=int,
        default=10,
        metavar="N",
        help="how much --soak multiplies the counts by (default 10)",
    )
