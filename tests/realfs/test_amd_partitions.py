"""AMD compute partitions on real host trees: an MI300X host in CPX mode, where each GPU's
extra partitions have render nodes on platform devices `amdgpu_xcp.K`, and the same host not
split (SPX), where those devices linger but KFD names only the GPUs' own render nodes.

The layout follows public sources:
- ROCm/k8s-device-plugin's testdata (a node with 4 MI300 GPUs; its README lists
  `/sys/devices/platform/amdgpu_xcp.0 ... amdgpu_xcp.27`, each with `drm/cardN` and
  `drm/renderDN`, the PCI devices' own `drm/renderD128`, `renderD136`, ..., and the KFD
  topology `properties` of each node: `location_id 512`, `domain 0` / `domain 1`,
  `drm_render_minor 128` / `136`, `unique_id 7843934696581995200`, CPU nodes with
  `drm_render_minor 0`). Its render minors and unique ids are the ones used here.
- The kernel: drivers/gpu/drm/amd/amdxcp/amdgpu_xcp_drv.c (the platform devices, registered
  without a driver), drivers/gpu/drm/amd/amdkfd/kfd_topology.c (`location_id` is
  pci_dev_id(), bus << 8 | devfn; `domain` is pci_domain_nr(); `unique_id` the device's,
  written in decimal, where amdgpu's sysfs `unique_id` writes `%016llx`).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from watcher.core.model import DeviceMap

from .hostlayout import HostLayout

pytestmark = pytest.mark.realfs

MI300X = "AMD Instinct MI300X"
KFD, DRM = 235, 226
# Two GPUs of the report: 0000:02:00.0 and 0001:02:00.0 (location_id 512, domains 0 and 1).
GPU_A: dict[str, Any] = {
    "bus_id": "0000:02:00.0",
    "minors": (128, 129, 130, 131),
    "first_partition": 0,
}
GPU_B: dict[str, Any] = {
    "bus_id": "0001:02:00.0",
    "minors": (136, 137, 138, 139),
    "first_partition": 7,
}
UNIQUE_A, UNIQUE_B = 7843934696581995200, 11940228331418201223


def mi300x_host(layout: HostLayout, *, split: bool) -> HostLayout:
    layout.tmpfs("/dev")
    layout.node("/dev/kfd", KFD, 0)
    for gpu in (GPU_A, GPU_B):
        for minor in gpu["minors"]:
            layout.node(f"/dev/dri/renderD{minor}", DRM, minor)
    layout.partitioned_gpu(**GPU_A, unique_id=UNIQUE_A, kfd_names_partitions=split)
    layout.partitioned_gpu(
        **GPU_B, unique_id=UNIQUE_B, kfd_names_partitions=split, first_kfd_node=5
    )
    layout.proc_devices({"kfd": KFD, "drm": DRM})
    return layout


def gpus(device_map: DeviceMap) -> list[tuple[object, ...]]:
    return [
        (gpu.minor, gpu.partition, gpu.bus_id, gpu.model, gpu.uuid, gpu.device)
        for gpu in device_map.gpus
    ]


def test_kfd_named_partitions_are_gpus_of_their_own(layout: HostLayout) -> None:
    device_map = mi300x_host(layout, split=True).scan().map
    assert device_map.problems == ()
    assert [(d.name, d.kind, d.family, d.valid) for d in device_map.devices] == [
        *[(f"dri/renderD{m}", "render", "amd", True) for m in (128, 129, 130, 131)],
        *[(f"dri/renderD{m}", "render", "amd", True) for m in (136, 137, 138, 139)],
        ("kfd", "kfd", "amd", True),
    ]
    a, b = f"{UNIQUE_A:016x}", f"{UNIQUE_B:016x}"
    unset = msgspec.UNSET
    assert gpus(device_map) == [
        (128, unset, "0000:02:00.0", MI300X, a, "/dev/dri/renderD128"),
        (129, 0, "0000:02:00.0", MI300X, a, "/dev/dri/renderD129"),
        (130, 1, "0000:02:00.0", MI300X, a, "/dev/dri/renderD130"),
        (131, 2, "0000:02:00.0", MI300X, a, "/dev/dri/renderD131"),
        (136, unset, "0001:02:00.0", MI300X, b, "/dev/dri/renderD136"),
        (137, 7, "0001:02:00.0", MI300X, b, "/dev/dri/renderD137"),
        (138, 8, "0001:02:00.0", MI300X, b, "/dev/dri/renderD138"),
        (139, 9, "0001:02:00.0", MI300X, b, "/dev/dri/renderD139"),
    ]
    # In JSON a partition says so; a whole GPU looks as it always did.
    listed = msgspec.json.decode(msgspec.json.encode(device_map))["gpus"]
    assert listed[1]["partition"] == 0
    assert sorted(listed[0]) == ["bus_id", "device", "family", "minor", "model", "uuid"]


def test_partition_nodes_no_kfd_node_names_are_not_listed(layout: HostLayout) -> None:
    """Not split (SPX): the amdgpu_xcp devices and their nodes stay, KFD names 128 and 136
    alone, and the map is what it is on a GPU that was never partitioned."""
    device_map = mi300x_host(layout, split=False).scan().map
    assert device_map.problems == ()
    assert [d.name for d in device_map.devices] == ["dri/renderD128", "dri/renderD136", "kfd"]
    a, b = f"{UNIQUE_A:016x}", f"{UNIQUE_B:016x}"
    assert gpus(device_map) == [
        (128, msgspec.UNSET, "0000:02:00.0", MI300X, a, "/dev/dri/renderD128"),
        (136, msgspec.UNSET, "0001:02:00.0", MI300X, b, "/dev/dri/renderD136"),
    ]


def test_a_named_partition_whose_node_is_missing_is_reported(layout: HostLayout) -> None:
    mi300x_host(layout, split=True)
    layout.steps = [s for s in layout.steps if s.get("path") != "/dev/dri/renderD130"]
    device_map = layout.scan().map
    assert [(p.code, p.path, p.family) for p in device_map.problems] == [
        ("missing-node", "/dev/dri/renderD130", "amd")
    ]
