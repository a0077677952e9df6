"""The DaemonSet's pod, simulated with the kernel's own pieces, to measure what it needs.

Run as `python -m tests.kubernetes.podsim SPEC_JSON SCRATCH` under `unshare --mount
--propagation private` (tests.nsrun). This process plays the node: its namespace is "the
host", its own `/proc/PID/mountinfo` is the host init's table (host paths). It mounts a tmpfs
on /run (its namespace only) and lays out the GPU Operator's driver root there. The pod is a
second mount namespace made from this one, as a container runtime makes it:

- the host's `/` rbound read-only at `SCRATCH/host` and made a slave (`HostToContainer`),
- the same PID namespace (`hostPID`), so the host init's table is `/proc/<this pid>/mountinfo`,
- the daemon as uid SPEC.uid with only SPEC.capabilities in its bounding set (`setpriv`;
  `drop: [ALL]` plus `add:` in the manifest), no privilege escalation,
- `/run/gpu-device-watcher` shared with the host (here: the same tmpfs).

Then the host changes (a `nodev` remount, a new mount on the dev root) and the map must
follow; the readiness probe (`gpu-device-watcher status`) runs with the same privileges.
With SPEC.config (the text of a config.toml, written root-owned with SPEC.config_mode as the
kubelet writes a ConfigMap's file), the daemon reads it; its `nfd_features_file` may name
`{features}`, a root-owned directory of the node (mode 0755, as the kubelet's
`DirectoryOrCreate` makes it), and with `metrics_listen` the endpoint is scraped once. One
JSON line on stdout says what was seen, with the daemon's RSS and CPU time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from watcher import client

DRIVER_ROOT = "/run/nvidia/driver"
DEV_ROOT = "/run/nvidia/driver/dev"
UVM = 509
NODES = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-uvm": (UVM, 0),
    "nvidia-uvm-tools": (UVM, 1),
}
SOCKET = "/run/gpu-device-watcher/gpu-device-watcher.sock"
TIMEOUT = 20.0


def _run(*command: str) -> None:
    subprocess.run(command, check=True, timeout=TIMEOUT, capture_output=True)


def _mknods(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, (major, minor) in NODES.items():
        os.mknod(f"{directory}/{name}", 0o20666, os.makedev(major, minor))


def _proc(directory: Path) -> None:
    gpu = directory / "driver/nvidia/gpus/0000:3b:00.0"
    gpu.mkdir(parents=True)
    (directory / "devices").write_text(
        f"Character devices:\n  1 mem\n195 nvidia\n{UVM} nvidia-uvm\n\nBlock devices:\n  8 sd\n"
    )
    (directory / "driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build\n"
    )
    (gpu / "information").write_text(
        "Model: \t\t NVIDIA H200\nGPU UUID: \t GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f\n"
        "Bus Location: \t 0000:3b:00.0\nDevice Minor: \t 0\n"
    )


def _setpriv(uid: int, capabilities: list[str]) -> list[str]:
    bounding = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    return [
        *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
        *(f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--"),
    ]


def _pod(scratch: Path, uid: int, capabilities: list[str], *command: str) -> list[str]:
    """`command` in a fresh pod namespace: /host = the host's / (ro, rslave)."""
    host = scratch / "host"
    script = (
        'set -e; mkdir -p "$1"; mount --rbind / "$1"; mount --make-rslave "$1"; '
        'mount -o remount,bind,ro "$1"; shift; exec "$@"'
    )
    return [
        *("unshare", "--mount", "--propagation", "unchanged", "--"),
        *("sh", "-c", script, "sh", str(host)),
        *_setpriv(uid, capabilities),
        *command,
    ]


def _wait_ready(notify: socket.socket, process: subprocess.Popen[bytes]) -> str | None:
    """None once READY=1 arrives, else why not (bounded, woken by the datagram or the exit)."""
    pidfd = os.pidfd_open(process.pid)
    try:
        deadline = time.monotonic() + TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([notify.fileno(), pidfd], [], [], left)
            if pidfd in readable:
                return f"the daemon exited {process.wait(TIMEOUT)} before READY=1"
            if notify.fileno() in readable and b"READY=1" in notify.recv(4096).split(b"\n"):
                return None
        return f"no READY=1 in {TIMEOUT} s"
    finally:
        os.close(pidfd)


def _wait_map(predicate: Any, what: str) -> dict[str, Any]:
    """The first map satisfying `predicate`, woken by the daemon's `wait` replies."""
    deadline = time.monotonic() + TIMEOUT
    reply = client.request(SOCKET, {"op": "get"}, timeout=TIMEOUT)
    while not predicate(reply["map"]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what}: not within {TIMEOUT} s; last map {reply['map']}")
        try:
            reply = client.request(
                SOCKET,
                {"op": "wait", "after": reply["generation"], "timeout": left},
                timeout=left + 5,
            )
        except client.ServerError as error:
            if error.code != "timeout":
                raise
    result: dict[str, Any] = reply["map"]
    return result


