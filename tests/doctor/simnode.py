"""A simulated GPU Operator node for `doctor`: a tree under --root with the tools CRIU's chain
needs, as small shell scripts that print what the real tools print.

The formats, from the real tools: `criu --version` prints `Version: 4.1.1` (CRIU 4.1.1, the
one the suite runs) and `criu --help` names the plugin directory as `-L|--libdir  path to a
plugin directory (by default /usr/lib/criu/)`; `runc --version` and `crun --version` as
Debian's runc 1.1.5 and crun 1.8.1 print them (crun's last line lists its features, `+CRIU`
when it was built with CRIU); `containerd --version` is `containerd <module> v<version>
<commit>`; `crio --version` starts with `crio version X.Y.Z`. cuda-checkpoint's help is
NVIDIA's (the README of NVIDIA/cuda-checkpoint, driver 570), with the 580 driver's
`--device-map` option added for the 580 binary.

The node: the driver container's root at /run/nvidia/driver with its nodes and its
cuda-checkpoint (driver 580.95.05, one H200), the host's /dev holding a link to its nvidiactl
(what CRIU's CUDA plugin looks for), CRIU 4.1.1 with its CUDA plugin in /usr/lib/criu, runc, crun
with CRIU, containerd 2.1 and CRI-O with their systemd units (containerd's PATH set by
`Environment=` in the unit, CRI-O's in a drop-in), CRI-O's checkpoint support on, our action
installed where the DaemonSet puts it (with the cuda-checkpoint wrapper beside it) and named
in /etc/criu/runc.conf and crun.conf, a link to that wrapper first on every PATH, and a
current NFD feature file. Every check is `ok` on it but `daemon` (none runs); each test
breaks one part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.host import FakeHost

TIMEOUT = 60.0
DRIVER = "/run/nvidia/driver"
ACTION_DIR = "/usr/local/libexec/gpu-device-watcher"
ACTION = f"{ACTION_DIR}/gpu-device-watcher-criu-action"
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
NODES = {"nvidiactl": (195, 255), "nvidia0": (195, 0), "nvidia-uvm": (509, 0),
         "nvidia-uvm-tools": (509, 1)}  # fmt: skip

CUDA_HELP_570 = """\
CUDA checkpoint and restore utility.
Version 570.86.10. Copyright (C) 2025 NVIDIA Corporation. All rights reserved.

Operations:
--get-state --pid <pid>
        Prints the current checkpoint state of the process specified by <pid>

--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>]
        Performs the specified action on <pid>.
        For the lock action a timeout can be provided, the lock operation will wait up to \
<ms> milliseconds for the operation to succeed.

--toggle --pid <pid>
        Toggles the CUDA state in the specified process between the running and \
checkpointed states

--get-restore-tid --pid <pid>
        Retrieves the CUDA restore thread ID of the process specified by <pid>

Options:
--pid|-p <pid>
        The pid upon which to perform the operation

--timeout|-t <timeout>
        Optional timeout that can be specified for the lock action in milliseconds

--help|-h
        Print this help message
"""
CUDA_HELP_580 = CUDA_HELP_570.replace("570.86.10", "580.95.05").replace(
    "Options:\n",
    "--device-map <oldUuid=newUuid,...>\n"
    "        With --action restore: restore onto the GPUs named by the new UUIDs\n\nOptions:\n",
)
# An old driver's binary: no --action (CRIU's plugin needs r555 or later).
CUDA_HELP_550 = """\
CUDA checkpoint and restore utility.
Version 550.54.14. Copyright (C) 2024 NVIDIA Corporation. All rights reserved.

--toggle --pid <pid>
        Toggles the CUDA state in the specified process between the running and \
checkpointed states
--help|-h
        Print this help message
"""

CRIU_HELP = """\
Usage:
  criu dump|pre-dump -t PID [<options>]
  criu restore [<options>]
...
  --action-script FILE  add an external action script
  -L|--libdir           path to a plugin directory (by default /usr/lib/criu/)
"""
RUNC_VERSION = """\
runc version 1.1.5+ds1
commit: 1.1.5+ds1-1+deb12u1
spec: 1.0.2-dev
go: go1.19.8
libseccomp: 2.5.4
"""
CRUN_FEATURES = "+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP +EBPF +CRIU +YAJL"


def crun_version(version: str = "1.26", features: str = CRUN_FEATURES) -> str:
    return (
        f"crun version {version}\ncommit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30\n"
        f"rundir: /run/crun\nspec: 1.0.0\n{features}\n"
    )


def containerd_version(version: str = "2.1.4") -> str:
    return (
        f"containerd github.com/containerd/containerd/v2 v{version} "
        "75cb2b7193e4e490e9fbdc236c0e811ccaba3376\n"
    )


def crio_version(version: str = "1.33.2") -> str:
    return f"crio version {version}\nVersion:        {version}\nGitCommit:      unknown\n"


def tool_script(answers: dict[str, str], *, other: int = 1) -> str:
    """A /bin/sh script that prints answers[first argument], else exits `other`."""
    lines = ["#!/bin/sh", 'case "$1" in']
    for flags, text in answers.items():
        quoted = text.replace("'", "'\\''")
        lines.append(f"{flags}) printf '%s' '{quoted}' ;;")
    lines += [f"*) exit {other} ;;", "esac", ""]
    return "\n".join(lines)


def criu_script(version: str = "4.1.1") -> str:
    return tool_script({"--version|-V": f"Version: {version}\n", "-h|--help": CRIU_HELP})


WRAPPER = f"{ACTION_DIR}/cuda-checkpoint"


def wrapper_script() -> bytes:
    """The wrapper `install-action` writes beside the action."""
    from watcher.criu.actionfile import wrapper_bytes

    return wrapper_bytes()


def link_wrapper(node: SimNode, directory: str = "/usr/local/sbin") -> None:
    """The /usr/local/sbin setup: a link to install-action's wrapper, first on every PATH."""
    node.fs(directory).mkdir(parents=True, exist_ok=True)
    node.fs(f"{directory}/cuda-checkpoint").symlink_to(WRAPPER)


