"""CRIU 4.1.1's own CUDA plugin, the wrapper and the device map, end to end, without a GPU.

The plugin (`plugins/cuda/cuda_plugin.c` of CRIU's 4.1.1 release tarball, built by
`tests/criu/build_cuda_plugin.sh` into `.criu/cuda/`) is loaded with `--libdir`. It believes
in a GPU when `/proc/driver/nvidia/gpus/` is a directory: CRIU and the tree run in a private
mount namespace where a tmpfs over `/proc/driver` holds one (CRIU's own fault injection for
this plugin, FI_PLUGIN_CUDA_FORCE_ENABLE, needs a CRIU built with it; the mount needs
nothing). The real `cuda-checkpoint` is a stand-in under the simulated node's driver root
(only the map knows where: it is not on CRIU's PATH, as on a GPU Operator node); it answers
`-h`, `--get-restore-tid` (the pid itself: the main thread, which CRIU holds under ptrace),
`--get-state` and `--action` as the real one does, and logs each call.

Dumped on node A, the checkpoint is restored on node B, whose H200 has another UUID: the
stand-in receives `--action restore --pid P --device-map A=B` from the wrapper; restored on
A, no map. Without the wrapper on CRIU's PATH the plugin disables itself (CRIU's log says
so) and the dump goes on with no GPU state.
"""

from __future__ import annotations

import json
import select
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import CRIU_DIR, REPO, Criu, Tree, alive, spawn_tree
from .simhost import Gpu, HostSpec, SimHost
from .test_restore_check import UUID_A, UUID_C, other_minor_spec

pytestmark = pytest.mark.criu

BUILD_SCRIPT = REPO / "tests" / "criu" / "build_cuda_plugin.sh"
PLUGIN_DIR = CRIU_DIR / "cuda"
BUILD_TIMEOUT = 900
READY_TIMEOUT = 10.0
RECORD = "gpu-device-watcher.json"
DISABLED = "cuda_plugin: check that cuda-checkpoint is present in $PATH"

STAND_IN = """#!/bin/sh
# A stand-in for NVIDIA's cuda-checkpoint: answers as the real one does; logs each call.
{{
    printf 'binary=%s' "$0"
    for argument; do printf ' %s' "$argument"; done
    printf '\\n'
}} >>{log}
case "$1" in
-h | --help)
    printf '%s\\n' "CUDA checkpoint and restore utility" \\
        "  --action ACTION     lock, checkpoint, restore, unlock" \\
        "  --pid PID           the process" \\
        "  --timeout MS        lock timeout" \\
        "  --device-map MAP    oldUuid=newUuid,..." \\
        "  --get-state         running, locked, checkpointed" \\
        "  --get-restore-tid   the restore thread"
    ;;
--get-restore-tid) echo "$3" ;;
--get-state) echo running ;;
--action) ;;
*)
    echo "cuda-checkpoint: unknown option $1" >&2
    exit 2
    ;;
esac
"""


@pytest.fixture(scope="session")
def cuda_plugin() -> Path:
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(PLUGIN_DIR)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"CRIU's CUDA plugin could not be built here: {error}")
    if done.returncode != 0 or not (PLUGIN_DIR / "cuda_plugin.so").is_file():
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"CRIU's CUDA plugin could not be built here: {reason}")
    return PLUGIN_DIR


class GpuNamespace:
    """A private mount namespace whose /proc/driver says: one NVIDIA GPU."""

    def __init__(self) -> None:
        script = (
            "mount -t tmpfs gdw-proc-driver /proc/driver && "
            "mkdir -p /proc/driver/nvidia/gpus/0000:3b:00.0 && echo ready && exec sleep 3600"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], READY_TIMEOUT)
        line = self.holder.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.close()
            stderr = self.holder.stderr.read() if self.holder.stderr else b""
            pytest.skip(f"no private mount namespace with a tmpfs on /proc/driver: {stderr!r}")

    @property
    def enter(self) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--"]

    @property
    def tree_prefix(self) -> list[str]:
        # The tree's stdin and stderr opened inside the namespace: CRIU dumps an fd only when
        # its mount is one of the dumped tree's.
        return [*self.enter, "sh", "-c", 'exec "$@" </dev/null 2>/dev/null', "sh"]

    def close(self) -> None:
        self.holder.kill()
        self.holder.communicate(timeout=READY_TIMEOUT)


@pytest.fixture
def gpu_namespace() -> Iterator[GpuNamespace]:
    namespace = GpuNamespace()
    yield namespace
    namespace.close()


