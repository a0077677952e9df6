"""The AMD family on real host trees: a tmpfs /dev with mknod'ed kfd and render nodes, and a
fake /sys shaped as the kernel makes it (class/drm/renderDN -> ../../devices/pci.../drm/renderDN,
its `device` link, the device's `driver` link, `product_name`, `unique_id`).

Fixtures from public reports: the MI210 bus addresses of ROCm/legacy-rocm-build#6281, the
unique ids `rocm-smi --showuniqueid` printed in ROCm/legacy-rocm-build#1151, the /dev/dri
listing of hyprwm/aquamarine#81 (card1, renderD128 at 226:128), and the container of
criu#2723 that held renderD136 while the checkpoint's topology wanted renderD144.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.core.model import DeviceMap
from watcher.probe import resolve_in

from .hostlayout import HostLayout

pytestmark = pytest.mark.realfs

MI210 = "AMD Instinct MI210"
UNIQUE_A = "592c190172fd5d40"
UNIQUE_B = "c6f220c172dc76bb"
KFD = 235
DRM = 226


def amd_host(layout: HostLayout, *, kfd: int | None = KFD, kfd_node: bool = True) -> HostLayout:
    """/dev on its own tmpfs, as devtmpfs is: kfd, an amdgpu render node, and an integrated
    GPU's render node whose driver is i915."""
    layout.tmpfs("/dev")
    if kfd_node:
        layout.node("/dev/kfd", KFD, 0)
    layout.node("/dev/dri/card0", DRM, 0, mode=0o660)
    layout.node("/dev/dri/card1", DRM, 1, mode=0o660)
    layout.node("/dev/dri/renderD128", DRM, 128)
    layout.node("/dev/dri/renderD129", DRM, 129)
    layout.drm_render(128, "0000:83:00.0", product_name=MI210, unique_id=UNIQUE_A)
    layout.drm_render(129, "0000:00:02.0", driver="i915", bridge="pci0000:00")
    majors = {"drm": DRM}
    if kfd is not None:
        majors["kfd"] = kfd
    layout.proc_devices(majors)
    return layout


def names(device_map: DeviceMap) -> list[tuple[str, str, str, bool]]:
    return [(d.name, d.family, d.kind, d.valid) for d in device_map.devices]


def test_amd_only_host_lists_amdgpu_nodes_and_no_nvidia_noise(layout: HostLayout) -> None:
    device_map = amd_host(layout).scan().map
    assert names(device_map) == [
        ("dri/renderD128", "amd", "render", True),
        ("kfd", "amd", "kfd", True),
    ]  # renderD129 is i915's; card nodes are nobody's
    assert device_map.amd.loaded is True
    assert device_map.amd.dev_root == "/dev"
    assert device_map.driver.loaded is False
    assert device_map.driver.dev_root is None
    assert device_map.problems == ()  # not a word about NVIDIA
    [gpu] = device_map.gpus
    assert (gpu.family, gpu.minor, gpu.bus_id, gpu.model, gpu.uuid, gpu.device) == (
        "amd",
        128,
        "0000:83:00.0",
        MI210,
        UNIQUE_A,
        "/dev/dri/renderD128",
    )
    render = device_map.device("dri/renderD128")
    assert render is not None and render.path == "/dev/dri/renderD128"
    assert (render.major, render.minor) == (DRM, 128)
    assert render.mount is not None and render.mount.mount_point == "/dev"


def test_render_node_without_product_name_or_unique_id(layout: HostLayout) -> None:
    layout.tmpfs("/dev").node("/dev/kfd", KFD, 0).node("/dev/dri/renderD128", DRM, 128)
    layout.drm_render(128, "0000:03:00.0")  # a consumer card: no FRU, no unique id
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    [gpu] = layout.scan().map.gpus
    assert (gpu.model, gpu.uuid, gpu.bus_id) == (None, None, "0000:03:00.0")


def test_stale_kfd_major_after_a_driver_reload(layout: HostLayout) -> None:
    amd_host(layout, kfd=KFD)
    layout.proc_devices({"drm": DRM, "kfd": 510})  # amdgpu reloaded: kfd got another major
    device_map = layout.scan().map
    kfd = device_map.device("kfd")
    assert kfd is not None and not kfd.valid and kfd.family == "amd"
    [problem] = device_map.problems
    assert (problem.code, problem.family, problem.path) == ("wrong-major", "amd", "/dev/kfd")
    assert "510" in problem.message and "235" in problem.message
    render = device_map.device("dri/renderD128")
    assert render is not None and render.valid  # the drm major did not move


