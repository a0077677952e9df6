"""AMD nodes through the real daemon: /dev and /dev/dri are watched like NVIDIA's dev roots.

The host starts as the GPU Operator host of the harness (NVIDIA nodes in the driver root),
with an amdgpu GPU in the fake sysfs and /dev/dri present; each change must arrive as
exactly the next generation with exactly the expected diff.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .harness import UVM_MAJOR, Daemon, Namespace, device
from .test_cli import run_cli

pytestmark = pytest.mark.realfs

KFD, DRM = 235, 226
MAJORS = {"nvidia": 195, "nvidia-uvm": UVM_MAJOR, "drm": DRM, "kfd": KFD}


@pytest.fixture
def amd_daemon(host: Namespace, start_daemon: Callable[..., Daemon]) -> Daemon:
    host.proc_devices(MAJORS)
    host.mkdir("/dev/dri")
    host.mknod("/dev/kfd", KFD, 0)
    host.mknod("/dev/dri/renderD128", DRM, 128)
    host.drm_render(128, "0000:83:00.0", unique_id="592c190172fd5d40")
    host.drm_render(129, "0000:84:00.0", unique_id="c6f220c172dc76bb")
    host.drm_render(130, "0000:00:02.0", driver="i915")
    return start_daemon()


def amd_names(device_map: dict[str, object]) -> list[str]:
    devices = device_map["devices"]
    assert isinstance(devices, list)
    return [d["name"] for d in devices if d["family"] == "amd"]


def test_render_nodes_and_kfd_come_and_go(amd_daemon: Daemon, host: Namespace) -> None:
    first = amd_daemon.get()["map"]
    assert amd_names(first) == ["dri/renderD128", "kfd"]
    assert first["amd"] == {"loaded": True, "dev_root": "/dev"}
    with amd_daemon.subscribe() as subscription:
        host.mknod("/dev/dri/renderD129", DRM, 129)
        line = subscription.next()
        assert line["changes"] == [
            {"change": "added", "name": "dri/renderD129", "path": "/dev/dri/renderD129"}
        ]
        gpus = {gpu["minor"]: gpu["device"] for gpu in line["map"]["gpus"]}
        assert gpus[129] == "/dev/dri/renderD129"

        # An i915 render node and a card node are not the family's: no new generation.
        host.mknod("/dev/dri/renderD130", DRM, 130)
        host.mknod("/dev/dri/card0", DRM, 0)
        host.unlink("/dev/kfd")
        line = subscription.next()
        assert line["changes"] == [{"change": "removed", "name": "kfd", "path": "/dev/kfd"}]
        assert ("missing-node", "/dev/kfd", "amd") in [
            (p["code"], p.get("path"), p["family"]) for p in line["map"]["problems"]
        ]

        # amdgpu reloaded: kfd registered with another major; udev makes the node again.
        host.proc_devices({**MAJORS, "kfd": 508})
        host.mknod("/dev/kfd", 508, 0)
        line = subscription.next()
        assert line["changes"] == [{"change": "added", "name": "kfd", "path": "/dev/kfd"}]
        kfd = device(line["map"], "kfd")
        assert kfd is not None and (kfd["major"], kfd["valid"]) == (508, True)

        # The old node coming back with the old major: stale.
        host.unlink("/dev/kfd")
        assert subscription.next()["changes"][0]["change"] == "removed"
        host.mknod("/dev/kfd", KFD, 0)
        line = subscription.next()
        kfd = device(line["map"], "kfd")
        assert kfd is not None and kfd["valid"] is False
        assert ("wrong-major", "/dev/kfd") in [
            (p["code"], p.get("path")) for p in line["map"]["problems"]
        ]


def test_client_commands_name_amd_nodes(amd_daemon: Daemon) -> None:
    found = run_cli("path", "kfd", "--socket", amd_daemon.socket)
    assert (found.returncode, found.stdout) == (0, "/dev/kfd\n")
    render = run_cli("path", "dri/renderD128", "--socket", amd_daemon.socket)
    assert (render.returncode, render.stdout) == (0, "/dev/dri/renderD128\n")
    absent = run_cli("path", "dri/renderD130", "--socket", amd_daemon.socket)
    assert absent.returncode == 1 and absent.stderr.startswith("gpu-device-watcher: ")

    env = run_cli("get", "--socket", amd_daemon.socket, "--format", "env").stdout.splitlines()
    assert "GDW_DEV_KFD=/dev/kfd" in env
    assert "GDW_DEV_DRI_RENDERD128=/dev/dri/renderD128" in env

    table = run_cli("get", "--socket", amd_daemon.socket, "--format", "table").stdout
    assert "amd kfd (loaded)   dev root /dev" in table
    rows = [line.split() for line in table.splitlines()]
    assert ["kfd", "/dev/kfd", "kfd", "235:0", "0666", "yes"] in [row[:6] for row in rows]
    assert any(row[:1] == ["dri/renderD128"] and row[-1] == "amd" for row in rows)
    assert any(row[:2] == ["128", "0000:83:00.0"] and row[-1] == "amd" for row in rows)


def test_amdgpu_loaded_after_the_daemon_started(
    host: Namespace, start_daemon: Callable[..., Daemon]
) -> None:
    # No AMD at start; then amdgpu loads: kfd is registered, udev makes /dev/dri and the nodes.
    daemon = start_daemon()
    assert daemon.get()["map"]["amd"] == {"loaded": False, "dev_root": None}
    with daemon.subscribe() as subscription:
        host.proc_devices(MAJORS)
        host.drm_render(128, "0000:83:00.0", unique_id="592c190172fd5d40")
        host.mkdir("/dev/dri")
        host.mknod("/dev/dri/renderD128", DRM, 128)
        # One generation or two (the new directory is a change of its own: kfd missing).
        lines = subscription.until(lambda found: device(found, "dri/renderD128") is not None)
        assert lines[-1]["map"]["amd"] == {"loaded": True, "dev_root": "/dev"}
        assert len(lines) <= 2
        host.mknod("/dev/kfd", KFD, 0)
        line = subscription.next()
        assert line["changes"] == [{"change": "added", "name": "kfd", "path": "/dev/kfd"}]
        assert [p["code"] for p in line["map"]["problems"] if p["family"] == "amd"] == []
