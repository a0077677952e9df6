"""The Podman part of tests/criu/test_podman.py, run inside a private mount namespace.

`unshare --mount --propagation private -- python -m tests.criu.podman_scenario SPEC.json`

Podman hands CRIU an environment of its own (PATH and XDG_RUNTIME_DIR, nothing else), so the
action finds the daemon at the default socket, /run/gpu-device-watcher/gpu-device-watcher.sock,
and CRIU's config at /etc/criu/runc.conf. Both exist only here: /etc and /run get an overlay
whose upper layer is in the scratch directory, so nothing reaches the machine's own (Podman's
/run/libpod, /run/runc and /run/containers land there too). "Being on node X" is that socket
leading to X's daemon (a symlink, replaced between steps).

The steps, each recorded in RESULT.json for the test to judge: import the image, run the
container on node A holding /dev/nvidia0 (this machine's /dev/zero, A's nvidia5), export a
zstd checkpoint; on node C (another GPU model) `restore --import`, which the gate must stop;
on node A the same import, which must succeed with the device held again; then a second
checkpoint exported with `--compress none`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT = 180.0
SOCKET_DIR = Path("/run/gpu-device-watcher")
CONTAINER = "gdw-podman-e2e"


def overlay(target: str, upper: Path, work: Path) -> None:
    upper.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "gdw-" + target.strip("/"),
            "-o",
            f"lowerdir={target},upperdir={upper},workdir={work}",
            target,
        ],
        check=True,
        timeout=TIMEOUT,
    )


def _private_etc_and_run(spec: dict[str, Any], scratch: Path) -> Path:
    """/etc (holding criu/runc.conf naming the action) and /run as overlays on this
    namespace's own; returns where the daemon's default socket link goes."""
    etc_upper = scratch / "etc-upper"
    (etc_upper / "criu").mkdir(parents=True, exist_ok=True)
    (etc_upper / "criu" / "runc.conf").write_text(f"action-script {spec['action']}\n")
    overlay("/etc", etc_upper, scratch / "etc-work")
    overlay("/run", scratch / "run-upper", scratch / "run-work")
    SOCKET_DIR.mkdir(exist_ok=True)
    return SOCKET_DIR / "gpu-device-watcher.sock"


def _held_device(step: Callable[..., subprocess.CompletedProcess[str]]) -> list[int] | None:
    """The major and minor of the device the container's process holds on fd 3, if any."""
    inspected = step("inspect", "inspect", "--format", "{{.State.Pid}}", CONTAINER)
    if inspected.returncode != 0 or not inspected.stdout.strip().isdigit():
        return None
    pid = int(inspected.stdout.strip())
    if pid == 0:
        return None
    try:
        rdev = os.stat(f"/proc/{pid}/fd/3").st_rdev
    except OSError:
        return None
    return [os.major(rdev), os.minor(rdev)]


def main(spec_path: str) -> int:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    scratch = Path(spec["scratch"])
    link = _private_etc_and_run(spec, scratch)

    def on_node(name: str) -> None:
        link.unlink(missing_ok=True)
        link.symlink_to(spec["sockets"][name])

    podman = [
        "podman",
        *("--root", str(scratch / "storage"), "--runroot", str(scratch / "runroot")),
        *("--tmpdir", str(scratch / "libpod"), "--storage-driver", "vfs"),
        *("--cgroup-manager", "cgroupfs", "--events-backend", "none", "--runtime", "runc"),
    ]
    env = {"PATH": spec["path"], "HOME": str(scratch)}
    results: dict[str, Any] = {}

    def step(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*podman, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        results[name] = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        return done

    def restore_logs() -> list[str]:
        return [
            path.read_text(errors="replace")
            for path in sorted((scratch / "storage").rglob("restore.log"))
        ]

    try:
        if step("import", "import", spec["image_tar"], "gdw-podman-e2e:1").returncode != 0:
            return 0
        on_node("A")
        run = step(
            "run",
            *("run", "--detach", "--name", CONTAINER, "--network", "none"),
            # runc cannot set RLIMIT_NOFILE/NPROC from the defaults in this sandbox.
            *("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"),
            *("--device", "/dev/zero:/dev/nvidia0"),
            "gdw-podman-e2e:1",
            *("sh", "-c", "exec 3</dev/nvidia0; exec sleep 1000"),
        )
        if run.returncode != 0:
            return 0
        results["held_before"] = _held_device(step)
        zstd = spec["archives"]["zstd"]
        if step(
            "checkpoint_zstd", "container", "checkpoint", "--export", zstd, CONTAINER
        ).returncode:
            return 0
        step("rm_after_checkpoint", "rm", "--force", CONTAINER)

        on_node("C")
        step("restore_on_c", "container", "restore", "--import", zstd)
        results["restore_logs_c"] = restore_logs()
        results["held_on_c"] = _held_device(step)
        step("ps_after_c", "ps", "--all", "--format", "{{.Names}} {{.State}}")
        step("rm_after_c", "rm", "--force", "--ignore", CONTAINER)

        on_node("A")
        step("restore_on_a", "container", "restore", "--import", zstd)
        results["held_on_a"] = _held_device(step)
        results["restore_logs_a"] = restore_logs()
        plain = spec["archives"]["plain"]
        step(
            "checkpoint_plain",
            *("container", "checkpoint", "--export", plain, "--compress", "none", CONTAINER),
        )
    finally:
        step("cleanup", "rm", "--all", "--force")
        Path(spec["result"]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