def test_missing_kfd_and_render_node(layout: HostLayout) -> None:
    layout.tmpfs("/dev").node("/dev/dri/renderD136", DRM, 136)
    # criu#2723: the GPU of renderD144 is in /sys, its node is not in this /dev.
    layout.drm_render(136, "0000:c1:00.0", product_name=MI210, unique_id=UNIQUE_A)
    layout.drm_render(144, "0000:c2:00.0", product_name=MI210, unique_id=UNIQUE_B)
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    device_map = layout.scan().map
    found = {(p.code, p.family, p.path, p.severity) for p in device_map.problems}
    assert found == {
        ("missing-node", "amd", "/dev/kfd", "error"),
        ("missing-node", "amd", "/dev/dri/renderD144", "error"),
    }
    assert [(g.minor, g.device) for g in device_map.gpus] == [
        (136, "/dev/dri/renderD136"),
        (144, None),
    ]


def test_amdgpu_without_kfd_is_a_warning(layout: HostLayout) -> None:
    amd_host(layout, kfd=None, kfd_node=False)
    device_map = layout.scan().map
    assert device_map.amd.loaded is False
    assert device_map.amd.dev_root == "/dev"
    [problem] = device_map.problems
    assert (problem.code, problem.family, problem.severity) == (
        "driver-not-loaded",
        "amd",
        "warning",
    )
    # A render node lives with the drm major: it still renders without kfd.
    assert names(device_map) == [("dri/renderD128", "amd", "render", True)]


def test_nvidia_and_amd_on_one_host(layout: HostLayout) -> None:
    amd_host(layout)
    dev = "/run/nvidia/driver/dev"
    layout.tmpfs("/run/nvidia/driver")
    layout.node(f"{dev}/nvidiactl", 195, 255).node(f"{dev}/nvidia0", 195, 0)
    layout.node(f"{dev}/nvidia-uvm", 509, 0).node(f"{dev}/nvidia-uvm-tools", 509, 1)
    layout.proc_devices({"nvidia": 195, "nvidia-uvm": 509, "drm": DRM, "kfd": KFD})
    layout.driver_version().gpu("0000:3b:00.0", 0)
    device_map = layout.scan().map
    assert names(device_map) == [
        ("dri/renderD128", "amd", "render", True),
        ("kfd", "amd", "kfd", True),
        ("nvidia-uvm", "nvidia", "uvm", True),
        ("nvidia-uvm-tools", "nvidia", "uvm-tools", True),
        ("nvidia0", "nvidia", "gpu", True),
        ("nvidiactl", "nvidia", "control", True),
    ]
    assert [(g.family, g.minor, g.device) for g in device_map.gpus] == [
        ("nvidia", 0, "/run/nvidia/driver/dev/nvidia0"),
        ("amd", 128, "/dev/dri/renderD128"),
    ]
    assert device_map.driver.dev_root == dev and device_map.driver.version == "580.95.05"
    assert device_map.amd.dev_root == "/dev"
    # Only NVIDIA's: its nodes are not in /dev (CRIU 2509).
    assert [(p.code, p.family) for p in device_map.problems] == [("not-in-dev", "nvidia")]


def test_nvidia_only_host_shows_no_amd_noise(layout: HostLayout) -> None:
    layout.tmpfs("/dev")
    layout.node("/dev/nvidiactl", 195, 255).node("/dev/nvidia0", 195, 0)
    layout.node("/dev/dri/renderD128", DRM, 128)  # the integrated GPU's
    layout.drm_render(128, "0000:00:02.0", driver="i915", bridge="pci0000:00")
    layout.proc_devices({"nvidia": 195, "drm": DRM}).gpu("0000:3b:00.0", 0)
    device_map = layout.scan().map
    assert [d.name for d in device_map.devices] == ["nvidia0", "nvidiactl"]
    assert all(d.family == "nvidia" for d in device_map.devices)
    assert device_map.amd.loaded is False and device_map.amd.dev_root is None
    assert device_map.problems == ()
    assert [g.family for g in device_map.gpus] == ["nvidia"]


def test_a_host_with_neither_family_reports_nvidia_as_before(layout: HostLayout) -> None:
    layout.tmpfs("/dev").proc_devices({"drm": DRM})
    device_map = layout.scan().map
    assert {(p.code, p.family) for p in device_map.problems} == {
        ("driver-not-loaded", "nvidia"),
        ("no-device-root", "nvidia"),
    }
    assert device_map.amd.loaded is False


def test_amd_loaded_without_any_node(layout: HostLayout) -> None:
    layout.tmpfs("/dev").proc_devices({"drm": DRM, "kfd": KFD})
    device_map = layout.scan().map
    [problem] = device_map.problems
    assert (problem.code, problem.family) == ("no-device-root", "amd")
    assert "/dev" in problem.message
    assert device_map.amd.dev_root is None


