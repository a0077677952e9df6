"""The simulated GPU Operator node for every doctor test (see simnode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.doctor.simnode import SimNode, build


@pytest.fixture(scope="session")
def action_bytes() -> bytes:
    from watcher.criu import actionfile

    return actionfile.build().data


@pytest.fixture
def node(tmp_path: Path, action_bytes: bytes) -> SimNode:
    if os.geteuid() != 0:
        pytest.skip("the simulated node needs root: mknod of its device nodes, root-owned tools")
    return build(tmp_path, action_bytes)
