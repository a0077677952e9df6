"""End to end through a container runtime: Debian's runc checkpoints and restores a container
whose process holds a simulated GPU node, with CRIU 4.1.1 (`runc --criu PATH`) and the
action configured the way runc users configure it: `action-script` in /etc/criu/runc.conf.

The action is the self-contained file `install-action` writes (what the DaemonSet puts on a
node), run by CRIU on the system's python3. /etc/criu/runc.conf exists only inside a private
mount namespace around each runc command (bound over /etc/criu, or an overlay on /etc when
the machine has no /etc/criu), so the machine's configuration is untouched.

The container opens its own `/dev/nvidia0`, made with the numbers of this machine's
/dev/zero (1:5); the simulated host (simhost.py) calls that device `nvidia5` at host path
`/dev/nvidia5`, which is what the record must say. A second simulated host without that GPU
must stop the restore at pre-restore.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.rootfs import copy_with_libraries

from .harness import Criu, alive
from .simhost import DEV_FULL, NVIDIA_MAJOR, Gpu, HostSpec, SimHost

pytestmark = pytest.mark.criu

RECORD = "gpu-device-watcher.json"
CONTAINER = "gdw-runc-e2e"
TIMEOUT = 120.0
# Inside the private namespace: runc.conf at /etc/criu, then the runc command.
_WITH_CONFIG = """\
set -e
conf=$1 upper=$2 work=$3; shift 3
if [ -d /etc/criu ]; then
    mount --bind "$conf" /etc/criu
else
    mkdir -p "$upper/criu" && cp "$conf/runc.conf" "$upper/criu/"
    mount -t overlay gdw-etc -o "lowerdir=/etc,upperdir=$upper,workdir=$work" /etc
