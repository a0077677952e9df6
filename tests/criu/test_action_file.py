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
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.hostfiles import drm_partition, drm_render, kfd_node, proc_devices_text
from watcher.criu import actionfile

from .harness import Criu, Tree, alive
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
    assert data.startswith(b"#!/bin/sh\n")
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


def test_the_file_starts_python_without_runpy_zlib_or_site(
    bare_python: Path, host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """The front runs actionfile.ZIP_PROGRAM with the file's own path: a pre-dump imports the
    zip's modules and nothing of `python FILE`'s runpy (importlib.util, contextlib, ...), of
    inflating (zlib) or of `site`; and with no config file, no TOML parser (the dump has a
    check, cuda-checkpoint missing, so the `dump_checks` setting is looked up)."""
    action, images = installed(tmp_path)
    program = actionfile.ZIP_PROGRAM
    assert f"""exec "$gdw_python" -I -S -c '{program}' "$0" "$@"\n""".encode() in (
        action.read_bytes()
    )
    tree = trees("/dev/zero")
    done = subprocess.run(
        [str(bare_python), "-I", "-S", "-X", "importtime", "-c", program, str(action)],
        env={
            "PATH": "/usr/bin:/bin",
            "CRTOOLS_SCRIPT_ACTION": "pre-dump",
            "CRTOOLS_IMAGE_DIR": str(images),
            "CRTOOLS_INIT_PID": str(tree.root),
            "GPU_DEVICE_WATCHER_SOCKET": str(host.socket),
            "GPU_DEVICE_WATCHER_CONFIG": str(images / "no-config.toml"),
        },
        cwd="/",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"watcher.criu", "watcher.criu.dump"} <= imported
    assert "watcher.criu.settings" in imported
    unwanted = {"runpy", "zlib", "site", "contextlib", "importlib.util", "tomllib"}
    assert imported & unwanted == set()
    assert json.loads((images / RECORD).read_text())["used"][0]["name"] == "nvidia5"


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


def test_a_host_python_with_the_daemons_dependencies_still_gets_the_files_rule(
    trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """The file run by a Python that can import msgspec (here this venv's, with its site):
    the scanner is still not in the file, so without the daemon it answers as it does
    anywhere (it stopped the stage with `ModuleNotFoundError: watcher.config` before)."""
    action, images = installed(tmp_path)
    probe = [sys.executable, "-I", "-c", "import msgspec"]
    assert subprocess.run(probe, cwd="/", timeout=TIMEOUT, check=False).returncode == 0
    plain = trees(None)
    done = subprocess.run(
        [sys.executable, "-I", "-c", actionfile.ZIP_PROGRAM, str(action)],
        env={
            "PATH": "/usr/bin:/bin",
            "CRTOOLS_SCRIPT_ACTION": "pre-dump",
            "CRTOOLS_IMAGE_DIR": str(images),
            "CRTOOLS_INIT_PID": str(plain.root),
            "GPU_DEVICE_WATCHER_SOCKET": str(tmp_path / "no-daemon.sock"),
            "GPU_DEVICE_WATCHER_CONFIG": str(images / "no-config.toml"),
        },
        cwd="/",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "no GPU device in use by the tree" in done.stdout
    assert "failed unexpectedly" not in done.stderr


def test_without_the_daemon_a_dump_of_an_amd_tree_is_refused(
    bare_python: Path, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """AMD through the family table, with the bare file: the tree holds /dev/ptmx, whose
    major /proc/devices calls `drm` (the render nodes' major) or `kfd`. A render node counts
    when sysfs says amdgpu made it, or when it is a compute partition (amdgpu_xcp.K) that
    KFD's topology names; another driver's render node, or a partition KFD does not name,
    lets the dump go on."""
    action, images = installed(tmp_path)
    rdev = os.stat("/dev/ptmx").st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    proc, sys_dir = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "devices").write_text(proc_devices_text({"drm": major, "kfd": 510}))
    config = tmp_path / "config.toml"
    config.write_text(f'proc = "{proc}"\nsys = "{sys_dir}"\n')
    config.chmod(0o600)
    gone = str(tmp_path / "no-daemon.sock")
    tree = trees("/dev/ptmx")

    def dump() -> subprocess.CompletedProcess[str]:
        return run_bare(bare_python, action, "pre-dump", gone, images, pid=tree.root, config=config)

    def refused(done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 1, done.stderr
        assert f"holds AMD device(s) {major}:{minor}" in done.stderr
        assert "dump stopped" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (images / RECORD).exists()

    def goes_on(done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 0, done.stderr
        assert "no GPU device in use" in done.stdout
        assert not (images / RECORD).exists()

    # An amdgpu render node.
    drm_render(sys_dir, minor, "0000:c1:00.0", product_name="AMD Instinct MI300X")
    refused(dump())
    # Another driver's render node under the same major: not AMD's.
    shutil.rmtree(sys_dir)
    drm_render(sys_dir, minor, "0000:00:02.0", driver="i915")
    goes_on(dump())
    # A compute partition's render node that KFD names: AMD's.
    shutil.rmtree(sys_dir)
    drm_partition(sys_dir, minor, 0)
    kfd_node(sys_dir, 1, {"location_id": 0xC100, "domain": 0, "drm_render_minor": minor})
    refused(dump())
    # The same platform device that no KFD node names (the GPU is not split): not listed.
    kfd_node(sys_dir, 1, {"location_id": 0xC100, "domain": 0, "drm_render_minor": 128})
    goes_on(dump())
    # /dev/kfd's major: AMD's whatever sysfs says.
    (proc / "devices").write_text(proc_devices_text({"kfd": major}))
    refused(dump())


@pytest.mark.criu
def test_a_real_criu_dump_of_an_amd_tree_stops_while_the_daemon_is_down(
    bare_python: Path, criu: Criu, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """CRIU 4.1.1 runs the installed file at pre-dump with no daemon to ask: the tree holds
    /dev/zero, whose major /proc/devices calls `drm`, and renderD5 is an amdgpu render node
    in sysfs. The dump stops before CRIU freezes anything, and the tree lives on. The
    control: the same tree where renderD5 is another driver's is dumped (and so killed)."""
    action, _ = installed(tmp_path)
    rdev = os.stat("/dev/zero").st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    proc, sys_dir = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "devices").write_text(proc_devices_text({"drm": major, "kfd": 510}))
    config = tmp_path / "config.toml"
    config.write_text(f'proc = "{proc}"\nsys = "{sys_dir}"\n')
    config.chmod(0o600)
    env = {
        # The file's `#!/usr/bin/env python3` finds the bare interpreter: no msgspec there.
        "PATH": f"{bare_python.parent}:/usr/bin:/bin",
        "GPU_DEVICE_WATCHER_SOCKET": str(tmp_path / "no-daemon.sock"),
        "GPU_DEVICE_WATCHER_CONFIG": str(config),
    }
    drm_render(sys_dir, minor, "0000:c1:00.0", product_name="AMD Instinct MI300X")
    tree = trees("/dev/zero")
    stopped = criu.dump(tree.root, tmp_path / "images", env, action=action)
    assert not stopped.ok, stopped.explain()
    assert f"holds AMD device(s) {major}:{minor}" in stopped.log, stopped.explain()
    assert "cannot reach the daemon" in stopped.log
    assert not (tmp_path / "images" / RECORD).exists()
    assert alive(tree.root) and alive(tree.child)

    shutil.rmtree(sys_dir)
    drm_render(sys_dir, minor, "0000:00:02.0", driver="i915")
    dumped = criu.dump(tree.root, tmp_path / "images-i915", env, action=action)
    assert dumped.ok, dumped.explain()
    assert "no GPU device in use" in dumped.log
    tree.gone()


# ------------------------------------------------------------ a host without Python 3.11+

# Run in a private mount namespace (unshare -m): every python3.N of /usr/bin, /usr/local/bin
# and /bin is hidden under /dev/null (not a regular file), and with `fake` /usr/local/bin is
# a tmpfs holding a `python3.10` (and `python3`, a link to it) that says it is 3.10 and
# notes that it ran. `devices`: a file
# mounted over /proc/devices, so that a major of this machine counts as a GPU driver's.
_WITHOUT_PYTHON = """\
set -e
for python in /usr/bin/python3.* /usr/local/bin/python3.* /bin/python3.*; do
    if [ -e "$python" ]; then mount --bind /dev/null "$python"; fi
done
if [ -n "$FAKE_RAN" ]; then
    mount -t tmpfs fake /usr/local/bin
    printf '#!/bin/sh\\necho "$0" >>%s\\necho Python 3.10.12\\n' "$FAKE_RAN" \\
        >/usr/local/bin/python3.10
    chmod 755 /usr/local/bin/python3.10
    ln -s python3.10 /usr/local/bin/python3
fi
if [ -n "$FAKE_DEVICES" ]; then mount --bind "$FAKE_DEVICES" /proc/devices; fi
shift
exec env -i "$@"
"""


def run_without_python(
    action: Path,
    stage: str,
    images: Path,
    *,
    fake: Path | None,
    pid: int | None = None,
    devices: str | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = [f"CRTOOLS_SCRIPT_ACTION={stage}", f"CRTOOLS_IMAGE_DIR={images}"]
    if pid is not None:
        environment.append(f"CRTOOLS_INIT_PID={pid}")
    fake_devices = ""
    if devices is not None:
        fake_devices = str(images.parent / "devices")
        Path(fake_devices).write_text(devices)
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", _WITHOUT_PYTHON, "sh", "--", *environment, str(action)],
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "FAKE_RAN": str(fake or ""),
            "FAKE_DEVICES": fake_devices,
        },
        cwd="/",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


MAP_ONLY = """\
import ctypes, mmap, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open("/dev/zero", os.O_RDONLY)
address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
print("ready", flush=True)
time.sleep(1000)
"""


def _a_device_only_mapped_stops_the_dump(
    run: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """A device only mapped, no longer open (major 1, /dev/zero's, named `nvidia`)."""
    with subprocess.Popen(
        [sys.executable, "-c", MAP_ONLY], stdout=subprocess.PIPE, text=True
    ) as mapper:
        try:
            assert mapper.stdout is not None
            assert mapper.stdout.readline() == "ready\n"
            zero = os.stat("/dev/zero").st_rdev
            mapped = run(
                "pre-dump", pid=mapper.pid, devices=proc_devices_text({"nvidia": os.major(zero)})
            )
        finally:
            mapper.kill()
    assert mapped.returncode == 1
    assert f" {os.major(zero)}:{os.minor(zero)} " in mapped.stderr


@pytest.mark.parametrize("interpreter", ["absent", "3.10"])
def test_without_python_only_a_stage_that_needs_a_record_fails(
    namespaces_available: None,
    trees: Callable[..., Tree],
    tmp_path: Path,
    interpreter: str,
) -> None:
    action, images = installed(tmp_path)
    fake = tmp_path / "fake-python-ran" if interpreter == "3.10" else None
    found = "/usr/local/bin/python3.10" if fake else "none"
    install_hint = "install python3 3.11 or later, e.g. apt-get install python3.11"

    def run(stage: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = run_without_python(action, stage, images, fake=fake, **kwargs)
        assert "Traceback" not in done.stderr
        assert all(line.startswith("gpu-device-watcher: ") for line in done.stderr.splitlines())
        return done

    # A stage with nothing to do, and pre-restore of a checkpoint without our record.
    for stage in ("post-dump", "network-lock", "post-resume", "pre-restore"):
        quiet = run(stage)
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", ""), stage

    # pre-dump of a tree holding no GPU node: /proc/devices here names no GPU driver, then
    # one that names major 5 (/dev/ptmx) `nvidia-frontend`, which the tree does not hold.
    plain = trees("/dev/null")
    dumped = run("pre-dump", pid=plain.root)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stdout.startswith("gpu-device-watcher: no GPU driver registered in /proc/")
    ptmx = os.stat("/dev/ptmx").st_rdev
    gpu_devices = proc_devices_text({"nvidia-frontend": os.major(ptmx), "nvidia-uvm": 509})
    dumped = run("pre-dump", pid=plain.root, devices=gpu_devices)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stdout.startswith(
        f"gpu-device-watcher: no GPU device in use by the tree of pid {plain.root}; "
        "no record written"
    )
    assert not (images / RECORD).exists()

    # pre-dump of a tree whose child holds the "GPU" node: stopped, saying what to install.
    gpu = trees("/dev/ptmx")
    refused = run("pre-dump", pid=gpu.root, devices=gpu_devices)
    assert refused.returncode == 1
    assert refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"gpu-device-watcher: the tree of pid {gpu.root} holds GPU device(s) ")
    assert f" {os.major(ptmx)}:{os.minor(ptmx)} " in line
    assert line.endswith(f"found: {found}): {install_hint}; dump stopped")

    _a_device_only_mapped_stops_the_dump(run)

    # A pid that is gone.
    gone = run("pre-dump", pid=2**22 + 1, devices=gpu_devices)
    assert gone.returncode == 1
    assert "is not running; dump stopped" in gone.stderr

    # pre-restore of a checkpoint that holds our record: stopped, saying what to install.
    (images / RECORD).write_text("{}")
    stopped = run("pre-restore")
    assert stopped.returncode == 1
    assert stopped.stdout == ""
    [line] = stopped.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: the checkpoint holds a GPU record and this host ")
    assert line.endswith(f"found: {found}): {install_hint}; restore stopped")

    # The fake 3.10 was seen (it is named in the lines) but never run.
    if fake is not None:
        assert not fake.exists(), fake.read_text()
