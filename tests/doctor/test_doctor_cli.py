"""`doctor` as a command: exit codes, usage errors, the text table (colour only on a
terminal), the daemon's answer, that it never writes to the host, and the real CRIU and runc
of this machine with the action configured through runc.conf."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doctor.simnode import SimNode
from tests.support.daemonproc import DaemonProcess
from tests.support.processes import PRIVATE_MOUNTS, namespace_problem
from tests.support.rootfs import copy_with_libraries

TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[2]


def test_exit_0_when_nothing_failed_and_1_when_a_check_failed(node: SimNode) -> None:
    done = node.doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    node.remove("/usr/lib/criu/cuda_plugin.so")
    failed = node.doctor()
    assert failed.returncode == 1
    assert "criu-plugin         fail" in failed.stdout


def test_text_is_a_table_with_fix_lines_and_no_colour_off_a_terminal(node: SimNode) -> None:
    node.remove("/etc/criu/runc.conf")
    out = node.doctor().stdout
    lines = out.splitlines()
    assert lines[0] == f"gpu-device-watcher doctor: the host under {node.root}"
    ids = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")]
    assert ids[:-1] == [
        "daemon", "map", "criu", "criu-config", "criu-plugin", "cuda-checkpoint",
        "runtime-runc", "runtime-crun", "runtime-crio", "runtime-containerd", "labels",
    ]  # fmt: skip
    fix = next(line.strip() for line in lines if "runc.conf" in line and "fix:" in line)
    # A fix line is never wrapped: it is copied whole.
    assert fix.endswith(">> /etc/criu/runc.conf"), fix
    assert lines[-1] == "9 ok, 1 warn, 1 fail, 0 skip"
    assert "\033[" not in out


def test_colour_on_a_terminal(node: SimNode) -> None:
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "watcher", "doctor", *node.options()],
            stdout=follower, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"},
        )  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            ready, _, _ = select.select([leader], [], [], TIMEOUT)
            assert ready, "doctor wrote nothing to its terminal in time"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(TIMEOUT) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode()
    assert "\033[32mok  \033[0m" in text
    assert "\033[33mwarn\033[0m" in text


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--format", "yaml"], "argument --format: invalid choice: 'yaml'"),
        (["--root", "/nonexistent/root"], "--root /nonexistent/root: not a directory"),
        (["extra"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(arguments: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "doctor", *arguments],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("gpu-device-watcher: ")
    assert says in done.stderr


def _snapshot(base: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under `base`: type and mode, owner, size, mtime, target or content hash."""
    entries: dict[str, tuple[object, ...]] = {}
    for directory, names, files in os.walk(base):
        for name in names + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if os.path.islink(path):
                content: object = os.readlink(path)
            elif os.path.isfile(path):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                content = None
            entries[os.path.relpath(path, base)] = (
                info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns,
                info.st_rdev, content,
            )  # fmt: skip
    return entries


def test_it_never_writes_to_the_host(node: SimNode) -> None:
    node.remove("/etc/criu/crun.conf")  # some checks warn, so every fix path is taken
    (node.host.proc / "driver/nvidia/version").write_text("NVRM version: 580.105.08\n")
    before = _snapshot(node.base)
    for format in ("text", "json"):
        node.doctor("--format", format)
    assert _snapshot(node.base) == before


