"""End to end with a real CRIU (Debian trixie's 4.1.1, see fetch_criu.sh): dump and restore a
small process tree with `--action-script gpu-device-watcher-criu-action`, the daemon serving a
simulated host whose nvidia5 carries the numbers of this machine's /dev/zero.

The tree is `sh` (session leader, no terminal) with a child `sleep` holding /dev/zero on fd 3.
Every CRIU run is bounded; whatever runs under the tree's pids is killed at teardown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import ACTION, Criu, Tree, alive
from .simhost import SimHost
from .test_restore_check import UUID_A, UUID_C, other_minor_spec

pytestmark = pytest.mark.criu

RECORD = "gpu-device-watcher.json"
ABORTED = "Aborting restore due to pre-restore script"


def action_lines(log: str) -> list[str]:
    """The action's lines in a CRIU log."""
    return [line for line in log.splitlines() if line.startswith("gpu-device-watcher: ")]


def dump_tree(criu: Criu, host: SimHost, tree: Tree, images: Path) -> dict[str, object]:
    dumped = criu.dump(tree.root, images, host.env())
    assert dumped.ok, dumped.explain()
    tree.gone()  # a dump kills the tree
    record: dict[str, object] = json.loads((images / RECORD).read_text())
    return record


def test_dump_records_the_used_device_and_restore_goes_on(
    criu: Criu, host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    tree = trees("/dev/zero")
    images = tmp_path / "images"
    record = dump_tree(criu, host, tree, images)

    assert record["version"] == 2
    assert record["pid"] == tree.root
    assert record["generation"] == host.get()["generation"]
    assert record["used"] == [
        {
            "name": "nvidia5",
            "path": "/dev/nvidia5",
            "kind": "gpu",
            "major": 1,
            "minor": 5,
            "valid": True,
            "pids": [tree.child],
            "via": ["fd"],
            "family": "nvidia",
            "gpu": {
                "uuid": "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
                "bus_id": "0000:3b:00.0",
                "model": "NVIDIA H200",
                "minor": 5,
            },
        }
    ]
    dump_log = (images / "dump.log").read_text()
    assert any("recorded generation" in line for line in action_lines(dump_log)), dump_log
    assert not alive(tree.root)
    assert not alive(tree.child)

    restored = criu.restore(images, host.env())
    assert restored.ok, restored.explain()
    assert alive(tree.root), restored.explain()
    assert alive(tree.child)
    assert any("restore may go on" in line for line in action_lines(restored.log))


def test_restore_on_a_changed_host_stops_before_any_process_exists(
    criu: Criu, host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    tree = trees("/dev/zero")
    images = tmp_path / "images"
    dump_tree(criu, host, tree, images)

    # 1. Another driver version.
    host.set_driver_version("590.44.01")
    host.rescan()
    refused = criu.restore(images, host.env(), log="restore-version.log")
    assert not refused.ok, refused.explain()
    lines = action_lines(refused.log)
    assert any("590.44.01" in line and "580.95.05" in line for line in lines), refused.log
    assert any(line.startswith("gpu-device-watcher: restore stopped:") for line in lines)
    assert ABORTED in refused.log
    assert not alive(tree.root)
    assert not alive(tree.child)

    # 2. Same version again, but the used node is gone.
    host.set_driver_version("580.95.05")
    host.remove_node("nvidia5")
    host.rescan()
    refused = criu.restore(images, host.env(), log="restore-node.log")
    assert not refused.ok, refused.explain()
    lines = action_lines(refused.log)
    assert any("device-absent: nvidia5" in line and "absent" in line for line in lines), refused.log
    assert ABORTED in refused.log
    assert not alive(tree.root)
    assert not alive(tree.child)

    # 3. The host as it was: the images were never touched, and the restore goes through.
    host.replace_node("nvidia5", 1, 5)
    host.rescan()
    restored = criu.restore(images, host.env(), log="restore-ok.log")
    assert restored.ok, restored.explain()
    assert alive(tree.root)
    assert alive(tree.child)


def test_the_action_script_line_of_a_criu_config_file(
    criu: Criu, host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    # What docs/criu.md tells operators to put in /etc/criu/default.conf; CRIU reads
    # $CRIU_CONFIG_FILE in addition, which spares the test writing to /etc.
    config = tmp_path / "criu.conf"
    config.write_text(f"# gpu-device-watcher\naction-script {ACTION}\n")
    tree = trees("/dev/zero")
    images = tmp_path / "images"
    dumped = criu.dump(tree.root, images, host.env(CRIU_CONFIG_FILE=str(config)), action=None)
    assert dumped.ok, dumped.explain()
    tree.gone()
    used = json.loads((images / RECORD).read_text())["used"]
    assert [entry["name"] for entry in used] == ["nvidia5"]


def test_a_checkpoint_moves_to_another_node_with_another_gpu(
    criu: Criu, make_host: Callable[..., SimHost], trees: Callable[..., Tree], tmp_path: Path
) -> None:
    # Dumped on one node (its nvidia5 is GPU A, an H200); offered to a node whose only GPU
    # is another model (CRIU stops, nothing restored), then to one whose H200 is nvidia3 with
    # another UUID (the gate passes and CRIU's log carries the device map).
    source = make_host(name="source")
    tree = trees("/dev/zero")
    images = tmp_path / "images"
    dump_tree(criu, source, tree, images)
    source.stop()

    other_model = make_host(other_minor_spec("NVIDIA A100-SXM4-80GB"), name="a100-node")
    refused = criu.restore(images, other_model.env(), log="restore-a100.log")
    assert not refused.ok, refused.explain()
    lines = action_lines(refused.log)
    assert any(line.startswith("gpu-device-watcher: gpu-model: nvidia5") for line in lines), (
        refused.log
    )
    assert ABORTED in refused.log
    assert not alive(tree.root)
    assert not alive(tree.child)
    other_model.stop()

    target = make_host(other_minor_spec(), name="h200-node")
    # The device map reaches cuda-checkpoint only through the wrapper, first on CRIU's PATH.
    restored = criu.restore(images, target.env(wrapper=True), log="restore-h200.log")
    assert restored.ok, restored.explain()
    assert alive(tree.root), restored.explain()
    assert alive(tree.child)
    lines = action_lines(restored.log)
    assert f"gpu-device-watcher: device map {UUID_A}={UUID_C}" in lines, restored.log
    assert any(
        "(nvidia5 as /dev/nvidia3)" in line and "restore may go on" in line for line in lines
    )
