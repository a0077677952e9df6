"""The installed `gpu-device-watcher-criu-action` against a real daemon, without CRIU.

Each test runs the console script as CRIU would (no arguments, CRTOOLS_* in the environment,
CRTOOLS_IMAGE_DIR a /proc/<pid>/fd/<n> link to the image directory) against the daemon of a
simulated host (see simhost.py): its nodes carry the numbers of this machine's /dev/zero
(nvidia5) and /dev/full (nvidia7), so a process holding /dev/zero uses "nvidia5".
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import msgspec
import pytest

from watcher import criu as action_module
from watcher.core import record as record_model

from .harness import ACTION, Tree, stage_wrapper
from .simhost import H200, HostSpec, SimHost

TIMEOUT = 30.0
RECORD = "gpu-device-watcher.json"
MAP_ZERO = """\
import ctypes, mmap, os, time
# Through libc: Python's mmap.mmap keeps a dup of the fd, and the point is no fd at all.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open("/dev/zero", os.O_RDONLY)
address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
print("ready", flush=True)
time.sleep(1000)
"""


@contextmanager
def image_dir_link(directory: Path) -> Iterator[str]:
    """The directory as CRIU names it to the script: a /proc/<pid>/fd/<n> link."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def run_action(
    action: str | None,
    env: Mapping[str, str],
    images: Path | None = None,
    pid: int | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if not k.startswith("CRTOOLS_")}
    if action is not None:
        env["CRTOOLS_SCRIPT_ACTION"] = action
    if pid is not None:
        env["CRTOOLS_INIT_PID"] = str(pid)
    with image_dir_link(images) if images is not None else nullcontext() as link:
        if link is not None:
            env["CRTOOLS_IMAGE_DIR"] = link
        return subprocess.run(
            command or [str(ACTION)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            cwd=images,
        )


def read_record(images: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((images / RECORD).read_text())
    return record


def prefixed(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gpu-device-watcher: ")]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def recorded(host: SimHost, trees: Callable[..., Tree], images: Path) -> dict[str, Any]:
    """A real pre-dump record of a tree whose child holds /dev/zero (the map's nvidia5)."""
    tree = trees("/dev/zero")
    done = run_action("pre-dump", host.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    return read_record(images)


# ---------------------------------------------------------------------------- pre-dump


def test_pre_dump_records_the_map_and_the_used_device(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    tree = trees("/dev/zero")
    live = host.get()
    done = run_action("pre-dump", host.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    record = read_record(images)
    uname = os.uname()
    assert record["version"] == 2
    assert record["generation"] == live["generation"] >= 1
    assert record["hostname"] == uname.nodename
    assert record["kernel"] == uname.release
    assert record["pid"] == tree.root
    assert record["map"] == live["map"]
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
                "model": H200,
                "minor": 5,
            },
        }
    ]
    assert record["libraries"] == []
    assert record["checks"] == []
    assert done.stdout.startswith("gpu-device-watcher: recorded generation")
    assert "(nvidia5)" in done.stdout
    # Only the record, no temporary file left behind.
    assert sorted(p.name for p in images.iterdir()) == [RECORD]


def test_the_record_matches_its_model_and_published_schema(recorded: dict[str, Any]) -> None:
    decoded = msgspec.convert(recorded, record_model.Record, strict=True)
    assert decoded.used[0].name == "nvidia5"
    assert record_model.RECORD_NAME == action_module.RECORD_NAME == RECORD
    assert record_model.RECORD_VERSION == action_module.RECORD_VERSION == recorded["version"]
    published = Path(__file__).resolve().parents[2] / "docs" / "criu-record.schema.json"
    assert published.read_text() == record_model.schema_text(), (
        "docs/criu-record.schema.json is stale: python -m watcher.core.record > "
        "docs/criu-record.schema.json"
    )


def test_pre_dump_replaces_an_old_record_by_rename(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    (images / RECORD).write_text('{"old": true}\n')
    with (images / RECORD).open() as old:
        tree = trees(None)
        done = run_action("pre-dump", host.env(), images, tree.root)
        assert done.returncode == 0, done.stderr
        # A reader that had the old file open still reads all of it: the new record arrived
        # by rename, never by rewriting the old file in place.
        assert old.read() == '{"old": true}\n'
    assert read_record(images)["used"] == []
    assert sorted(p.name for p in images.iterdir()) == [RECORD]


def test_pre_dump_writes_a_new_record_in_place(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    """In a fresh image directory the record is created where it belongs: no temporary file,
    no rename (one metadata operation less at every dump), the same mode as before."""
    tree = trees(None)
    trace = images.parent / "pre-dump.trace"
    command = ["strace", "-f", "-qq", "-e", "trace=rename,renameat,renameat2", "-o", str(trace)]
    if shutil.which("strace") is None:
        pytest.skip("needs strace (.ci/run installs it) to see that nothing is renamed")
    done = run_action("pre-dump", host.env(), images, tree.root, command=[*command, str(ACTION)])
    assert done.returncode == 0, done.stderr
    assert "rename" not in trace.read_text()
    assert sorted(p.name for p in images.iterdir()) == [RECORD]
    assert stat.S_IMODE((images / RECORD).stat().st_mode) == 0o644


@pytest.mark.parametrize("planted", ["symlink", "hard link", "fifo"])
def test_pre_dump_never_writes_through_what_is_planted_at_the_record_name(
    host: SimHost, trees: Callable[..., Tree], images: Path, tmp_path: Path, planted: str
) -> None:
    """The image directory may be the workload's: whatever it put at the record's name is
    replaced by a new file, never opened, and the file it pointed at is left as it was."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    record = images / RECORD
    if planted == "symlink":
        record.symlink_to(victim)
    elif planted == "hard link":
        os.link(victim, record)
    else:
        os.mkfifo(record)
    tree = trees(None)
    done = run_action("pre-dump", host.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "untouched\n"
    assert record.is_file() and not record.is_symlink()
    assert read_record(images)["used"] == []
    assert sorted(p.name for p in images.iterdir()) == [RECORD]


def test_pre_dump_sees_a_device_that_is_only_mapped(host: SimHost, images: Path) -> None:
    mapper = subprocess.Popen(
        [sys.executable, "-c", MAP_ZERO],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert mapper.stdout is not None
        ready, _, _ = select.select([mapper.stdout], [], [], TIMEOUT)
        assert ready and mapper.stdout.readline() == b"ready\n"
        done = run_action("pre-dump", host.env(), images, mapper.pid)
        assert done.returncode == 0, done.stderr
        [used] = read_record(images)["used"]
        assert (used["name"], used["pids"], used["via"]) == ("nvidia5", [mapper.pid], ["maps"])
    finally:
        mapper.kill()
        mapper.wait(timeout=TIMEOUT)
        if mapper.stdout is not None:
            mapper.stdout.close()


def test_pre_dump_of_a_tree_that_uses_no_gpu(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    tree = trees(None)
    done = run_action("pre-dump", host.env(), images, tree.root)
    assert done.returncode == 0, done.stderr
    assert read_record(images)["used"] == []
    assert "no GPU device used by the tree" in done.stdout


def test_pre_dump_without_init_pid_is_a_usage_error(host: SimHost, images: Path) -> None:
    done = run_action("pre-dump", host.env(), images)
    assert done.returncode == 2
    assert prefixed(done.stderr) == done.stderr.splitlines()
    assert "CRTOOLS_INIT_PID" in done.stderr
    assert not (images / RECORD).exists()


def test_pre_dump_that_cannot_write_its_record_fails_the_dump(
    host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    tree = trees(None)
    env = host.env()
    env = {k: v for k, v in env.items() if not k.startswith("CRTOOLS_")}
    env.update(
        CRTOOLS_SCRIPT_ACTION="pre-dump",
        CRTOOLS_INIT_PID=str(tree.root),
        CRTOOLS_IMAGE_DIR=str(tmp_path / "gone"),
    )
    done = subprocess.run(
        [str(ACTION)], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 1
    assert "cannot write gpu-device-watcher.json into" in done.stderr


# ---------------------------------------------------------------------------- pre-restore


def test_pre_restore_on_the_same_host_goes_on(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "match this host: restore may go on" in done.stdout


def test_pre_restore_stops_on_another_driver_version(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.set_driver_version("590.44.01")
    assert host.rescan()["map"]["driver"]["version"] == "590.44.01"
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    lines = prefixed(done.stderr)
    assert lines == done.stderr.splitlines()
    assert any("590.44.01" in line and "580.95.05" in line for line in lines), lines
    assert lines[-1].startswith("gpu-device-watcher: restore stopped:")


def test_pre_restore_stops_when_a_used_node_is_missing(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.remove_node("nvidia5")
    assert "nvidia5" not in {d["name"] for d in host.rescan()["map"]["devices"]}
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    [reason, stop] = prefixed(done.stderr)
    # The GPU itself is still here (same UUID): its node is what is missing.
    assert reason.startswith("gpu-device-watcher: device-absent: nvidia5")
    assert "whose device node is absent" in reason
    assert f"(used by pid {recorded['used'][0]['pids'][0]})" in reason
    assert "restore stopped" in stop


def test_pre_restore_ignores_unused_devices(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.remove_node("nvidia7")  # nobody held /dev/full: its loss does not matter
    host.rescan()
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 0, done.stderr


def test_pre_restore_stops_when_a_used_node_is_not_valid(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.replace_node("nvidia5", 1, 6)  # right name, wrong minor
    host.rescan()
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    reason = prefixed(done.stderr)[0]
    assert "nvidia5" in reason and "is not valid here: /dev/nvidia5" in reason


def test_pre_restore_stops_when_the_driver_is_not_loaded(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.unload_driver()
    host.rescan()
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    assert "the NVIDIA driver is not loaded on this host (it was 580.95.05 at dump)" in (
        done.stderr
    )


def test_pre_restore_moves_a_gpu_onto_another_of_its_model_with_a_device_map(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    # nvidia5 is another model now; the other H200 (nvidia7) takes the checkpoint's GPU, and
    # the driver (580) has --device-map: the restore may go on, with the map printed.
    host.set_gpu_model(5, "NVIDIA A100-SXM4-80GB")
    host.rescan()
    done = run_action("pre-restore", host.env(wrapper=True), images)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert prefixed(done.stdout) == [
        "gpu-device-watcher: device map GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f="
        "GPU-0b2d4e6f-8a1c-3e5f-7a9b-1c3d5e7f9a2b",
        "gpu-device-watcher: the GPU devices of the checkpoint (nvidia5 as /dev/nvidia7) match "
        "this host: restore may go on",
    ]


@pytest.mark.parametrize("cuda_checkpoint", [True, False], ids=["another-binary", "none"])
def test_pre_restore_refuses_a_device_map_that_cannot_reach_cuda_checkpoint(
    host: SimHost, recorded: dict[str, Any], images: Path, cuda_checkpoint: bool
) -> None:
    # The same move, but CRIU's PATH leads to a cuda-checkpoint that is not the wrapper (or to
    # none): CRIU's plugin would restore onto the recorded UUID and fail after the images
    # are loaded. Stopped here instead, with the fix.
    host.set_gpu_model(5, "NVIDIA A100-SXM4-80GB")
    host.rescan()
    done = run_action("pre-restore", host.env(cuda_checkpoint=cuda_checkpoint), images)
    assert done.returncode == 1
    reason, stop = prefixed(done.stderr)
    assert reason.startswith(
        "gpu-device-watcher: remap-unsupported: the checkpoint's GPUs land on GPUs with other "
        "UUIDs here (GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f="
        "GPU-0b2d4e6f-8a1c-3e5f-7a9b-1c3d5e7f9a2b)"
    )
    leads_to = f"({host.base / 'bin' / 'cuda-checkpoint'})" if cuda_checkpoint else "(none)"
    assert f"the cuda-checkpoint on CRIU's PATH {leads_to} is not the" in reason
    assert "install-action DIR` writes it as DIR/cuda-checkpoint" in reason
    assert stop.startswith("gpu-device-watcher: restore stopped")
    # restore-check runs outside CRIU and cannot see CRIU's PATH: it answers as before.
    check = run_action(
        None,
        host.env(cuda_checkpoint=cuda_checkpoint),
        command=[sys.executable, "-m", "watcher", "restore-check", str(images)],
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_pre_restore_counts_gpus_of_the_model(
    host: SimHost, recorded: dict[str, Any], images: Path
) -> None:
    host.set_gpu_model(5, "NVIDIA A100-SXM4-80GB")
    host.set_gpu_model(7, "NVIDIA A100-SXM4-80GB")
    host.rescan()
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    assert (
        f"gpu-device-watcher: gpu-model: nvidia5 used {H200} GPU(s); this host has none of "
        "that model (2 x NVIDIA A100-SXM4-80GB)"
    ) in prefixed(done.stderr)


def test_pre_restore_without_a_record_goes_on(host: SimHost, images: Path) -> None:
    done = run_action("pre-restore", host.env(), images)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_pre_restore_with_nothing_used_goes_on_anywhere(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    tree = trees(None)
    assert run_action("pre-dump", host.env(), images, tree.root).returncode == 0
    host.set_driver_version("590.44.01")
    host.remove_node("nvidia5")
    host.rescan()
    done = run_action("pre-restore", host.env(), images)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "record-unreadable: gpu-device-watcher.json is not JSON"),
        ("[1, 2]", "record-unreadable: gpu-device-watcher.json is not a JSON object"),
        ('{"version": 3, "used": [], "map": {}}', "record-version: "),
        ('{"version": "2", "used": [], "map": {}}', '"version" is not an integer'),
        ('{"version": 1, "used": "nvidia0", "map": {}}', '"used" is not a list'),
    ],
)
def test_pre_restore_refuses_an_unusable_record(
    host: SimHost, images: Path, content: str, says: str
) -> None:
    (images / RECORD).write_text(content)
    done = run_action("pre-restore", host.env(), images)
    assert done.returncode == 1
    assert says in done.stderr
    assert prefixed(done.stderr) == done.stderr.splitlines()


# ---------------------------------------------------------------------------- the version policy


VERSION_CASES = [
    # (driver version here, restore_version_match, exit code); 580.95.05 at dump
    ("580.95.05", None, 0),
    ("580.95.05", "major", 0),
    ("580.105.08", None, 1),
    ("580.105.08", "exact", 1),
    ("580.105.08", "major", 0),
    ("590.44.01", "major", 1),
]


def test_restore_version_match(
    host: SimHost, recorded: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    results = []
    for version, policy, _ in VERSION_CASES:
        if host.get()["map"]["driver"]["version"] != version:
            host.set_driver_version(version)
            host.rescan()
        config = tmp_path / f"{policy}.toml"
        config.write_text(f'restore_version_match = "{policy}"\n' if policy else "")
        done = run_action("pre-restore", host.env(GPU_DEVICE_WATCHER_CONFIG=str(config)), images)
        results.append((version, policy, done.returncode))
        if done.returncode:
            assert f'(restore_version_match = "{policy or "exact"}")' in done.stderr
            assert f"driver version {version} here, 580.95.05 at dump" in done.stderr
    assert results == VERSION_CASES


def test_a_bad_version_policy_is_reported_and_kept_strict(
    host: SimHost, recorded: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('restore_version_match = "minor"\n')
    host.set_driver_version("580.105.08")
    host.rescan()
    done = run_action("pre-restore", host.env(GPU_DEVICE_WATCHER_CONFIG=str(config)), images)
    assert done.returncode == 1
    assert 'must be "exact" or "major", got \'minor\'' in done.stderr


def test_a_config_others_can_write_does_not_relax_the_check(
    host: SimHost, recorded: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('restore_version_match = "major"\n')
    config.chmod(0o666)
    host.set_driver_version("580.105.08")
    host.rescan()
    done = run_action("pre-restore", host.env(GPU_DEVICE_WATCHER_CONFIG=str(config)), images)
    assert done.returncode == 1
    assert "is writable by others (mode 0666); ignoring it" in done.stderr


def test_a_config_another_user_owns_does_not_relax_the_check(
    host: SimHost, recorded: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    """Mode 0644 is not enough: its owner (not root) could write "major" into it."""
    config = tmp_path / "config.toml"
    config.write_text('restore_version_match = "major"\n')
    os.chown(config, 65534, 65534)
    config.chmod(0o644)
    host.set_driver_version("580.105.08")
    host.rescan()
    done = run_action("pre-restore", host.env(GPU_DEVICE_WATCHER_CONFIG=str(config)), images)
    assert done.returncode == 1
    assert "is owned by another user (uid 65534); ignoring it" in done.stderr


# ---------------------------------------------------------------------------- other actions


@pytest.mark.parametrize(
    "action",
    [
        "post-dump",
        "post-restore",
        "pre-resume",
        "post-resume",
        "network-lock",
        "network-unlock",
        "setup-namespaces",
        "post-setup-namespaces",
        "status-ready",
        "query-ext-files",
        "some-future-action",
    ],
)
def test_other_actions_do_nothing(action: str, images: Path, tmp_path: Path) -> None:
    # A socket that cannot be reached: any attempt to ask the daemon would say so.
    env = dict(os.environ, GPU_DEVICE_WATCHER_SOCKET=str(tmp_path / "nobody.sock"))
    started = time.perf_counter()
    done = run_action(action, env, images, pid=1)
    elapsed = time.perf_counter() - started
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert list(images.iterdir()) == []
    assert elapsed < 5.0


def test_without_an_action_it_is_a_usage_error() -> None:
    done = run_action(None, os.environ)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: CRTOOLS_SCRIPT_ACTION is not set")


def test_the_cli_subcommand_is_the_same_action(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    tree = trees("/dev/zero")
    command = [sys.executable, "-m", "watcher", "criu-action"]
    done = run_action("pre-dump", host.env(), images, tree.root, command=command)
    assert done.returncode == 0, done.stderr
    assert [u["name"] for u in read_record(images)["used"]] == ["nvidia5"]
    assert run_action(None, os.environ, command=command).returncode == 2


# ---------------------------------------------------------------------------- no daemon


def test_unreachable_daemon_falls_back_to_a_direct_scan(
    trees: Callable[..., Tree], images: Path, tmp_path: Path
) -> None:
    # No config: the fallback scans this machine's own / and /proc (whatever they hold).
    env = dict(os.environ, GPU_DEVICE_WATCHER_SOCKET=str(tmp_path / "nobody.sock"))
    env.pop("GPU_DEVICE_WATCHER_CONFIG", None)
    tree = trees(None)
    done = run_action("pre-dump", env, images, tree.root)
    assert done.returncode == 0, done.stderr
    [line] = prefixed(done.stderr)
    assert "cannot reach the daemon at" in line
    assert line.endswith("scanning this host directly instead")
    assert read_record(images)["generation"] == 0


def test_the_fallback_scan_uses_the_configured_host_view(
    host: SimHost, trees: Callable[..., Tree], images: Path, tmp_path: Path
) -> None:
    # The action runs where the simulated host's nodes are (the daemon's mount namespace),
    # the daemon cannot be reached, and the config names the host view: the direct scan
    # finds the same devices the daemon would have.
    tree = trees("/dev/zero")
    env = host.env(
        GPU_DEVICE_WATCHER_SOCKET=str(tmp_path / "nobody.sock"),
        GPU_DEVICE_WATCHER_CONFIG=str(host.config),
        CRTOOLS_SCRIPT_ACTION="pre-dump",
        CRTOOLS_INIT_PID=str(tree.root),
        CRTOOLS_IMAGE_DIR=str(images),
    )
    done = host.run_inside([str(ACTION)], env)
    assert done.returncode == 0, done.stderr
    assert "scanning this host directly instead" in done.stderr
    record = read_record(images)
    assert record["generation"] == 0
    assert [(u["name"], u["path"], u["pids"]) for u in record["used"]] == [
        ("nvidia5", "/dev/nvidia5", [tree.child])
    ]
    # ... and pre-restore, with the daemon still away, checks against a direct scan too.
    env["CRTOOLS_SCRIPT_ACTION"] = "pre-restore"
    restored = host.run_inside([str(ACTION)], env)
    assert restored.returncode == 0, restored.stderr
    assert "scanning this host directly instead" in restored.stderr


# ---------------------------------------------------------------------------- staying lean


def imported_modules(stderr: str) -> set[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's "import time: self | cumulative | name"."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


HEAVY = {
    # json and socket too: the lean client uses _json and _socket (a few ms at every stage).
    "json",
    "socket",
    "re",
    "asyncio",
    "anyio",
    "msgspec",
    "argparse",
    "typing",
    "watcher.config",
    "watcher.probe",
    "watcher.daemon",
    # Archives are restore-check's and inspect's: at pre-restore CRIU hands over the images.
    "watcher.criu.archive",
    "tarfile",
    "gzip",
}


@pytest.mark.parametrize("action", ["post-dump", "network-lock", "post-resume"])
def test_a_stage_the_action_ignores_starts_no_python(
    host: SimHost, images: Path, action: str
) -> None:
    """The installed script answers the other stages itself (/bin/sh, ~1 ms), before any
    interpreter starts: the only program executed is the script, and the answer is CRIU's
    "go on". (Python runs with -I, which ignores PYTHONPROFILEIMPORTTIME: strace tells.)"""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: cannot see which programs the stage executes")
    trace = images.parent / f"{action}.trace"
    command = [strace, "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-o", str(trace)]
    done = run_action(action, host.env(), images, command=[*command, str(ACTION)])
    assert done.returncode == 0, done.stderr
    executed = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert len(executed) == 1 and f'execve("{ACTION}"' in executed[0], executed
    # The control: a stage with work does start Python, and the trace shows it.
    record = images.parent / "pre-restore.trace"
    command[command.index(str(trace))] = str(record)
    work = run_action("pre-restore", host.env(), images, command=[*command, str(ACTION)])
    assert work.returncode == 0, work.stderr
    assert "python" in record.read_text()
    assert ACTION.read_bytes().startswith(b"#!/bin/sh\n")


def action_command() -> list[str]:
    """The command the installed script execs, with `-X importtime` added: the script runs
    Python with `-I`, which ignores PYTHONPROFILEIMPORTTIME as it ignores every PYTHON*."""
    found = re.search(r"""^exec "\$python" -I -S -c '([^']+)' "\$@"$""", ACTION.read_text(), re.M)
    assert found is not None, "the script's exec line changed: update this test"
    return [sys.executable, "-I", "-S", "-X", "importtime", "-c", found.group(1)]


@pytest.mark.parametrize("action", ["pre-dump", "pre-restore"])
def test_the_daemon_path_imports_no_asyncio_anyio_or_msgspec(
    host: SimHost, recorded: dict[str, Any], images: Path, action: str
) -> None:
    pid = recorded["pid"] if action == "pre-dump" else None
    done = run_action(action, host.env(), images, pid, command=action_command())
    assert done.returncode == 0, done.stderr
    modules = imported_modules(done.stderr)
    assert "watcher.criu" in modules  # the profile really covers the action
    assert modules & HEAVY == set()


def test_the_installed_action_works_through_a_link_in_another_directory(
    host: SimHost, recorded: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    """CRIU's `action-script` may name a link (in /usr/local/bin, say) to the installed
    script: the interpreter is still the install's, found where the link leads, even with a
    PATH whose python3 cannot import the package."""
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    link = elsewhere / ACTION.name
    link.symlink_to(ACTION)
    env = host.env(PATH=f"{elsewhere}:/usr/bin:/bin")
    done = run_action("pre-restore", env, images, command=[str(link)])
    assert done.returncode == 0, done.stderr
    assert "restore may go on" in done.stdout + done.stderr


def test_the_import_check_does_see_the_fallback(
    trees: Callable[..., Tree], images: Path, tmp_path: Path
) -> None:
    # The control for the test above: without a daemon, the direct scan does load msgspec.
    env = dict(os.environ, GPU_DEVICE_WATCHER_SOCKET=str(tmp_path / "nobody.sock"))
    done = run_action("pre-dump", env, images, trees(None).root, command=action_command())
    assert done.returncode == 0, done.stderr
    assert {"msgspec", "watcher.probe"} <= imported_modules(done.stderr)


# ---------------------------------------------------------------------------- record format 2

# A GPU process as pre-dump sees it: the node open, the driver's libraries mapped (files named
# like them: the names are what the record keeps), the visibility variables set.
GPU_PROCESS = """\
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
held = os.open("/dev/zero", os.O_RDONLY)
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    os.close(fd)
print("ready", flush=True)
time.sleep(1000)
"""
GPU_ENVIRONMENT = {
    "NVIDIA_VISIBLE_DEVICES": "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
    "CUDA_VISIBLE_DEVICES": "0",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
}


@contextmanager
def gpu_process(tmp_path: Path, libraries: list[str]) -> Iterator[int]:
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir(exist_ok=True)
    paths = []
    for name in libraries:
        (lib_dir / name).write_bytes(b"\0" * 4096)
        paths.append(str(lib_dir / name))
    env = {k: v for k, v in os.environ.items() if k not in GPU_ENVIRONMENT}
    env.update(GPU_ENVIRONMENT, NVIDIA_DRIVER_CAPABILITIES_X="not one of ours")
    child = subprocess.Popen(
        [sys.executable, "-c", GPU_PROCESS, *paths],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT)
        assert ready and child.stdout.readline() == b"ready\n"
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=TIMEOUT)
        if child.stdout is not None:
            child.stdout.close()


def test_pre_dump_records_environment_libraries_and_gpu_identity(
    host: SimHost, images: Path, tmp_path: Path
) -> None:
    libraries = [
        "libcuda.so.580.95.05",
        "libnvidia-ml.so.580.95.05",
        "libcudart.so.12.4.127",  # the CUDA runtime's version, not the driver's: not recorded
        "libcuda.so.1",  # the soname link's name: not versioned by the driver
    ]
    with gpu_process(tmp_path, libraries) as pid:
        done = run_action("pre-dump", host.env(), images, pid)
    assert done.returncode == 0, done.stderr
    record = read_record(images)
    assert record["version"] == 2
    assert record["environment"] == GPU_ENVIRONMENT
    assert record["libraries"] == ["libcuda.so.580.95.05", "libnvidia-ml.so.580.95.05"]
    [used] = record["used"]
    assert used["gpu"]["uuid"] == "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f"
    assert used["gpu"]["model"] == H200
    msgspec.convert(record, record_model.Record, strict=True)

    # Another 580 driver under "major": the versions may differ, the libraries may not.
    host.set_driver_version("580.105.08")
    host.rescan()
    config = tmp_path / "major.toml"
    config.write_text('restore_version_match = "major"\n')
    refused = run_action("pre-restore", host.env(GPU_DEVICE_WATCHER_CONFIG=str(config)), images)
    assert refused.returncode == 1
    [reason, _stop] = prefixed(refused.stderr)
    assert reason.startswith(
        "gpu-device-watcher: driver-library: the checkpoint mapped libcuda.so.580.95.05, "
        "libnvidia-ml.so.580.95.05 (driver 580.95.05); this host's driver is 580.105.08"
    )


def test_pre_dump_of_a_pid_that_is_gone_stops_the_dump(host: SimHost, images: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=TIMEOUT)
    done = run_action("pre-dump", host.env(), images, gone.pid)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpu-device-watcher: CRTOOLS_INIT_PID {gone.pid} is not a running")
    assert list(images.iterdir()) == []


def test_cuda_checkpoint_missing_warns_and_names_the_one_in_the_map(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    # A cuda-checkpoint on the host but not on CRIU's PATH: the map knows where it is.
    host.run_inside(["mkdir", "-p", str(host.root / "usr/local/bin")], host.env())
    host.run_inside(
        ["cp", "/bin/true", str(host.root / "usr/local/bin/cuda-checkpoint")], host.env()
    )
    assert host.rescan()["map"]["driver"]["cuda_checkpoint"] == "/usr/local/bin/cuda-checkpoint"
    tree = trees("/dev/zero")
    done = run_action("pre-dump", host.env(cuda_checkpoint=False), images, tree.root)
    assert done.returncode == 0, done.stderr
    [line] = prefixed(done.stderr)
    assert line.startswith("gpu-device-watcher: cuda-checkpoint-missing: the tree uses a GPU")
    assert "one is at /usr/local/bin/cuda-checkpoint: put the gpu-device-watcher" in line
    assert "cuda-checkpoint wrapper first on the PATH of the service that runs CRIU" in line
    [check] = read_record(images)["checks"]
    assert (check["code"], check["severity"]) == ("cuda-checkpoint-missing", "warning")


def test_the_dump_check_follows_the_wrapper_to_the_maps_binary(tmp_path: Path) -> None:
    from watcher.criu import dump

    wrapper = stage_wrapper(tmp_path / "bin")
    driver_binary = tmp_path / "driver/usr/bin/cuda-checkpoint"
    driver_binary.parent.mkdir(parents=True)
    driver_binary.write_text("#!/bin/sh\n")
    driver_binary.chmod(0o755)
    gpu = [{"name": "nvidia0", "kind": "gpu", "minor": 0}]
    environ = {"PATH": f"{wrapper.parent}:/nonexistent"}
    with_binary = {"driver": {"cuda_checkpoint": str(driver_binary)}}
    assert dump.run_checks(gpu, with_binary, environ) == []
    [check] = dump.run_checks(gpu, {"driver": {"cuda_checkpoint": None}}, environ)
    assert check["code"] == "cuda-checkpoint-missing"
    assert f"the gpu-device-watcher wrapper {wrapper}, which finds no real" in check["message"]
    # Without the wrapper, the map's binary alone is not on CRIU's PATH: the fix is named.
    [check] = dump.run_checks(gpu, with_binary, {"PATH": "/nonexistent"})
    assert f"one is at {driver_binary}: put the gpu-device-watcher" in check["message"]


def test_cuda_checkpoint_missing_when_the_wrapper_finds_no_real_binary(
    host: SimHost, trees: Callable[..., Tree], images: Path
) -> None:
    tree = trees("/dev/zero")
    env = host.env(cuda_checkpoint=False, wrapper=True)
    done = run_action("pre-dump", env, images, tree.root)
    assert done.returncode == 0, done.stderr
    [line] = prefixed(done.stderr)
    wrapper = host.base / "wrapper" / "cuda-checkpoint"
    assert line.startswith(
        "gpu-device-watcher: cuda-checkpoint-missing: the tree uses a GPU and CRIU's PATH leads "
        f"to the gpu-device-watcher wrapper {wrapper}, which finds no real cuda-checkpoint"
    )
    # With a real one behind the wrapper on PATH, the check is satisfied.
    again = images.parent / "again"
    again.mkdir()
    env = host.env(wrapper=True)
    done = run_action("pre-dump", env, again, tree.root)
    assert done.returncode == 0, done.stderr
    assert read_record(again)["checks"] == []


def test_dump_checks_refuse_stops_the_dump_before_the_freeze(
    make_host: Callable[..., SimHost], trees: Callable[..., Tree], images: Path
) -> None:
    # One config for the daemon (which validates the key) and the action (which obeys it).
    host = make_host(HostSpec(config={"dump_checks": "refuse"}))
    config = host.config
    tree = trees("/dev/zero")
    env = host.env(cuda_checkpoint=False, GPU_DEVICE_WATCHER_CONFIG=str(config))
    done = run_action("pre-dump", env, images, tree.root)
    assert done.returncode == 1
    lines = prefixed(done.stderr)
    assert lines[0].startswith("gpu-device-watcher: cuda-checkpoint-missing:")
    assert lines[-1].startswith("gpu-device-watcher: dump stopped before CRIU froze the tree")
    assert list(images.iterdir()) == []
    # The same tree with cuda-checkpoint on PATH has nothing to refuse.
    env = host.env(GPU_DEVICE_WATCHER_CONFIG=str(config))
    assert run_action("pre-dump", env, images, tree.root).returncode == 0


def test_mig_in_use_is_found_from_the_capabilities_in_proc(tmp_path: Path) -> None:
    from watcher.criu import dump

    proc = tmp_path / "proc"
    gi = proc / "driver/nvidia/capabilities/gpu0/mig/gi1"
    (gi / "ci0").mkdir(parents=True)
    (gi / "access").write_text("DeviceFileMinor: 12\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    (gi / "ci0" / "access").write_text("DeviceFileMinor: 13\nDeviceFileMode: 292\n")
    (proc / "driver/nvidia/capabilities/mig").mkdir()  # config/monitor: not MIG instances
    (proc / "driver/nvidia/capabilities/mig/config").write_text("DeviceFileMinor: 1\n")
    assert dump.mig_minors(str(proc)) == {12, 13}

    config = tmp_path / "config.toml"
    config.write_text(f'proc = "{proc}"\n')
    environ = {"GPU_DEVICE_WATCHER_CONFIG": str(config), "PATH": "/nonexistent"}
    cap = {"name": "nvidia-caps/nvidia-cap13", "kind": "cap", "minor": 13}
    monitor = {"name": "nvidia-caps/nvidia-cap1", "kind": "cap", "minor": 1}
    checks = dump.run_checks([cap, monitor], {}, environ)
    assert [check["code"] for check in checks] == ["mig-in-use"]
    assert "nvidia-caps/nvidia-cap13" in checks[0]["message"]
    assert re.search(r"nvidia-cap1\b", checks[0]["message"]) is None
    assert dump.run_checks([monitor], {}, environ) == []
