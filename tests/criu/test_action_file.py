"""`install-action DIR`: the CRIU action as one file that runs on the host's bare python3.

The file is run the way CRIU on a Kubernetes node would run it: `env -i` (nothing of ours
in the environment but the socket), the system interpreter found through the shebang, no
virtual environment, no `watcher` package and no msgspec anywhere on that interpreter's
path. Against the real daemon of a simulated host (simhost.py), whose `nvidia5` carries the
numbers of /dev/zero, which the test trees hold.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.hostfiles import proc_devices_text
from watcher import actionfile

from .harness import Tree
from .simhost import SimHost

TIMEOUT = 30.0
RECORD = "gpu-device-watcher.json"
NAME = "gpu-device-watcher-criu-action"


def _bare_python() -> Path | None:
    """A python3 >= 3.11 outside any virtual environment: the system's, else pyenv's base."""
    for candidate in (Path("/usr/bin/python3"), Path(sys.base_prefix) / "bin" / "python3"):
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run(
            [str(candidate), "-c", "import sys; print(sys.version_info >= (3, 11))"],
            env={},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="module")
def bare_python() -> Path:
    python = _bare_python()
    if python is None:
        pytest.skip("no python3 >= 3.11 outside a virtual environment on this machine")
    # The point of the test: nothing of ours, and none of the daemon's dependencies, there.
    for module in ("watcher", "msgspec", "anyio"):
        found = subprocess.run(
            [str(python), "-c", f"import {module}"],
            env={},
            cwd="/",  # not the checkout, which holds `watcher`
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        if found.returncode == 0:
            pytest.skip(f"{python} can import {module}: it is not a bare interpreter")
    return python


def install(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "install-action", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_bare(
    python: Path,
    action: Path,
    stage: str,
    socket: str,
    images: Path,
    *,
    pid: int | None = None,
    config: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The file as CRIU runs it: no arguments, CRTOOLS_* and nothing else but PATH."""
    environment = [
        f"PATH={python.parent}:/usr/bin:/bin",
        f"CRTOOLS_SCRIPT_ACTION={stage}",
        f"CRTOOLS_IMAGE_DIR={images}",
        f"GPU_DEVICE_WATCHER_SOCKET={socket}",
        # By default an absent config: the host's /etc/gpu-device-watcher must not steer the
        # test.
        f"GPU_DEVICE_WATCHER_CONFIG={config or images / 'no-config.toml'}",
    ]
    if pid is not None:
        environment.append(f"CRTOOLS_INIT_PID={pid}")
    return subprocess.run(
        ["env", "-i", *environment, str(action)],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def installed(tmp_path: Path) -> tuple[Path, Path]:
    """(the action file installed into tmp_path/bin, an empty image directory)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    done = install(directory)
    assert done.returncode == 0, done.stderr
    images = tmp_path / "images"
    images.mkdir()
    return directory / NAME, images


def test_install_action_writes_one_executable_zipapp(tmp_path: Path) -> None:
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    action = tmp_path / NAME
    assert done.stdout.startswith(f"{action}: ")
    info = os.lstat(action)
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o755
    data = action.read_bytes()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(action) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
    assert {
        "__main__.py",
        "watcher/__init__.py",
        "watcher/criu/__init__.py",
        "watcher/criu/gate.py",
        "watcher/client.py",
    } <= names
    # Only modules that need nothing beyond the standard library.
    assert not any(name.startswith(("msgspec", "anyio")) for name in names)
    assert "watcher/probe.py" not in names
    assert "watcher/daemon.py" not in names
    # No temporary file is left behind (the cuda-checkpoint wrapper is written beside it),
    # and a second install gives the same bytes.
    assert sorted(os.listdir(tmp_path)) == ["cuda-checkpoint", NAME]
    again = install(tmp_path)
    assert again.returncode == 0, again.stderr
    assert action.read_bytes() == data
    assert os.lstat(action).st_ino != info.st_ino, "replaced by a rename, not rewritten"


def test_install_action_refuses_a_missing_directory(tmp_path: Path) -> None:
    done = install(tmp_path / "missing")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("gpu-device-watcher: install-action: ")
    assert "does not exist" in lines[0]


def test_a_non_stdlib_import_stops_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lean module of the action that starts importing msgspec must be caught at install.
    real = actionfile._imports

    def with_msgspec(node: object, module: str, is_package: bool) -> list[str]:
        found = real(node, module, is_package)  # type: ignore[arg-type]
        return [*found, "msgspec"] if module == "watcher.client" else found

    monkeypatch.setattr(actionfile, "_imports", with_msgspec)
    with pytest.raises(actionfile.ActionFileError, match=r"msgspec \(in watcher.client\)"):
        actionfile.action_modules()


def test_the_file_runs_on_the_bare_host_python(
    bare_python: Path,
    host: SimHost,
    trees: Callable[..., Tree],
    tmp_path: Path,
) -> None:
    action, images = installed(tmp_path)
    tree = trees("/dev/zero")
    socket = str(host.socket)

    # pre-dump: the record lands in the image directory, with the host path of the node.
    dumped = run_bare(bare_python, action, "pre-dump", socket, images, pid=tree.root)
    assert dumped.returncode == 0, dumped.stderr
    assert "Traceback" not in dumped.stderr
    record = json.loads((images / RECORD).read_text())
    used = {device["name"]: device for device in record["used"]}
    assert list(used) == ["nvidia5"]
    assert used["nvidia5"]["path"] == "/dev/nvidia5"
    assert used["nvidia5"]["pids"] == [tree.child]

    # pre-restore on the same host, daemon up: the gate lets it through.
    restored = run_bare(bare_python, action, "pre-restore", socket, images)
    assert restored.returncode == 0, restored.stderr
    assert "match this host" in restored.stdout

    # The daemon unreachable and the record lists used devices: closed, with a reason.
    gone = str(tmp_path / "no-daemon.sock")
    refused = run_bare(bare_python, action, "pre-restore", gone, images)
    assert refused.returncode == 1, refused.stderr
    assert "cannot reach the daemon" in refused.stderr
    assert "no scanner of its own" in refused.stderr
    assert "Traceback" not in refused.stderr

    # The same, but the checkpoint used no device: any host will do, no daemon needed.
    record["used"] = []
    (images / RECORD).write_text(json.dumps(record))
    open_door = run_bare(bare_python, action, "pre-restore", gone, images)
    assert open_door.returncode == 0, open_door.stderr

    # A stage the action ignores.
    quiet = run_bare(bare_python, action, "post-dump", gone, images, pid=tree.root)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == quiet.stderr == ""


def test_without_the_daemon_a_dump_goes_on_only_for_a_tree_without_a_gpu(
    bare_python: Path, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """The file cannot scan, but it can tell from /proc/devices and the tree's fds whether a
    GPU is in use. The simulated NVIDIA node: /dev/ptmx, whose major the host's
    /proc/devices (a file the config's `proc` names) calls `nvidia-frontend`."""
    action, images = installed(tmp_path)
    rdev = os.stat("/dev/ptmx").st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "devices").write_text(proc_devices_text({"nvidia-frontend": major, "nvidia-uvm": 509}))
    config = tmp_path / "config.toml"
    config.write_text(f'proc = "{proc}"\n')
    config.chmod(0o600)
    gone = str(tmp_path / "no-daemon.sock")

    # No NVIDIA device in the tree (it holds /dev/null and pipes): one line, exit 0, no
    # record, so CRIU dumps it while the daemon is down.
    plain = trees(None)
    done = run_bare(bare_python, action, "pre-dump", gone, images, pid=plain.root, config=config)
    assert done.returncode == 0, done.stderr
    assert "cannot reach the daemon" in done.stderr
    assert done.stdout == (
        f"gpu-device-watcher: no GPU device in use by the tree of pid {plain.root}; "
        "no record written\n"
    )
    assert "Traceback" not in done.stderr
    assert not (images / RECORD).exists()

    # A child holds the simulated node: refused, naming it, nothing written.
    gpu = trees("/dev/ptmx")
    refused = run_bare(bare_python, action, "pre-dump", gone, images, pid=gpu.root, config=config)
    assert refused.returncode == 1, refused.stderr
    assert f"holds NVIDIA device(s) {major}:{minor}" in refused.stderr
    assert "dump stopped" in refused.stderr
    assert "no record written" not in refused.stdout
    assert not (images / RECORD).exists()

    # The same tree where /proc/devices names no NVIDIA major (no driver loaded): nothing to
    # record, whatever it holds.
    (proc / "devices").write_text(proc_devices_text({"other": major}))
    unloaded = run_bare(bare_python, action, "pre-dump", gone, images, pid=gpu.root, config=config)
    assert unloaded.returncode == 0, unloaded.stderr
    assert "no GPU device in use" in unloaded.stdout

    # /proc/devices unreadable: it cannot tell, so closed.
    (proc / "devices").unlink()
    blind = run_bare(bare_python, action, "pre-dump", gone, images, pid=plain.root, config=config)
    assert blind.returncode == 1, blind.stderr
    assert "cannot read" in blind.stderr
    assert "dump stopped" in blind.stderr
    assert not (images / RECORD).exists()
