"""Each check and status on the simulated GPU Operator node: one part broken, the check's
status and its fix line, then the part repaired as the fix says and the check back to what
the whole node gives."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.doctor import simnode
from tests.doctor.simnode import ACTION, DRIVER, SimNode
from tests.support.host import mknod, proc_devices_text, version_text
from watcher.cli import main


def run_doctor(node: SimNode, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    code = main(["doctor", *node.options("--format", "json")])
    out = capsys.readouterr().out
    report = json.loads(out)
    checks = {check["id"]: check for check in report["checks"]}
    assert code == (1 if report["summary"]["fail"] else 0)
    return checks


# What the whole node gives: no daemon runs.
BASE = {
    "daemon": "warn",
    "map": "ok",
    "criu": "ok",
    "criu-config": "ok",
    "criu-plugin": "ok",
    "cuda-checkpoint": "ok",
    "runtime-runc": "ok",
    "runtime-crun": "ok",
    "runtime-crio": "ok",
    "runtime-containerd": "ok",
    "labels": "ok",
}


def test_the_whole_node(node: SimNode, capsys: pytest.CaptureFixture[str]) -> None:
    checks = run_doctor(node, capsys)
    assert {key: check["status"] for key, check in checks.items()} == BASE
    assert list(checks) == list(BASE)  # the contract's order
    for check in checks.values():
        assert (check["fix"] is not None) == (check["status"] in ("warn", "fail")), check
    assert "systemctl enable --now gpu-device-watcher.socket" in checks["daemon"]["fix"]
    assert "not-in-dev, but /dev/nvidiactl is there for CRIU" in checks["map"]["found"]
    assert "/usr/local/sbin/cuda-checkpoint (our wrapper) -> " in checks["cuda-checkpoint"]["found"]
    assert "criu, containerd, crio:" in checks["cuda-checkpoint"]["found"]
    assert "(ours, zipapp, " in checks["criu-config"]["found"]


# --- the cases: break one part, check, repair ---------------------------------------------


def _no_nvidia(node: SimNode) -> None:
    (node.host.proc / "devices").write_text(proc_devices_text({"mem": 1}))
    shutil.rmtree(node.host.proc / "driver")
    shutil.rmtree(node.fs("/run/nvidia"))
    node.remove("/dev/nvidiactl")


def _stale_action(node: SimNode) -> None:
    path = node.fs(ACTION)
    data = path.read_bytes()
    start = data.index(b"PK\x03\x04")
    rebuilt = Path(str(path) + ".new")
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(rebuilt, "w") as new:
        for item in old.infolist():
            content = old.read(item)
            if item.filename == "watcher/__init__.py":
                content = content.replace(b'__version__ = "', b'__version__ = "0.0.1-old-')
            new.writestr(item, content)
    path.write_bytes(data[:start] + rebuilt.read_bytes())
    rebuilt.unlink()


def _reinstall_action(node: SimNode) -> None:
    from watcher.criu import actionfile

    node.write(ACTION, actionfile.build().data, 0o755)


def _host_driver_layout(node: SimNode) -> None:
    node.remove("/dev/nvidiactl")
    for name, (major, minor) in simnode.NODES.items():
        mknod(node.fs(f"/dev/{name}"), major, minor)


def _driver_570(node: SimNode) -> None:
    (node.host.proc / "driver/nvidia/version").write_text(version_text("570.86.10"))
    node.tool(
        f"{DRIVER}/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_570})
    )


def _driver_580(node: SimNode) -> None:
    (node.host.proc / "driver/nvidia/version").write_text(version_text("580.95.05"))
    node.tool(
        f"{DRIVER}/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_580})
    )
    node.write_labels()


@dataclass(frozen=True)
class Case:
    name: str
    check: str
    status: str
    breaks: Callable[[SimNode], object]
    # In the found text (a fragment) and the fix line (a fragment; None: no fix).
    found: str
    fix: str | None
    repair: Callable[[SimNode], object] | None = None
    repaired: str | None = None  # the status after the repair (default: the node's own)


def _tool(path: str, text: str) -> Callable[[SimNode], None]:
    return lambda node: node.tool(path, text)


def _write(path: str, text: str) -> Callable[[SimNode], None]:
    return lambda node: node.write(path, text)


def _remove(*paths: str) -> Callable[[SimNode], None]:
    def remove(node: SimNode) -> None:
        for path in paths:
            node.remove(path)

    return remove


def _chmod(path: str, mode: int) -> Callable[[SimNode], None]:
    return lambda node: node.fs(path).chmod(mode)


RUNC_LINE = f"action-script {ACTION}\n"
CASES = [
    Case(
        "map-ok-host-driver", "map", "ok", _host_driver_layout, "dev root /dev; 1 GPUs, 4/4", None
    ),
    Case(
        "map-warn-not-in-dev",
        "map",
        "warn",
        _remove("/dev/nvidiactl"),
        "problems: not-in-dev (warning)",
        "gpu-device-watcher path nvidiactl",
        lambda node: node.host.symlink("/dev/nvidiactl", f"{DRIVER}/dev/nvidiactl"),
    ),
    Case(
        "map-fail-missing-node",
        "map",
        "fail",
        _remove(f"{DRIVER}/dev/nvidia0"),
        "missing-node (error)",
        "nvidia0",
        lambda node: mknod(node.fs(f"{DRIVER}/dev/nvidia0"), 195, 0),
    ),
    Case(
        "criu-fail-absent",
        "criu",
        "fail",
        _remove("/usr/sbin/criu"),
        "no criu on any caller's PATH",
        "apt-get install criu",
        _tool("/usr/sbin/criu", simnode.criu_script()),
    ),
    Case(
        "criu-fail-no-cuda-plugin",
        "criu",
        "fail",
        _tool("/usr/sbin/criu", simnode.criu_script("3.19")),
        "CRIU 3.19 has no CUDA plugin",
        "CRIU 4.0 or later",
        _tool("/usr/sbin/criu", simnode.criu_script("4.1.1")),
    ),
    Case(
        "criu-warn-two-binaries",
        "criu",
        "warn",
        lambda node: (
            (
                node.tool("/opt/criu/bin/criu", simnode.criu_script()),
                node.write(
                    "/etc/systemd/system/containerd.service.d/20-criu.conf",
                    '[Service]\nEnvironment="PATH=/opt/criu/bin:/usr/local/sbin:/usr/bin"\n',
                ),
            )
        ),
        "containerd -> /opt/criu/bin/criu",
        "keep one criu: remove or relink /opt/criu/bin/criu",
        lambda node: (
            node.remove("/opt/criu/bin/criu"),
            node.fs("/opt/criu/bin/criu").symlink_to("/usr/sbin/criu"),
        ),
    ),
    Case(
        "criu-fail-not-on-a-service-path",
        "criu",
        "fail",
        _write(
            "/etc/systemd/system/containerd.service.d/20-path.conf",
            '[Service]\nEnvironment="PATH=/opt/bin:/usr/bin"\n',
        ),
        "containerd find no criu on their PATH",
        "ln -s /usr/sbin/criu /opt/bin/criu",
        _remove("/etc/systemd/system/containerd.service.d/20-path.conf"),
    ),
    Case(
        "criu-skip-version-unknown",
        "criu",
        "skip",
        _tool("/usr/sbin/criu", "#!/bin/sh\necho criu\n"),
        "printed no version",
        None,
    ),
    Case(
        "criu-skip-untrusted",
        "criu",
        "skip",
        _chmod("/usr/sbin/criu", 0o775),
        "is writable by others (mode 0775)",
        None,
        _chmod("/usr/sbin/criu", 0o755),
    ),
    Case(
        "config-fail-action-missing",
        "criu-config",
        "fail",
        _remove(ACTION),
        "does not exist",
        "gpu-device-watcher install-action /usr/local/libexec/gpu-device-watcher",
        _reinstall_action,
    ),
    Case(
        "config-fail-not-executable",
        "criu-config",
        "fail",
        _chmod(ACTION, 0o644),
        "is not executable",
        f"chmod 0755 {ACTION}",
        _chmod(ACTION, 0o755),
    ),
    Case(
        "config-fail-none",
        "criu-config",
        "fail",
        _remove("/etc/criu/runc.conf", "/etc/criu/crun.conf", "/etc/criu/default.conf"),
        "no CRIU caller runs gpu-device-watcher's action",
        f"gpu-device-watcher install-action /usr/local/libexec/gpu-device-watcher && echo "
        f"'action-script {ACTION}' >> /etc/criu/runc.conf",
        lambda node: (
            (
                node.write("/etc/criu/runc.conf", RUNC_LINE),
                node.write("/etc/criu/crun.conf", RUNC_LINE),
                node.write("/etc/criu/default.conf", RUNC_LINE),
            )
        ),
    ),
    Case(
        "config-warn-stale-action",
        "criu-config",
        "warn",
        _stale_action,
        "action 0.0.1-old-",
        "gpu-device-watcher install-action /usr/local/libexec/gpu-device-watcher",
        _reinstall_action,
    ),
    Case(
        "config-warn-not-ours",
        "criu-config",
        "warn",
        lambda node: (
            (
                node.tool("/usr/local/bin/other-action", "#!/bin/sh\nexit 0\n"),
                node.write(
                    "/etc/criu/default.conf",
                    f"{RUNC_LINE}action-script /usr/local/bin/other-action\n",
                ),
            )
        ),
        "/usr/local/bin/other-action is not gpu-device-watcher's action",
        "keep it if it is yours",
    ),
    Case(
        "config-skip-unreadable",
        "criu-config",
        "skip",
        lambda node: ((node.remove("/etc/criu/runc.conf"), node.fs("/etc/criu/runc.conf").mkdir())),
        "runc.conf: not a regular file",
        None,
    ),
    Case(
        "plugin-fail-missing",
        "criu-plugin",
        "fail",
        _remove("/usr/lib/criu/cuda_plugin.so"),
        "/usr/lib/criu/cuda_plugin.so missing",
        "install CRIU's cuda_plugin into /usr/lib/criu",
        _write("/usr/lib/criu/cuda_plugin.so", "plugin"),
    ),
    Case(
        "plugin-fail-libdir",
        "criu-plugin",
        "fail",
        _write("/etc/criu/runc.conf", f"{RUNC_LINE}libdir /opt/criu/plugins\n"),
        "plugin directory /opt/criu/plugins: libdir in /etc/criu/runc.conf",
        "/opt/criu/plugins/cuda_plugin.so",
        _write("/opt/criu/plugins/cuda_plugin.so", "plugin"),
    ),
    Case(
        "plugin-fail-no-dev-nvidiactl",
        "criu-plugin",
        "fail",
        _remove("/dev/nvidiactl"),
        "/dev/nvidiactl does not exist",
        f"ln -s {DRIVER}/dev/nvidiactl /dev/nvidiactl",
        lambda node: node.host.symlink("/dev/nvidiactl", f"{DRIVER}/dev/nvidiactl"),
    ),
    Case("plugin-skip-no-gpu", "criu-plugin", "skip", _no_nvidia, "no NVIDIA or AMD GPU", None),
    Case(
        "cuda-fail-none",
        "cuda-checkpoint",
        "fail",
        _remove("/usr/local/sbin/cuda-checkpoint", f"{DRIVER}/usr/bin/cuda-checkpoint"),
        "no cuda-checkpoint on PATH",
        f"ln -sf {simnode.WRAPPER} /usr/local/sbin/cuda-checkpoint",
        lambda node: (
            simnode.link_wrapper(node),
            node.tool(
                f"{DRIVER}/usr/bin/cuda-checkpoint",
                simnode.tool_script({"-h": simnode.CUDA_HELP_580}),
            ),
        ),
    ),
    Case(
        "cuda-fail-none-installed",
        "cuda-checkpoint",
        "fail",
        _remove("/usr/local/sbin/cuda-checkpoint", simnode.WRAPPER),
        "no cuda-checkpoint on PATH",
        "gpu-device-watcher install-action /usr/local/sbin",
        lambda node: node.tool("/usr/local/sbin/cuda-checkpoint", simnode.wrapper_script()),
    ),
    Case(
        "cuda-fail-wrapper-alone",
        "cuda-checkpoint",
        "fail",
        _remove(f"{DRIVER}/usr/bin/cuda-checkpoint"),
        "is our wrapper, with no real cuda-checkpoint behind it",
        "install -m 0755 cuda-checkpoint",
        _tool(
            f"{DRIVER}/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_580})
        ),
    ),
    Case(
        "cuda-warn-not-wrapper",
        "cuda-checkpoint",
        "warn",
        lambda node: (
            node.remove("/usr/local/sbin/cuda-checkpoint"),
            node.tool(
                "/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_580})
            ),
        ),
        "/usr/bin/cuda-checkpoint is NVIDIA's binary, not our wrapper",
        f"ln -sf {simnode.WRAPPER} /usr/local/sbin/cuda-checkpoint",
        simnode.link_wrapper,
    ),
    Case(
        "cuda-warn-driver-570",
        "cuda-checkpoint",
        "warn",
        _driver_570,
        "driver 570.86.10 has no --device-map",
        "upgrade the NVIDIA driver to 580",
        _driver_580,
    ),
    Case(
        "cuda-fail-no-action",
        "cuda-checkpoint",
        "fail",
        _tool(
            f"{DRIVER}/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_550})
        ),
        "has no --action",
        "upgrade the NVIDIA driver",
        _tool(
            f"{DRIVER}/usr/bin/cuda-checkpoint", simnode.tool_script({"-h": simnode.CUDA_HELP_580})
        ),
    ),
    Case(
        "cuda-fail-service-path",
        "cuda-checkpoint",
        "fail",
        _write(
            "/etc/systemd/system/crio.service.d/20-path.conf",
            '[Service]\nEnvironment="PATH=/usr/sbin:/usr/bin"\n',
        ),
        "crio: no cuda-checkpoint on PATH /usr/sbin:/usr/bin",
        f"ln -sf {simnode.WRAPPER} /usr/sbin/cuda-checkpoint",
        _remove("/etc/systemd/system/crio.service.d/20-path.conf"),
    ),
    Case("cuda-skip-no-nvidia", "cuda-checkpoint", "skip", _no_nvidia, "no NVIDIA GPU", None),
    Case(
        "runc-fail-no-config",
        "runtime-runc",
        "fail",
        _remove("/etc/criu/runc.conf"),
        "/etc/criu/runc.conf is absent",
        f"echo 'action-script {ACTION}' >> /etc/criu/runc.conf",
        _write("/etc/criu/runc.conf", RUNC_LINE),
    ),
    Case(
        "runc-fail-old-criu",
        "runtime-runc",
        "fail",
        _tool("/usr/sbin/criu", simnode.criu_script("3.18")),
        "its CRIU 3.18 reads no config file over RPC",
        "install CRIU 3.19 or later",
        _tool("/usr/sbin/criu", simnode.criu_script()),
    ),
    Case(
        "runc-skip-absent",
        "runtime-runc",
        "skip",
        _remove("/usr/sbin/runc"),
        "no runc on this host",
        None,
    ),
    Case(
        "crun-warn-no-criu",
        "runtime-crun",
        "warn",
        _tool(
            "/usr/bin/crun",
            simnode.tool_script(
                {"--version": simnode.crun_version("1.26", "+SYSTEMD +SELINUX +YAJL")}
            ),
        ),
        "built without CRIU",
        "install a crun built with CRIU support",
        _tool("/usr/bin/crun", simnode.tool_script({"--version": simnode.crun_version()})),
    ),
    Case(
        "crun-warn-no-config",
        "runtime-crun",
        "warn",
        _remove("/etc/criu/crun.conf"),
        "/etc/criu/crun.conf is absent",
        f"echo 'action-script {ACTION}' >> /etc/criu/crun.conf",
        _write("/etc/criu/crun.conf", RUNC_LINE),
    ),
    Case(
        "config-ok-runc-only",
        "criu-config",
        "ok",
        _remove("/etc/criu/crun.conf", "/etc/criu/default.conf"),
        "(so not run by criu, crun)",
        None,
    ),
    Case(
        "crun-warn-old",
        "runtime-crun",
        "warn",
        _tool("/usr/bin/crun", simnode.tool_script({"--version": simnode.crun_version("1.8.1")})),
        "crun before 1.26 reads no CRIU config file",
        "upgrade crun to 1.26 or later",
        _tool("/usr/bin/crun", simnode.tool_script({"--version": simnode.crun_version()})),
    ),
    Case(
        "crun-skip-absent",
        "runtime-crun",
        "skip",
        _remove("/usr/bin/crun"),
        "no crun on this host",
        None,
    ),
    Case(
        "crio-fail-disabled",
        "runtime-crio",
        "fail",
        _write(
            "/etc/crio/crio.conf.d/99-off.conf", "[crio.runtime]\nenable_criu_support = false\n"
        ),
        "enable_criu_support = false in /etc/crio/crio.conf.d/99-off.conf",
        "> /etc/crio/crio.conf.d/90-criu.conf && systemctl restart crio",
        _remove("/etc/crio/crio.conf.d/99-off.conf"),
    ),
    Case(
        "crio-warn-unset",
        "runtime-crio",
        "warn",
        _remove("/etc/crio/crio.conf.d/05-checkpoint.conf"),
        "enable_criu_support is not set",
        "printf '[crio.runtime]\\nenable_criu_support = true\\n'",
        _write(
            "/etc/crio/crio.conf.d/90-criu.conf", "[crio.runtime]\nenable_criu_support = true\n"
        ),
    ),
    Case(
        "crio-skip-absent",
        "runtime-crio",
        "skip",
        _remove("/usr/bin/crio", "/usr/lib/systemd/system/crio.service"),
        "no CRI-O on this host",
        None,
    ),
    Case(
        "containerd-warn-1x",
        "runtime-containerd",
        "warn",
        _tool(
            "/usr/bin/containerd",
            simnode.tool_script({"--version": simnode.containerd_version("1.7.2")}),
        ),
        "version 1.7.2: containerd before 2.0",
        "upgrade containerd to 2.0 or later",
        _tool(
            "/usr/bin/containerd", simnode.tool_script({"--version": simnode.containerd_version()})
        ),
    ),
    Case(
        "containerd-skip-absent",
        "runtime-containerd",
        "skip",
        _remove("/usr/bin/containerd", "/etc/systemd/system/containerd.service"),
        "no containerd on this host",
        None,
    ),
    Case(
        "labels-warn-stale",
        "labels",
        "warn",
        lambda node: (node.host.proc / "driver/nvidia/version").write_text(
            version_text("580.105.08")
        ),
        "is stale: driver-version=580.95.05 (now 580.105.08)",
        "systemctl restart gpu-device-watcher",
        lambda node: node.write_labels(),
    ),
    Case(
        "labels-fail-missing",
        "labels",
        "fail",
        lambda node: node.features.unlink(),
        "features: no such file; Node Feature Discovery has no labels of ours",
        "systemctl enable --now gpu-device-watcher.socket",
        lambda node: node.write_labels(),
    ),
    Case(
        "labels-skip-unconfigured",
        "labels",
        "skip",
        lambda node: node.config.write_text(""),
        "no nfd_features_file",
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check(node: SimNode, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    case.breaks(node)
    check = run_doctor(node, capsys)[case.check]
    assert check["status"] == case.status, check
    assert case.found in check["found"], check
    if case.fix is None:
        assert check["fix"] is None
    else:
        assert check["fix"] is not None and case.fix in check["fix"], check
    if case.repair is not None:
        case.repair(node)
        after = run_doctor(node, capsys)[case.check]
        assert after["status"] == (case.repaired or BASE[case.check]), after


# Every status each check can give (its code has a branch for it); the daemon's `ok` (the
# real daemon) and `skip` (a host view on the command line) are tested in test_doctor_cli.
POSSIBLE = {
    "daemon": {"warn"},
    "map": {"ok", "warn", "fail"},
    "criu": {"ok", "warn", "fail", "skip"},
    "criu-config": {"ok", "warn", "fail", "skip"},
    "criu-plugin": {"ok", "fail", "skip"},
    "cuda-checkpoint": {"ok", "warn", "fail", "skip"},
    "runtime-runc": {"ok", "fail", "skip"},
    "runtime-crun": {"ok", "warn", "skip"},
    "runtime-crio": {"ok", "warn", "fail", "skip"},
    "runtime-containerd": {"ok", "warn", "skip"},
    "labels": {"ok", "warn", "fail", "skip"},
}


def test_every_check_and_status_has_a_case() -> None:
    covered: dict[str, set[str]] = {check: {status} for check, status in BASE.items()}
    for case in CASES:
        covered[case.check].add(case.status)
    assert covered == POSSIBLE


def test_an_amd_node(node: SimNode, capsys: pytest.CaptureFixture[str]) -> None:
    _no_nvidia(node)
    (node.host.proc / "devices").write_text(proc_devices_text({"drm": 226, "kfd": 235}))
    mknod(node.fs("/dev/kfd"), 235, 0)
    mknod(node.fs("/dev/dri/renderD128"), 226, 128)
    node.host.drm_render(128, "0000:83:00.0", product_name="AMD Instinct MI210")
    checks = run_doctor(node, capsys)
    assert checks["map"]["status"] == "ok", checks["map"]["found"]
    assert "AMD kfd, dev root /dev" in checks["map"]["found"]
    assert checks["cuda-checkpoint"] == {
        "id": "cuda-checkpoint", "status": "skip", "found": "no NVIDIA GPU on this host",
        "fix": None,
    }  # fmt: skip
    plugin = checks["criu-plugin"]
    assert plugin["status"] == "fail", plugin
    assert "/usr/lib/criu/amdgpu_plugin.so missing" in plugin["found"]
    assert "install CRIU's amdgpu_plugin into /usr/lib/criu" in plugin["fix"]
    assert "plugins/amdgpu/amdgpu_plugin.so /usr/lib/criu/amdgpu_plugin.so" in plugin["fix"]
    assert "the amdgpu plugin" in checks["criu"]["found"]
    node.write("/usr/lib/criu/amdgpu_plugin.so", b"\x7fELF plugin stand-in")
    assert run_doctor(node, capsys)["criu-plugin"]["status"] == "ok"


def test_a_fifo_named_as_the_action_or_feature_file_does_not_hang(
    node: SimNode, capsys: pytest.CaptureFixture[str]
) -> None:
    node.remove(ACTION)
    os.mkfifo(node.fs(ACTION))
    node.features.unlink()
    os.mkfifo(node.features)
    checks = run_doctor(node, capsys)
    assert checks["criu-config"]["status"] == "fail", checks["criu-config"]
    assert f"{ACTION} is not a regular file" in checks["criu-config"]["found"]
    assert checks["criu-config"]["fix"].startswith(f"rm {ACTION} && gpu-device-watcher install")
    assert checks["labels"]["status"] == "fail", checks["labels"]
    assert "not a regular file" in checks["labels"]["found"]
