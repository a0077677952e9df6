"""The DaemonSet's pod, simulated with the kernel's own pieces, as the manifest describes it.

Run as `python -m tests.kubernetes.podsim SPEC_JSON SCRATCH` under `unshare --mount
--propagation private` (tests.nsrun). This process plays the node: it first makes itself pid 1
of a PID namespace of its own (so `/proc/1` is the node's init, whose mount table lists host
paths), mounts a tmpfs on /run (its namespace only) and lays out the GPU Operator's driver
root there, a kubelet client key (0600) and a shadow file of its own over `/etc/shadow`, and
starts a root process with every capability (the victim).

SPEC.pod is the pod template's spec from the manifest. Each container (the init containers in
order, then the daemon) runs as a container runtime would run it:

- a mount namespace of its own, rooted (chroot) in a read-only tmpfs holding the "image": the
  system's /usr, this checkout, its interpreter and virtual environment, bound at their own
  paths (so a uid other than root runs this checkout even from a private 0700 directory);
- each of its `volumeMounts`: a hostPath bound (recursively, as runtimes bind) at its
  mountPath, made read-only at its top only when `readOnly` (what Kubernetes does without
  `recursiveReadOnly`) and a slave of the node's mount for `HostToContainer`; a configMap
  from a root-owned directory written as the kubelet writes it; an emptyDir as a tmpfs;
- a PID namespace of its own with its own /proc, unless `hostPID`;
- the container's uid and gid (its securityContext, else the pod's), and in its bounding set
  only the capabilities `drop: [ALL]` then `add:` leave, with no_new_privs (`setpriv`).

Host paths this machine lacks (NFD's features.d, the action's directory) are made in SCRATCH.
With the daemon ready, the attacks of a compromised daemon run in its container with its
privileges (podattack.py), the probe runs there too, and the host changes (a `nodev` remount, a
new mount on the dev root) the map must follow. One JSON line on stdout says what was seen.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kubernetes.podattack import DRIVER_ROOT, KUBELET_KEY, VICTIM
from tests.support.daemonproc import DaemonProcess
from tests.support.host import FakeHost
from tests.support.processes import REPO

DEV_ROOT = "/run/nvidia/driver/dev"
UVM = 509
NODES = {
    "nvidiactl": (195, 255),
    "nvidia0": (195, 0),
    "nvidia-uvm": (UVM, 0),
    "nvidia-uvm-tools": (UVM, 1),
}
SOCKET = "/run/gpu-device-watcher/gpu-device-watcher.sock"
# Where the simulation's fake /proc (the driver's files) is bound in the daemon's container.
SIM_PROC = "/sim/proc"
TIMEOUT = 20.0

_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def _run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True, timeout=TIMEOUT, capture_output=True)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")


def _setpriv(uid: int, gid: int, capabilities: list[str]) -> list[str]:
    bounding = ",".join(["-all", *(f"+{name.lower()}" for name in capabilities)])
    return [
        *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
        *(f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--"),
    ]


# --- a container, as a runtime makes it (runs as root in the node's namespaces) -------------


def _bind(source: Path, target: Path, *, read_only: bool, propagation: str) -> None:
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    _run("mount", "--rbind", source, target)
    _run("mount", f"--make-{propagation}", target)
    if read_only:
        _run("mount", "-o", "remount,bind,ro", target)


def _image_paths() -> list[Path]:
    """What the container's image holds: /usr, the interpreter, the venv, this checkout."""
    wanted = sorted({Path("/usr"), Path(sys.base_prefix), Path(sys.prefix), REPO})
    kept: list[Path] = []
    for path in wanted:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return kept