@pytest.fixture
def criu_inside(criu: Criu, gpu_namespace: GpuNamespace, tmp_path: Path) -> Criu:
    """The same CRIU, run inside the namespace."""
    runner = tmp_path / "criu-in-namespace"
    runner.write_text(f'#!/bin/sh\nexec {" ".join(gpu_namespace.enter)} "{criu.binary}" "$@"\n')
    runner.chmod(0o755)
    return Criu(runner, criu.verbosity)


def node_spec(base: HostSpec, driver_root: Path, stand_in: str) -> HostSpec:
    base.driver_root = str(driver_root)
    base.files = {str(driver_root / "usr/bin/cuda-checkpoint"): stand_in}
    return base


def stand_in_under_driver_root(tmp_path: Path) -> tuple[Path, Path, str, Path]:
    """(driver root, call log, stand-in text, its path): the stand-in `cuda-checkpoint` in
    the simulated driver root's usr/bin, where only the map knows it."""
    driver_root = tmp_path / "driver"
    log = tmp_path / "cuda-checkpoint.calls"
    stand_in = STAND_IN.format(log=log)
    binary = driver_root / "usr/bin/cuda-checkpoint"
    binary.parent.mkdir(parents=True)
    binary.write_text(stand_in)
    binary.chmod(0o755)
    return driver_root, log, stand_in, binary


def calls(log: Path, since: int = 0) -> list[str]:
    try:
        return log.read_text().splitlines()[since:]
    except FileNotFoundError:
        return []


def test_the_plugin_gets_the_driver_roots_binary_and_the_device_map(
    cuda_plugin: Path,
    criu_inside: Criu,
    gpu_namespace: GpuNamespace,
    make_host: Callable[..., SimHost],
    tmp_path: Path,
) -> None:
    driver_root, log, stand_in, binary = stand_in_under_driver_root(tmp_path)
    plugin = ["--libdir", str(cuda_plugin)]

    node_a = make_host(node_spec(HostSpec(), driver_root, stand_in), name="node-a")
    assert node_a.get()["map"]["driver"]["cuda_checkpoint"] == str(binary)
    tree: Tree = spawn_tree("/dev/zero", prefix=gpu_namespace.tree_prefix)
    try:
        root, child = tree.pids
        images = tmp_path / "images"
        dumped = criu_inside.dump(
            root, images, node_a.env(cuda_checkpoint=False, wrapper=True), extra=plugin
        )
        assert dumped.ok, dumped.explain()
        tree.gone()
        record = json.loads((images / RECORD).read_text())
        assert record["checks"] == [], record["checks"]
        assert "cuda_plugin: initialized" in dumped.log, dumped.log
        dump_calls = calls(log)
        for pid in (root, child):
            for call in (
                f"--get-restore-tid --pid {pid}",
                f"--get-state --pid {pid}",
                f"--action lock --pid {pid} --timeout 10000",
                f"--action checkpoint --pid {pid}",
            ):
                assert f"binary={binary} {call}" in dump_calls, dump_calls
        assert f"binary={binary} -h" in dump_calls
        node_a.stop()  # the checkpoint travels; node B's daemon answers from here on

        # Node B: its H200 is nvidia3 with another UUID.
        node_b = make_host(node_spec(other_minor_spec(), driver_root, stand_in), name="node-b")
        before = len(calls(log))
        restored = criu_inside.restore(
            images,
            node_b.env(cuda_checkpoint=False, wrapper=True),
            extra=plugin,
            log="restore-b.log",
        )
        assert restored.ok, restored.explain()
        restore_calls = calls(log, before)
        for pid in (root, child):
            assert (
                f"binary={binary} --action restore --pid {pid} --device-map {UUID_A}={UUID_C}"
                in restore_calls
            ), restore_calls
            assert f"binary={binary} --action unlock --pid {pid}" in restore_calls
        assert alive(root)
        assert alive(child)
        print("\n".join(["dump:", *dump_calls, "restore on B:", *restore_calls]))
    finally:
        tree.close()


def test_restored_where_it_was_dumped_no_map_is_added(
    cuda_plugin: Path,
    criu_inside: Criu,
    gpu_namespace: GpuNamespace,
    make_host: Callable[..., SimHost],
    tmp_path: Path,
) -> None:
    driver_root, log, stand_in, binary = stand_in_under_driver_root(tmp_path)
    plugin = ["--libdir", str(cuda_plugin)]
    node_a = make_host(node_spec(HostSpec(), driver_root, stand_in), name="node-a")
    tree = spawn_tree("/dev/zero", prefix=gpu_namespace.tree_prefix)
    try:
        images = tmp_path / "images"
        env = node_a.env(cuda_checkpoint=False, wrapper=True)
        dumped = criu_inside.dump(tree.root, images, env, extra=plugin)
        assert dumped.ok, dumped.explain()
        tree.gone()
        before = len(calls(log))
        restored = criu_inside.restore(images, env, extra=plugin)
        assert restored.ok, restored.explain()
        restore_calls = calls(log, before)
        restores = [call for call in restore_calls if " --action restore " in call]
        assert sorted(restores) == sorted(
            f"binary={binary} --action restore --pid {pid}" for pid in tree.pids
        ), restore_calls
    finally:
        tree.close()


