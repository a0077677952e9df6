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
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.daemonproc import DaemonProcess
from tests.support.host import FakeHost

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
    node = FakeHost(Path("/"), scratch / "proc", scratch / "sys")
    node.tmpfs(scratch, options="", source="scratch")
    node.tmpfs("/run", source="run")
    _run("mount", "--make-shared", "/run")
    node.tmpfs(DRIVER_ROOT, source="driver")
    node.nodes(DEV_ROOT, NODES)
    node.nvidia_proc({"nvidia": 195, "nvidia-uvm": UVM})
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
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
    # The notify socket is abstract: a daemon that is not root can send to it.
    daemon = DaemonProcess(
        _pod(scratch, uid, capabilities, *serve),
        socket_path=SOCKET,
        environment=environment,
        log_path=scratch / "daemon.log",
    )
    try:
        try:
            daemon.wait_ready(TIMEOUT)
        except AssertionError as error:
            result["ready"] = False
            result["error"] = str(error).splitlines()[0]
            return 0
        result["ready"] = True
        control = _control(daemon.get()["map"])
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
        node.remount(DRIVER_ROOT, "nodev")
        seen = daemon.wait_map(lambda m: _control(m)["mount"]["nodev"], TIMEOUT)
        result["nodev"] = [p["code"] for p in seen["problems"] if p["code"] == "nodev-mount"]
        # The pod's own copy of that mount: flags do not propagate, so the pod's table
        # (what it would read without hostPID) still says the mount allows devices.
        copy = f"{scratch}/host{DRIVER_ROOT}"
        own = Path(f"/proc/{daemon.pid}/mountinfo").read_text().splitlines()
        result["pod_copy_options"] = [
            line.split(" ")[5] for line in own if line.split(" ")[4] == copy
        ]
        node.remount(DRIVER_ROOT, "dev")
        daemon.wait_map(lambda m: _control(m)["valid"], TIMEOUT)
        # A new mount on the host's dev root reaches the pod (HostToContainer).
        node.tmpfs(DEV_ROOT, source="devroot")
        node.nodes(DEV_ROOT, NODES)
        seen = daemon.wait_map(lambda m: _control(m)["mount"]["mount_point"] == DEV_ROOT, TIMEOUT)
        result["remounted"] = {
            "mount": _control(seen)["mount"],
            "valid": _control(seen)["valid"],
        }
        result["usage"] = _usage(daemon.pid)
    finally:
        result["exit"] = daemon.stop(timeout=TIMEOUT)
        daemon.close()
        result["log"] = daemon.log_text[-4000:]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