def _make_root(root: Path, mounts: list[dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", "mode=0755", "pod-root", root)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        node_path = Path("/") / name
        if node_path.is_symlink():
            (root / name).symlink_to(os.readlink(node_path))
        elif node_path.is_dir():
            _bind(node_path, root / name, read_only=True, propagation="rprivate")
    for name in ("etc", "tmp", "proc", "run"):
        (root / name).mkdir(exist_ok=True)
    _bind(Path("/sys"), root / "sys", read_only=True, propagation="rslave")
    (root / "dev").mkdir()
    _run("mount", "-t", "tmpfs", "-o", "mode=0755", "pod-dev", root / "dev")
    for device in ("null", "zero", "random", "urandom"):
        _bind(Path("/dev") / device, root / "dev" / device, read_only=False, propagation="rprivate")
    for volume in sorted(mounts, key=lambda m: str(m["target"])):
        target = root / str(volume["target"]).lstrip("/")
        if volume["source"] is None:
            target.mkdir(parents=True, exist_ok=True)
            _run("mount", "-t", "tmpfs", "-o", "mode=1777", "empty-dir", target)
            continue
        _bind(
            Path(volume["source"]),
            target,
            read_only=bool(volume["read_only"]),
            propagation=str(volume["propagation"]),
        )
    # The image last: a checkout under /tmp (a clone in a `mktemp -d` directory) stays
    # visible in a container that mounts an emptyDir there.
    for path in _image_paths():
        _bind(path, root / path.relative_to("/"), read_only=True, propagation="rprivate")
    # readOnlyRootFilesystem: the image and the mount points, never written.
    _run("mount", "-o", "remount,ro", root)


def _enter(root: Path, plan: dict[str, Any], environment: dict[str, str]) -> None:
    """In the container's first process: its own procfs (the node's with hostPID), its root,
    its privileges, its command."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc.mount(b"proc", os.fsencode(root / "proc"), b"proc", flags, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount proc: {os.strerror(error)}")
    os.chroot(root)
    os.chdir("/")
    command = [*_setpriv(plan["uid"], plan["gid"], plan["capabilities"]), *plan["command"]]
    os.execvpe(command[0], command, environment)  # noqa: S606 (no shell: argv as the runtime)


def container(plan_text: str) -> int:
    """Start one container of the plan; this process forwards signals and returns its exit."""
    plan = json.loads(plan_text)
    root = Path(plan["root"])
    _unshare(_CLONE_NEWNS)
    # Nothing the pod mounts reaches the node; the node's mounts reach the pod's slaves.
    _run("mount", "--make-rslave", "/")
    _make_root(root, plan["mounts"])
    if not plan["host_pid"]:
        _unshare(_CLONE_NEWPID)
    environment = {**os.environ, **plan["env"]}
    child = os.fork()
    if child == 0:
        try:
            _enter(root, plan, environment)
        except OSError as error:
            print(f"podsim: cannot start the container: {error}", file=sys.stderr, flush=True)
        os._exit(127)

    def forward(number: int, _frame: object) -> None:
        os.kill(child, number)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGCONT, signal.SIGHUP):
        signal.signal(number, forward)
    Path(plan["pid_file"]).write_text(str(child))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


# --- what the manifest says, turned into container plans ---------------------------------


def _host_paths(scratch: Path) -> dict[str, Path]:
    """Host paths the test machine lacks, made where the simulated kubelet keeps them."""
    return {
        "/etc/kubernetes/node-feature-discovery/features.d": scratch / "features.d",
        "/usr/local/libexec/gpu-device-watcher": scratch / "action",
    }


def _volume_source(volume: dict[str, Any], scratch: Path) -> Path | None:
    if "hostPath" in volume:
        path = str(volume["hostPath"]["path"])
        source = _host_paths(scratch).get(path, Path(path))
        if volume["hostPath"].get("type") == "DirectoryOrCreate":
            source.mkdir(mode=0o755, parents=True, exist_ok=True)
        return source
    if "configMap" in volume:
        return scratch / "configmap"
    if "emptyDir" in volume:
        return None
    raise AssertionError(f"podsim: no simulation of volume {volume}")


def _capabilities(context: dict[str, Any]) -> list[str]:
    capabilities = context.get("capabilities", {})
    assert capabilities.get("drop") == ["ALL"], f"not drop: [ALL]: {capabilities}"
    return list(capabilities.get("add", []))


def _command(spec: dict[str, Any], extra: list[str]) -> list[str]:
    """The container's command (the image's entrypoint is `gpu-device-watcher`), run from
    this checkout's interpreter."""
    words = [*spec.get("command", ["gpu-device-watcher"]), *spec.get("args", [])]
    if words[0] == "gpu-device-watcher":
        words = [sys.executable, "-m", "watcher", *words[1:]]
    return [*words, *extra]


def plan_for(
    pod: dict[str, Any], spec: dict[str, Any], scratch: Path, extra_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    context = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = [
        {
            "source": (
                None
                if (source := _volume_source(volumes[m["name"]], scratch)) is None
                else str(source)
            ),
            "target": m["mountPath"],
            "read_only": bool(m.get("readOnly", False)),
            "propagation": "rslave"
            if m.get("mountPropagation") == "HostToContainer"
            else "rprivate",
        }
        for m in spec.get("volumeMounts", [])
    ]
    name = str(spec["name"])
    extra = ["--proc", SIM_PROC] if spec.get("args", [""])[0] == "serve" else []
    return {
        "name": name,
        "root": str(scratch / "roots" / name),
        "pid_file": str(scratch / f"{name}.pid"),
        "uid": int(context.get("runAsUser", 0)),
        "gid": int(context.get("runAsGroup", 0)),
        "capabilities": _capabilities(context),
        "host_pid": bool(pod.get("hostPID", False)),
        "mounts": [*mounts, *extra_mounts],
        "env": {e["name"]: e["value"] for e in spec.get("env", [])},
        "command": _command(spec, extra),
    }


def _launcher(plan: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "tests.kubernetes.podsim", "container", json.dumps(plan)]


def _in_container(plan: dict[str, Any], *command: str) -> list[str]:
    """`command` in the running container's namespaces and root, with its privileges."""
    pid = Path(plan["pid_file"]).read_text()
    return [
        *("nsenter", f"--target={pid}", "--mount", "--pid", "--root", "--wd", "--"),
        *_setpriv(plan["uid"], plan["gid"], plan["capabilities"]),
        *command,
    ]


def _aftermath(victim: subprocess.Popen[bytes]) -> dict[str, Any]:
    """What the attacks left on the node, seen from the node."""
    try:
        state = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    return {
        "planted": sorted(
            path
            for path in (
                "/run/planted",
                "/run/nvidia/planted",
                f"{DRIVER_ROOT}/usr/bin/cuda-checkpoint",
            )
            if os.path.lexists(path)
        ),
        "victim": "gone" if victim.poll() is not None else state,
    }


# --- the node -------------------------------------------------------------------------------


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


def _lay_out_node(scratch: Path, spec: dict[str, Any]) -> FakeHost:
    _run("mount", "--make-rprivate", "/")
    node = FakeHost(Path("/"), scratch / "proc", scratch / "sys")
    node.tmpfs(scratch, options="", source="scratch")
    # The node's /run (shared, so its later mounts reach the pods' slave copies), the GPU
    # Operator's driver root in it, and fake /proc files for the driver.
    node.tmpfs("/run", source="run")
    _run("mount", "--make-shared", "/run")
    node.tmpfs(DRIVER_ROOT, source="driver")
    node.nodes(DEV_ROOT, NODES)
    Path(DRIVER_ROOT, "usr", "bin").mkdir(parents=True, mode=0o755)
    node.nvidia_proc({"nvidia": 195, "nvidia-uvm": UVM})
    # The node's secrets: a shadow file (0640) and a kubelet client key (0600), root's.
    shadow = scratch / "shadow"
    shadow.write_text("root:$6$simulated$hash:20000:0:99999:7:::\n")
    shadow.chmod(0o640)
    node.bind(shadow, "/etc/shadow")
    node.tmpfs("/var/lib", source="varlib")
    key = Path(KUBELET_KEY)
    key.parent.mkdir(parents=True, mode=0o755)
    key.write_text("-----BEGIN EC PRIVATE KEY-----\nsimulated\n-----END EC PRIVATE KEY-----\n")
    key.chmod(0o600)
    # NFD's features.d as the kubelet makes it (DirectoryOrCreate): root's, 0755.
    (scratch / "features.d").mkdir(mode=0o755)
    configmap = scratch / "configmap"
    configmap.mkdir(mode=0o755)
    config = configmap / "config.toml"
    config.write_text(str(spec.get("config", "")))
    config.chmod(int(spec.get("config_mode", 0o444)))
    return node


def _run_init_containers(pod: dict[str, Any], scratch: Path, result: dict[str, Any]) -> bool:
    for spec in pod.get("initContainers", []):
        plan = plan_for(pod, spec, scratch, [])
        done = subprocess.run(
            _launcher(plan), capture_output=True, text=True, timeout=60, check=False
        )
        result.setdefault("init", {})[spec["name"]] = done.returncode
        if done.returncode != 0:
            result["error"] = f"init container {spec['name']}: {done.stderr.strip()[-2000:]}"
            return False
    return True


def _owners(scratch: Path) -> dict[str, Any]:
    """Who owns what the init steps and the daemon made on the node."""
    found: dict[str, Any] = {}
    for path in (
        Path("/run/gpu-device-watcher"),
        scratch / "features.d",
        scratch / "action",
        *sorted((scratch / "action").glob("*")),
        *sorted((scratch / "features.d").glob("*")),
    ):
        if path.exists():
            info = path.lstat()
            found[str(path).replace(str(scratch), "SCRATCH")] = [
                info.st_uid,
                info.st_gid,
                oct(stat.S_IMODE(info.st_mode)),
            ]
    return found


def main(spec_text: str, scratch_text: str) -> int:
    if os.getpid() != 1:
        # Become the node's init: pid 1 of a PID namespace of our own, /proc its procfs.
        command = [
            *("unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--"),
            *sys.orig_argv,
        ]
        return subprocess.run(command, check=False, timeout=110).returncode
    spec = json.loads(spec_text)
    pod: dict[str, Any] = spec["pod"]
    scratch = Path(scratch_text)
    result: dict[str, Any] = {}
    node = _lay_out_node(scratch, spec)
    victim = subprocess.Popen(list(VICTIM))
    try:
        if not _run_init_containers(pod, scratch, result):
            result["ready"] = False
            return 0
        _serve(pod=pod, spec=spec, scratch=scratch, node=node, victim=victim, result=result)
    finally:
        victim.kill()
        victim.wait(TIMEOUT)
        result["owners"] = _owners(scratch)
        print(json.dumps(result), flush=True)
    return 0


def _serve(
    *,
    pod: dict[str, Any],
    spec: dict[str, Any],
    scratch: Path,
    node: FakeHost,
    victim: subprocess.Popen[bytes],
    result: dict[str, Any],
) -> None:
    (daemon_spec,) = pod["containers"]
    fake_proc = {"source": str(scratch / "proc"), "target": SIM_PROC}
    fake_proc |= {"read_only": True, "propagation": "rprivate"}
    plan = plan_for(pod, daemon_spec, scratch, [fake_proc])
    result["uid"], result["capabilities"] = plan["uid"], plan["capabilities"]
    virtualenv = str(Path(sys.executable).parent)
    environment = {
        "PATH": f"{virtualenv}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "GPU_DEVICE_WATCHER_MOUNT_EVENTS": "auto",
    }
    daemon = DaemonProcess(
        _launcher(plan),
        socket_path=SOCKET,
        environment=environment,
        log_path=scratch / "daemon.log",
        die_with_parent=True,
    )
    try:
        try:
            daemon.wait_ready(TIMEOUT)
        except AssertionError as error:
            result["ready"] = False
            result["error"] = str(error).splitlines()[0]
            return
        result["ready"] = True
        pid = int(Path(plan["pid_file"]).read_text())
        control = _control(daemon.get()["map"])
        result["first"] = {"mount": control["mount"], "valid": control["valid"]}
        # The readiness and liveness probe, in the container with its privileges.
        probe = subprocess.run(
            _in_container(plan, *_command({"command": ["gpu-device-watcher", "status"]}, [])),
            env=environment,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        result["probe"] = probe.returncode
        # Code execution in the container: each step of the review's attack.
        attacked = subprocess.run(
            _in_container(plan, sys.executable, "-m", "tests.kubernetes.podattack"),
            env=environment,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        lines = attacked.stdout.strip().splitlines()
        result["attack"] = json.loads(lines[-1]) if lines else {"error": attacked.stderr}
        result["aftermath"] = _aftermath(victim)
        # What the config turned on: the feature file, one scrape of the endpoint.
        result["features"] = sorted(os.listdir(scratch / "features.d"))
        result["owners_running"] = _owners(scratch)
        if "metrics_listen" in str(spec.get("config", "")):
            result["metrics"] = _scrape(str(spec["config"]))
        # The host remounts the driver root nodev: only the host's table shows it.
        node.remount(DRIVER_ROOT, "nodev")
        seen = daemon.wait_map(lambda m: _control(m)["mount"]["nodev"], TIMEOUT)
        result["nodev"] = [p["code"] for p in seen["problems"] if p["code"] == "nodev-mount"]
        # The pod's own copy of that mount: flags do not propagate, so the pod's table
        # (what it would read of its own) still says the mount allows devices.
        own = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        result["pod_copy_options"] = [
            line.split(" ")[5] for line in own if line.split(" ")[4] == "/host" + DRIVER_ROOT
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
        result["usage"] = _usage(pid)
    finally:
        result["exit"] = daemon.stop(timeout=TIMEOUT)
        daemon.close()
        result["log"] = daemon.log_text[-4000:]


if __name__ == "__main__":
    if sys.argv[1] == "container":
        sys.exit(container(sys.argv[2]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