CONTAINERD_UNIT = f"""\
[Unit]
Description=containerd container runtime

[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/bin/containerd
Environment="PATH={SERVICE_PATH}" "GOTRACEBACK=crash"
Restart=always
"""
CRIO_UNIT = """\
[Unit]
Description=Container Runtime Interface for OCI (CRI-O)

[Service]
ExecStart=/usr/bin/crio $CRIO_CONFIG_OPTIONS
Restart=on-failure
"""
CRIO_DROPIN = f'[Service]\nEnvironment="PATH={SERVICE_PATH}"\n'


@dataclass
class SimNode:
    base: Path
    host: FakeHost
    config: Path
    features: Path
    mountinfo: Path

    @property
    def root(self) -> Path:
        return self.host.root

    def fs(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def write(self, host_path: str, text: str | bytes, mode: int = 0o644) -> None:
        path = self.fs(host_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        path.chmod(mode)

    def tool(self, host_path: str, text: str | bytes) -> None:
        self.write(host_path, text, 0o755)

    def remove(self, host_path: str) -> None:
        self.fs(host_path).unlink()

    def options(self, *extra: str) -> list[str]:
        return [
            *("--root", str(self.root), "--proc", str(self.host.proc)),
            *("--sys", str(self.host.sys), "--mountinfo", str(self.mountinfo)),
            *("--config", str(self.config), "--socket", str(self.base / "no-daemon.sock")),
            *extra,
        ]

    def doctor(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "watcher", "doctor", *self.options(*extra)],
            capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env,
        )  # fmt: skip

    def checks(self) -> dict[str, dict[str, Any]]:
        done = self.doctor("--format", "json")
        assert done.returncode in (0, 1), done.stderr
        return {check["id"]: check for check in json.loads(done.stdout)["checks"]}

    def write_labels(self) -> None:
        """The feature file the daemon would write for this node's map now."""
        from watcher.config import resolve_settings
        from watcher.probe import scan
        from watcher.publish.labels import compute_labels, render

        settings = resolve_settings(
            {"root": str(self.root), "proc": str(self.host.proc), "sys": str(self.host.sys),
             "mountinfo": str(self.mountinfo), "config": str(self.config)}
        )  # fmt: skip
        device_map = scan(settings.view)
        self.features.write_bytes(render(compute_labels(device_map)))


def build(base: Path, action: bytes) -> SimNode:
    """The node every test starts from (see the module's doc)."""
    host = FakeHost.under(base)
    # Directories a root-owned tree would have: 0755, so that doctor runs its tools.
    os.umask(0o022)
    host.operator_host(NODES, mounted=False)
    host.nvidia_proc({"nvidia": 195, "nvidia-uvm": 509})
    # What CRIU's CUDA plugin looks for (access(2), links followed) on an Operator node.
    host.symlink("/dev/nvidiactl", f"{DRIVER}/dev/nvidiactl")
    mountinfo = base / "mountinfo"
    mountinfo.write_text(f"1 0 0:1 / {base} rw - tmpfs tmpfs rw\n")
    features = base / "features"
    config = base / "config.toml"
    config.write_text(f'nfd_features_file = "{features}"\n')
    config.chmod(0o600)
    node = SimNode(base, host, config, features, mountinfo)

    node.tool("/usr/sbin/criu", criu_script())
    node.write("/usr/lib/criu/cuda_plugin.so", b"\x7fELF plugin stand-in")
    node.tool("/usr/sbin/runc", tool_script({"--version|-v": RUNC_VERSION}))
    node.tool("/usr/bin/crun", tool_script({"--version": crun_version()}))
    node.tool("/usr/bin/containerd", tool_script({"--version|-v": containerd_version()}))
    node.tool("/usr/bin/crio", tool_script({"--version|-v": crio_version()}))
    node.write("/etc/systemd/system/containerd.service", CONTAINERD_UNIT)
    node.write("/usr/lib/systemd/system/crio.service", CRIO_UNIT)
    node.write("/etc/systemd/system/crio.service.d/10-path.conf", CRIO_DROPIN)
    node.write("/etc/crio/crio.conf", '[crio.runtime]\ndefault_runtime = "runc"\n')
    node.write(
        "/etc/crio/crio.conf.d/05-checkpoint.conf", "[crio.runtime]\nenable_criu_support = true\n"
    )
    node.write(ACTION, action, 0o755)
    node.write("/etc/criu/runc.conf", f"# gpu-device-watcher\naction-script {ACTION}\n")
    node.write("/etc/criu/crun.conf", f"action-script={ACTION}\n")
    node.write("/etc/criu/default.conf", f'--action-script "{ACTION}"\n')
    node.tool(f"{DRIVER}/usr/bin/cuda-checkpoint", tool_script({"-h|--help": CUDA_HELP_580}))
    node.write(WRAPPER, wrapper_script(), 0o755)
    link_wrapper(node)
    node.write_labels()
    return node