def test_without_the_wrapper_the_plugin_disables_itself(
    cuda_plugin: Path,
    criu_inside: Criu,
    gpu_namespace: GpuNamespace,
    make_host: Callable[..., SimHost],
    tmp_path: Path,
) -> None:
    # The GPU Operator node as it is: cuda-checkpoint only in the driver root, not on PATH.
    driver_root, log, stand_in, _ = stand_in_under_driver_root(tmp_path)
    node = make_host(
        node_spec(HostSpec(gpus=[Gpu("0000:3b:00.0", 5)]), driver_root, stand_in), name="node"
    )
    tree = spawn_tree("/dev/zero", prefix=gpu_namespace.tree_prefix)
    try:
        dumped = criu_inside.dump(
            tree.root,
            tmp_path / "images",
            node.env(cuda_checkpoint=False),
            extra=["--libdir", str(cuda_plugin)],
        )
        assert dumped.ok, dumped.explain()
        tree.gone()
        disabled = [line for line in dumped.log.splitlines() if DISABLED in line]
        assert disabled, dumped.log
        print(disabled[0])
        # The action said why, before CRIU froze the tree.
        assert "gpu-device-watcher: cuda-checkpoint-missing: " in dumped.log
        assert calls(log) == []  # the driver root's binary never ran
    finally:
        tree.close()


def test_the_wrapper_with_nothing_behind_it_fails_as_a_missing_binary(
    cuda_plugin: Path,
    criu_inside: Criu,
    gpu_namespace: GpuNamespace,
    make_host: Callable[..., SimHost],
    tmp_path: Path,
) -> None:
    # The wrapper first on PATH, and no cuda-checkpoint anywhere on the node (nor in the map):
    # exit 127 and one line, which CRIU logs before the plugin disables itself.
    node = make_host(HostSpec(gpus=[Gpu("0000:3b:00.0", 5)]), name="node")
    assert node.get()["map"]["driver"]["cuda_checkpoint"] is None
    tree = spawn_tree("/dev/zero", prefix=gpu_namespace.tree_prefix)
    try:
        dumped = criu_inside.dump(
            tree.root,
            tmp_path / "images",
            node.env(cuda_checkpoint=False, wrapper=True),
            extra=["--libdir", str(cuda_plugin)],
        )
        assert dumped.ok, dumped.explain()
        tree.gone()
        lines = dumped.log.splitlines()
        ours = [line for line in lines if "gpu-device-watcher: no cuda-checkpoint on" in line]
        assert ours, dumped.log
        assert any(DISABLED in line for line in lines), dumped.log
        print("\n".join([*ours, *(line for line in lines if DISABLED in line)]))
        assert (
            "gpu-device-watcher: cuda-checkpoint-missing: the tree uses a GPU and CRIU's PATH"
            in (dumped.log)
        )
    finally:
        tree.close()


def test_without_the_daemon_the_wrapper_scans_for_the_driver_roots_binary(
    make_host: Callable[..., SimHost], tmp_path: Path
) -> None:
    """The daemon unreachable, nothing on PATH past the wrapper: its Python side scans the
    host view the config names (hostmap.scanned_map, quietly) and runs the binary the map
    finds under the driver root, with the call's arguments as they were."""
    driver_root, log, stand_in, binary = stand_in_under_driver_root(tmp_path)
    host = make_host(node_spec(HostSpec(), driver_root, stand_in))
    env = host.env(
        cuda_checkpoint=False,
        wrapper=True,
        GPU_DEVICE_WATCHER_SOCKET=str(tmp_path / "no-daemon.sock"),
        GPU_DEVICE_WATCHER_CONFIG=str(host.config),
    )
    wrapper = env["PATH"].split(":", 1)[0]
    env["PATH"] = f"{wrapper}:/usr/bin:/bin"
    done = host.run_inside(["cuda-checkpoint", "--get-state", "--pid", "1"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "running\n"
    assert done.stderr == ""  # quiet: what the real binary prints is all the caller sees
    assert calls(log) == [f"binary={binary} --get-state --pid 1"]