def test_the_daemons_map_and_status(node: SimNode, tmp_path: Path) -> None:
    socket = tmp_path / "gdw.sock"
    serve = [
        sys.executable, "-m", "watcher", "serve",
        *node.options()[:-2],  # less --socket
        "--socket", str(socket),
    ]  # fmt: skip
    daemon = DaemonProcess(serve, socket_path=socket, log_path=tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        options = [*node.options()[:-2], "--socket", str(socket), "--format", "json"]
        done = subprocess.run(
            [sys.executable, "-m", "watcher", "doctor", *options],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    finally:
        daemon.stop()
        daemon.close()
    checks = {check["id"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["daemon"]["status"] == "ok", checks["daemon"]
    assert checks["daemon"]["fix"] is None
    assert f"running at {socket}: version " in checks["daemon"]["found"]
    assert checks["map"]["found"].startswith("the daemon's map: NVIDIA driver 580.95.05")
    assert done.returncode == 0


# --- the real machine -------------------------------------------------------------------------

# In a private mount namespace: /etc/criu holding runc.conf (an overlay on /etc when the
# machine has no /etc/criu), then doctor. The machine's own /etc is never touched.
_WITH_RUNC_CONF = """\
set -e
conf=$1 upper=$2 work=$3; shift 3
if [ -d /etc/criu ]; then
    mount --bind "$conf" /etc/criu
else
    mkdir -p "$upper/criu" && cp "$conf/runc.conf" "$upper/criu/"
    mount -t overlay gdw-doctor-etc -o "lowerdir=/etc,upperdir=$upper,workdir=$work" /etc
fi
exec "$@"
"""


def test_real_criu_and_runc_with_the_action_in_runc_conf(tmp_path: Path) -> None:
    from tests.criu.harness import CriuUnavailable, prepare_criu

    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc)")
    problem = namespace_problem(("unshare", "mount"), 'mount -t tmpfs probe "$1"', tmp_path)
    if problem is not None:
        pytest.skip(f"needs root and a private mount namespace: {problem}")
    try:
        criu = prepare_criu()
    except CriuUnavailable as error:
        pytest.skip(f"no CRIU 4.1.1: {error}")
    action_dir = tmp_path / "action"
    action_dir.mkdir()
    subprocess.run(
        [sys.executable, "-m", "watcher", "install-action", str(action_dir)],
        check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    action = action_dir / "gpu-device-watcher-criu-action"
    conf, upper, work = tmp_path / "conf", tmp_path / "upper", tmp_path / "work"
    for directory in (conf, upper, work):
        directory.mkdir()
    (conf / "runc.conf").write_text(f"action-script {action}\n")
    # The suite's CRIU first on the PATH that plain `criu` and runc search.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "criu").symlink_to(criu)
    config = tmp_path / "config.toml"
    config.write_text("")
    config.chmod(0o600)
    doctor = [
        sys.executable, "-m", "watcher", "doctor", "--format", "json",
        "--config", str(config), "--socket", str(tmp_path / "no.sock"),
    ]  # fmt: skip
    done = subprocess.run(
        [*PRIVATE_MOUNTS, "sh", "-c", _WITH_RUNC_CONF, "sh", str(conf), str(upper), str(work),
         *doctor],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={**os.environ, "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}, cwd=REPO,
    )  # fmt: skip
    assert done.stdout, done.stderr
    checks = {check["id"]: check for check in json.loads(done.stdout)["checks"]}
    for check_id in ("criu", "criu-config", "runtime-runc"):
        assert checks[check_id]["status"] == "ok", checks[check_id]
    assert f"{bin_dir}/criu, version 4.1.1" in checks["criu"]["found"]
    assert f"{action} (ours, zipapp, " in checks["criu-config"]["found"]
    assert f"/etc/criu/runc.conf names {action}" in checks["runtime-runc"]["found"]
    assert not Path("/etc/criu/runc.conf").exists() or Path("/etc/criu").is_dir()


def test_a_real_binary_under_root_runs_through_the_trees_own_loader(node: SimNode) -> None:
    if shutil.which("crun") is None or shutil.which("ldd") is None:
        pytest.skip("needs crun and ldd (apt-get install crun)")
    copy_with_libraries(node.root, "crun", "/usr/bin/crun")
    real = subprocess.run(["crun", "--version"], capture_output=True, text=True, check=True)
    version = real.stdout.split()[2]
    crun = node.checks()["runtime-crun"]
    assert crun["found"].startswith(f"/usr/bin/crun, version {version}"), crun
    # Without the tree's loader it is not run at all (never with this machine's loader).
    (node.root / "lib64/ld-linux-x86-64.so.2").unlink()
    crun = node.checks()["runtime-crun"]
    assert crun["status"] == "skip", crun
    assert "its interpreter /lib64/ld-linux-x86-64.so.2: not found" in crun["found"]


def test_a_host_view_on_the_command_line_is_not_the_daemons(node: SimNode) -> None:
    options = node.options("--format", "json")
    at = options.index("--socket")
    del options[at : at + 2]
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "doctor", *options],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    checks = {check["id"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["daemon"]["status"] == "skip", checks["daemon"]
    assert "the map is a direct scan" in checks["daemon"]["found"]
    assert checks["map"]["found"].startswith("a direct scan: ")
    assert done.returncode == 0