def _control(device_map: dict[str, Any]) -> dict[str, Any]:
    for device in device_map["devices"]:
        if device["name"] == "nvidiactl":
            return dict(device)
    raise AssertionError(f"no nvidiactl in {device_map}")


def _usage(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return {"rss_mib": round(rss_kib / 1024, 1), "cpu_s": ticks / os.sysconf("SC_CLK_TCK")}


def _scrape(config_text: str) -> list[str]:
    """The names of the metric families the endpoint in `config_text` serves."""
    import http.client
    import tomllib

    host, _, port = str(tomllib.loads(config_text)["metrics_listen"]).rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    return sorted(
        {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        if response.status == 200
        else set()
    )


def main(spec_text: str, scratch_text: str) -> int:
    spec = json.loads(spec_text)
    uid, capabilities = int(spec["uid"]), list(spec["capabilities"])
    scratch = Path(scratch_text)
    result: dict[str, Any] = {"uid": uid, "capabilities": capabilities}
    # The node: a /run of its own (shared, so mounts reach the pod's slave copy), the
    # GPU Operator's driver root in it, and fake /proc files for the driver.
    _run("mount", "--make-rprivate", "/")
    _run("mount", "-t", "tmpfs", "scratch", str(scratch))
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "run", "/run")
    _run("mount", "--make-shared", "/run")
    os.makedirs(DRIVER_ROOT)
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "driver", DRIVER_ROOT)
    _mknods(DEV_ROOT)
    _proc(scratch / "proc")
    notify_path = scratch / "notify"
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "NOTIFY_SOCKET": str(notify_path),
        "GPU_DEVICE_WATCHER_MOUNT_EVENTS": "auto",
    }
    features = scratch / "features.d"
    features.mkdir(mode=0o755)
    config = scratch / "config.toml"
    config.write_text(str(spec.get("config", "")).replace("{features}", str(features)))
    config.chmod(int(spec.get("config_mode", 0o644)))
    serve = [
        *(sys.executable, "-m", "watcher", "serve", "--root", str(scratch / "host")),
        *("--proc", str(scratch / "proc"), "--mountinfo", f"/proc/{os.getpid()}/mountinfo"),
        *("--config", str(config)),
    ]
    log_path = scratch / "daemon.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, log_path.open("wb") as log:
        notify.bind(str(notify_path))
        os.chmod(notify_path, 0o777)  # noqa: S103 (reachable for a daemon that is not root)
        daemon = subprocess.Popen(
            _pod(scratch, uid, capabilities, *serve),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        try:
            why = _wait_ready(notify, daemon)
            if why is not None:
                result["ready"] = False
                result["error"] = why
                return 0
            result["ready"] = True
            control = _control(client.request(SOCKET, {"op": "get"}, timeout=TIMEOUT)["map"])
            result["first"] = {"mount": control["mount"], "valid": control["valid"]}
            # The readiness and liveness probe, with the pod's privileges.
            probe = subprocess.run(
                [*_setpriv(uid, capabilities), sys.executable, "-m", "watcher", "status"],
                env=environment,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            result["probe"] = probe.returncode
            # What the config turned on: the feature file in the root-owned directory, and
            # one scrape of the endpoint.
            result["features"] = sorted(os.listdir(features))
            if "metrics_listen" in str(spec.get("config", "")):
                result["metrics"] = _scrape(str(spec["config"]))
            # The host remounts the driver root nodev: only the host's table shows it.
            _run("mount", "-o", "remount,nodev", DRIVER_ROOT)
            seen = _wait_map(lambda m: _control(m)["mount"]["nodev"], "nodev remount")
            result["nodev"] = [p["code"] for p in seen["problems"] if p["code"] == "nodev-mount"]
            # The pod's own copy of that mount: flags do not propagate, so the pod's table
            # (what it would read without hostPID) still says the mount allows devices.
            copy = f"{scratch}/host{DRIVER_ROOT}"
            own = Path(f"/proc/{daemon.pid}/mountinfo").read_text().splitlines()
            result["pod_copy_options"] = [
                line.split(" ")[5] for line in own if line.split(" ")[4] == copy
            ]
            _run("mount", "-o", "remount,dev", DRIVER_ROOT)
            _wait_map(lambda m: _control(m)["valid"], "dev remount")
            # A new mount on the host's dev root reaches the pod (HostToContainer).
            _run("mount", "-t", "tmpfs", "-o", "mode=755", "devroot", DEV_ROOT)
            _mknods(DEV_ROOT)
            seen = _wait_map(
                lambda m: _control(m)["mount"]["mount_point"] == DEV_ROOT, "new dev root mount"
            )
            result["remounted"] = {
                "mount": _control(seen)["mount"],
                "valid": _control(seen)["valid"],
            }
            result["usage"] = _usage(daemon.pid)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            result["exit"] = daemon.wait(TIMEOUT)
            result["log"] = log_path.read_text(errors="replace")[-4000:]
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