fi
exec "$@"
"""


@dataclass(frozen=True)
class RuncRun:
    returncode: int
    log: str


class Runc:
    """runc with its own state directory, each command in a fresh private mount namespace."""

    def __init__(self, criu: Path, scratch: Path, conf: Path) -> None:
        self.criu = criu
        self.scratch = scratch
        self.conf = conf
        self.state = scratch / "runc-state"
        self.state.mkdir()
        self._count = 0

    def __call__(self, *args: str, env: Mapping[str, str], timeout: float = TIMEOUT) -> RuncRun:
        self._count += 1
        # A fresh upper and work directory each time: the container's mount namespace,
        # copied from the one runc ran in, keeps the previous overlay busy.
        upper, work = self.scratch / f"upper{self._count}", self.scratch / f"work{self._count}"
        upper.mkdir()
        work.mkdir()
        log = self.scratch / f"runc{self._count}.log"
        done = subprocess.run(
            [
                *("unshare", "--mount", "--propagation", "private", "--"),
                *("sh", "-c", _WITH_CONFIG, "sh", str(self.conf), str(upper), str(work)),
                *("runc", "--root", str(self.state), "--criu", str(self.criu)),
                *("--log", str(log), *args),
            ],
            env=dict(env),
            # The container inherits runc's stdio: a pipe would never close, and CRIU
            # cannot dump one that is a host file. runc's own errors go to --log.
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        return RuncRun(done.returncode, log.read_text(errors="replace") if log.exists() else "")

    def pid(self, env: Mapping[str, str]) -> int | None:
        done = subprocess.run(
            ["runc", "--root", str(self.state), "state", CONTAINER],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            return None
        state = json.loads(done.stdout)
        return int(state["pid"]) if state.get("status") == "running" else None

    def remove(self, env: Mapping[str, str]) -> None:
        subprocess.run(
            ["runc", "--root", str(self.state), "delete", "--force", CONTAINER],
            env=dict(env),
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )


def _bundle(directory: Path) -> Path:
    rootfs = directory / "rootfs"
    for program in ("sh", "sleep"):
        copy_with_libraries(rootfs, program)
    for name in ("dev", "proc", "sys", "tmp"):
        (rootfs / name).mkdir(exist_ok=True)
    subprocess.run(["runc", "spec"], cwd=directory, check=True, timeout=TIMEOUT)
    config = json.loads((directory / "config.json").read_text())
    config["process"]["terminal"] = False
    # Holds the container's own /dev/nvidia0 open on fd 3, as a CUDA process holds its nodes.
    config["process"]["args"] = ["sh", "-c", "exec 3</dev/nvidia0; exec sleep 1000"]
    config["root"]["readonly"] = False
    major, minor = NVIDIA_MAJOR, 5  # this machine's /dev/zero: the simulated host's nvidia5
    config["linux"]["devices"] = [
        {"path": "/dev/nvidia0", "type": "c", "major": major, "minor": minor, "fileMode": 0o666}
    ]
    config["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
    )
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


@pytest.fixture
def scratch() -> Iterator[Path]:
    for tool in ("runc", "ldd", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install runc; .ci/run does)")
    directory = Path(tempfile.mkdtemp(prefix="gdw-runc-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _action_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "gpu-device-watcher: " in line]


def _a_host_with_another_gpu_model(make_host: Callable[..., SimHost]) -> SimHost:
    """Another host: the same driver, but a GPU of another model, which no device map can
    stand in for."""
    return make_host(
        HostSpec(
            nodes={"nvidiactl": (NVIDIA_MAJOR, 255), "nvidia7": DEV_FULL},
            gpus=[
                Gpu(
                    "0000:5d:00.0",
                    7,
                    model="NVIDIA A100-SXM4-80GB",
                    uuid="GPU-0b2d4e6f-8a1c-3e5f-7a9b-1c3d5e7f9a2b",
                )
            ],
        ),
        name="elsewhere",
    )


def _runc_with_the_installed_action(criu: Criu, scratch: Path) -> Runc:
    """The action as the DaemonSet's init container installs it, and runc's CRIU config."""
    actions = scratch / "libexec"
    actions.mkdir()
    installed = subprocess.run(
        [sys.executable, "-m", "watcher", "install-action", str(actions)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    conf = scratch / "etc-criu"
    conf.mkdir()
    (conf / "runc.conf").write_text(f"action-script {actions / 'gpu-device-watcher-criu-action'}\n")
    return Runc(criu.binary, scratch, conf)


def _the_gate_refuses_it_elsewhere(
    runc: Runc, scratch: Path, images: Path, bundle: Path, env_elsewhere: dict[str, str]
) -> None:
    """A host without a GPU of that model: the gate stops the restore before any process
    exists."""
    refused_work = scratch / "work-refused"
    refused = runc(
        *("restore", "--detach", "--image-path", str(images)),
        *("--work-path", str(refused_work), "--bundle", str(bundle), CONTAINER),
        env=env_elsewhere,
    )
    refused_log = (refused_work / "restore.log").read_text(errors="replace")
    assert refused.returncode != 0, refused_log[-4000:]
    reasons = _action_lines(refused_log)
    assert any("gpu-model" in line and "nvidia5" in line for line in reasons), refused_log
    assert any("restore stopped" in line for line in reasons), refused_log
    assert runc.pid(env_elsewhere) is None
    runc.remove(env_elsewhere)


def test_runc_checkpoint_and_restore_with_the_installed_action(
    criu: Criu,
    make_host: Callable[..., SimHost],
    scratch: Path,
) -> None:
    here = make_host(name="here")
    elsewhere = _a_host_with_another_gpu_model(make_host)
    runc = _runc_with_the_installed_action(criu, scratch)
    bundle = _bundle(scratch / "bundle")
    base_env = {
        # The system's python3 runs the action (/usr/bin first): nothing of ours is there.
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "GPU_DEVICE_WATCHER_CONFIG": str(scratch / "absent.toml"),
    }
    env_here = {**base_env, "GPU_DEVICE_WATCHER_SOCKET": str(here.socket)}
    env_elsewhere = {**base_env, "GPU_DEVICE_WATCHER_SOCKET": str(elsewhere.socket)}
    try:
        started = runc("run", "--detach", "--bundle", str(bundle), CONTAINER, env=env_here)
        assert started.returncode == 0, started.log
        pid = runc.pid(env_here)
        assert pid is not None

        # Checkpoint: CRIU runs the action from runc.conf; the record lands in the images.
        images, work = scratch / "images", scratch / "work-dump"
        began = time.monotonic()
        dumped = runc(
            *("checkpoint", "--image-path", str(images), "--work-path", str(work)),
            CONTAINER,
            env=env_here,
        )
        dump_seconds = time.monotonic() - began
        dump_log = (work / "dump.log").read_text(errors="replace") if work.exists() else ""
        assert dumped.returncode == 0, f"{dumped.log}\n{dump_log[-4000:]}"
        assert not alive(pid)
        record = json.loads((images / RECORD).read_text())
        assert [(u["name"], u["path"], u["via"]) for u in record["used"]] == [
            ("nvidia5", "/dev/nvidia5", ["fd"])
        ], record["used"]
        assert any("recorded generation" in line for line in _action_lines(dump_log)), dump_log

        _the_gate_refuses_it_elsewhere(runc, scratch, images, bundle, env_elsewhere)

        # The host it came from takes it back: the process holds /dev/nvidia0 again.
        restore_work = scratch / "work-restore"
        began = time.monotonic()
        restored = runc(
            *("restore", "--detach", "--image-path", str(images)),
            *("--work-path", str(restore_work), "--bundle", str(bundle), CONTAINER),
            env=env_here,
        )
        restore_seconds = time.monotonic() - began
        restore_log = (restore_work / "restore.log").read_text(errors="replace")
        assert restored.returncode == 0, f"{restored.log}\n{restore_log[-4000:]}"
        assert any("restore may go on" in line for line in _action_lines(restore_log))
        pid = runc.pid(env_here)
        assert pid is not None
        held = Path(f"/proc/{pid}/fd/3").stat()
        assert (held.st_rdev >> 8, held.st_rdev & 0xFF) == (NVIDIA_MAJOR, 5)
        print(f"runc checkpoint {dump_seconds:.2f} s, restore {restore_seconds:.2f} s")
    finally:
        runc.remove(env_here)