def test_sys_links_leading_outside_sys_are_not_followed(layout: HostLayout) -> None:
    layout.tmpfs("/dev").node("/dev/kfd", KFD, 0)
    for minor in (128, 129, 130):
        layout.node(f"/dev/dri/renderD{minor}", DRM, minor)
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    layout.drm_render(128, "0000:83:00.0", product_name=MI210, unique_id=UNIQUE_A)
    # Outside /sys (in the root), a tree that would make both amdgpu's if it were followed.
    layout.mkdir("/outside/amdgpu").mkdir("/outside/dev130")
    layout.symlink("/outside/r130/device", "../dev130")
    layout.symlink("/outside/dev130/driver", "../amdgpu")
    # renderD129's driver link leaves /sys through `..`; renderD130's class link is an
    # absolute path outside /sys.
    device = "devices/pci0000:90/0000:91:00.0"
    layout.sys_mkdir(f"{device}/drm/renderD129")
    layout.sys_link("class/drm/renderD129", f"{device}/drm/renderD129")
    layout.sys_link(f"{device}/drm/renderD129/device", device)
    layout.sys_link(
        f"{device}/driver",
        os.path.relpath(layout.root / "outside/amdgpu", layout.sys / device),
    )
    layout.sys_link("class/drm/renderD130", str(layout.root / "outside/r130"))
    device_map = layout.scan().map
    assert [d.name for d in device_map.devices] == ["dri/renderD128", "kfd"]
    assert [g.minor for g in device_map.gpus] == [128]


def test_resolve_in_stays_inside(tmp_path: Path) -> None:
    base = tmp_path / "sys"
    (base / "devices/a/drm/renderD128").mkdir(parents=True)
    (base / "bus/pci/drivers/amdgpu").mkdir(parents=True)
    (tmp_path / "amdgpu").mkdir()
    (base / "class/drm").mkdir(parents=True)
    (base / "class/drm/renderD128").symlink_to("../../devices/a/drm/renderD128")
    (base / "devices/a/driver").symlink_to("../../bus/pci/drivers/amdgpu")
    (base / "devices/a/drm/renderD128/device").symlink_to("../..")
    (base / "devices/b").symlink_to("../../amdgpu")  # one level too far up
    (base / "devices/c").symlink_to(str(base / "devices/a"))  # absolute, inside
    (base / "devices/d").symlink_to(str(tmp_path / "amdgpu"))  # absolute, outside
    (base / "devices/loop").symlink_to("loop")
    sys_dir = str(base)
    assert resolve_in(sys_dir, "class/drm/renderD128/device/driver") == "bus/pci/drivers/amdgpu"
    assert resolve_in(sys_dir, "devices/c/driver") == "bus/pci/drivers/amdgpu"
    assert resolve_in(sys_dir, "devices/b") is None
    assert resolve_in(sys_dir, "devices/d") is None
    assert resolve_in(sys_dir, "devices/loop") is None
    assert resolve_in(sys_dir, "../sys/devices/a") is None
    assert resolve_in(sys_dir, "devices/missing") is None


def test_hostile_unique_id_is_dropped(layout: HostLayout) -> None:
    layout.tmpfs("/dev").node("/dev/kfd", KFD, 0).node("/dev/dri/renderD128", DRM, 128)
    layout.drm_render(128, "0000:83:00.0", product_name=MI210, unique_id="a,b=c d")
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    [gpu] = layout.scan().map.gpus
    assert gpu.uuid is None and gpu.model == MI210


def test_a_symlink_in_place_of_kfd_is_reported(layout: HostLayout) -> None:
    layout.tmpfs("/dev").symlink("/dev/kfd", "/tmp/kfd").node("/dev/dri/renderD128", DRM, 128)
    layout.drm_render(128, "0000:83:00.0")
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    device_map = layout.scan().map
    assert [(p.code, p.family, p.path) for p in device_map.problems] == [
        ("not-char-device", "amd", "/dev/kfd"),
    ]


def test_a_problem_of_no_family_goes_with_the_family_the_host_has(layout: HostLayout) -> None:
    amd_host(layout)
    layout.proc_text("devices", "Character devices:\n  1 mem\n235 kfd\n226 drm\nnot a line\n")
    device_map = layout.scan().map
    [problem] = [p for p in device_map.problems if p.code == "driver-not-loaded"]
    assert problem.family == "amd"  # /proc/devices is unreadable on an AMD host


def test_a_fifo_in_the_sys_tree_does_not_hang_the_scan(layout: HostLayout) -> None:
    layout.tmpfs("/dev").node("/dev/kfd", KFD, 0).node("/dev/dri/renderD128", DRM, 128)
    layout.drm_render(128, "0000:83:00.0", unique_id=UNIQUE_A)
    layout.sys_fifo("devices/pci0000:80/0000:80:01.1/0000:83:00.0/product_name")
    layout.proc_devices({"drm": DRM, "kfd": KFD})
    [gpu] = layout.scan(timeout=20).map.gpus
    assert (gpu.model, gpu.uuid) == (None, UNIQUE_A)
