"""AMD compute partitions in the family table and the pure scan: which device names are
partitions, KFD's topology properties, and the map built from a hand-written snapshot of an
MI300X in CPX (the KFD node of each partition names its render minor) and not split.

The shapes are those of ROCm/k8s-device-plugin's MI300 testdata (README of its partition
test resources: `/sys/devices/platform/amdgpu_xcp.N/drm/renderDM`, and KFD `properties`
with `location_id 512`, `domain 0`, `drm_render_minor 128`, `unique_id 7843934696581995200`)
and of the kernel (amdgpu_xcp_drv.c names the platform devices; kfd_topology.c writes
`location_id` as pci_dev_id() and `unique_id` in decimal).
"""

from __future__ import annotations

import msgspec
import pytest

from watcher.core.devices import (
    AMD,
    FAMILIES,
    NVIDIA,
    amd_unique_id,
    parse_kfd_properties,
    pci_address,
)
from watcher.core.mountinfo import MountTable
from watcher.core.scan import build_map
from watcher.core.snapshot import (
    Candidate,
    DevRootListing,
    DrmNode,
    HostSnapshot,
    HostView,
    KfdNode,
    NodeEntry,
    scan_paths,
)

MI300X = "AMD Instinct MI300X"
UPDATED = "2026-12-06T04:00:00.000000Z"
UNIQUE = 7843934696581995200
UNIQUE_HEX = "6cdb410c2f219ac0"

# The GPU node and a CPU node of the ROCm testdata, cut to the lines around those we read.
GPU_PROPERTIES = """\
cpu_cores_count 0
simd_count 912
gfx_target_version 90402
vendor_id 4098
device_id 29856
location_id 512
domain 0
drm_render_minor 128
hive_id 9034655720432782706
unique_id 7843934696581995200
num_xcc 6
max_engine_clk_ccompute 3700
"""
CPU_PROPERTIES = "cpu_cores_count 48\nsimd_count 0\nlocation_id 0\ndomain 0\ndrm_render_minor 0\n"


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("amdgpu_xcp.0", 0),
        ("amdgpu_xcp.27", 27),
        ("amdgpu_xcp_3", 3),  # newer kernels: "amdgpu_xcp_%d", id -1
        ("amdgpu_xcp.01", None),
        ("amdgpu_xcp", None),
        ("amdgpu_xcp.0/drm", None),
        ("0000:02:00.0", None),
        (None, None),
    ],
)
def test_which_devices_are_partitions(device: str | None, expected: int | None) -> None:
    assert AMD.partition_of(device) == expected
    assert NVIDIA.partition_of(device) is None


def test_kfd_properties_are_parsed_as_the_kernel_writes_them() -> None:
    gpu = parse_kfd_properties(GPU_PROPERTIES)
    assert (gpu["drm_render_minor"], gpu["domain"], gpu["location_id"]) == (128, 0, 512)
    assert gpu["unique_id"] == UNIQUE
    assert parse_kfd_properties(CPU_PROPERTIES)["drm_render_minor"] == 0
    # Another shape of line (a name alone, a negative or hex value) is skipped.
    assert parse_kfd_properties("name gfx942\nfoo\nbar -1\nbaz 0x10\nlocation_id 7\n") == {
        "location_id": 7
    }


@pytest.mark.parametrize(
    ("domain", "location_id", "address"),
    [
        (0, 512, "0000:02:00.0"),
        (1, 512, "0001:02:00.0"),
        (0, 0xC1 << 8 | 3 << 3 | 1, "0000:c1:03.1"),
        (0x10000, 0xFF << 8 | 0x1F << 3 | 7, "10000:ff:1f.7"),
    ],
)
def test_pci_address_from_kfd(domain: int, location_id: int, address: str) -> None:
    assert pci_address(domain, location_id) == address


def test_unique_id_in_sysfs_form() -> None:
    assert amd_unique_id(UNIQUE) == UNIQUE_HEX
    assert amd_unique_id(1) == "0000000000000001"
    assert amd_unique_id(0) is None
    assert amd_unique_id(1 << 64) is None


# ------------------------------------------------------------------------- the pure scan


def render(minor: int) -> NodeEntry:
    return NodeEntry(f"dri/renderD{minor}", "char", 226, minor, 0o666)


def snapshot(*, kfd_names: tuple[int, ...], sysfs_identity: bool = True) -> HostSnapshot:
    """One MI300X: its own render node 128 and partitions amdgpu_xcp.0/.1 on 129/130."""
    sys_drm = (
        DrmNode(
            "renderD128",
            128,
            "amdgpu",
            "0000:02:00.0",
            MI300X if sysfs_identity else None,
            UNIQUE_HEX if sysfs_identity else None,
        ),
        DrmNode("renderD129", 129, None, "amdgpu_xcp.0"),
        DrmNode("renderD130", 130, None, "amdgpu_xcp.1"),
    )
    return HostSnapshot(
        proc_devices="Character devices:\n226 drm\n235 kfd\n",
        proc_devices_error=None,
        driver_version_text=None,
        gpu_information=[],
        mounts=MountTable([]),
        mounts_error=None,
        driver_ready=None,
        candidates=[Candidate("/", "/dev", False)],
        paths=scan_paths(HostView(), [Candidate("/", "/dev", False)], FAMILIES),
        listings={
            "/dev": DevRootListing(
                "/dev",
                exists=True,
                entries=(
                    NodeEntry("kfd", "char", 235, 0, 0o666),
                    render(128),
                    render(129),
                    render(130),
                ),
            )
        },
        sys_drm=sys_drm,
        kfd_nodes=tuple(KfdNode(minor, 0, 512, UNIQUE) for minor in kfd_names),
    )


def amd_gpus(kfd_names: tuple[int, ...], **options: bool) -> list[dict[str, object]]:
    device_map = build_map(
        HostView(), snapshot(kfd_names=kfd_names, **options), generation=1, updated=UPDATED
    )
    assert device_map.problems == ()
    listed: list[dict[str, object]] = msgspec.json.decode(msgspec.json.encode(device_map))["gpus"]
    return listed


def test_partitions_kfd_names_are_gpu_entries_with_the_physical_identity() -> None:
    whole = {
        "minor": 128,
        "bus_id": "0000:02:00.0",
        "model": MI300X,
        "uuid": UNIQUE_HEX,
        "device": "/dev/dri/renderD128",
        "family": "amd",
    }
    assert amd_gpus((128, 129, 130)) == [
        whole,
        {**whole, "minor": 129, "device": "/dev/dri/renderD129", "partition": 0},
        {**whole, "minor": 130, "device": "/dev/dri/renderD130", "partition": 1},
    ]


def test_without_kfd_naming_them_partitions_are_not_listed() -> None:
    assert [gpu["minor"] for gpu in amd_gpus((128,))] == [128]
    device_map = build_map(HostView(), snapshot(kfd_names=(128,)), generation=1, updated=UPDATED)
    assert [d.name for d in device_map.devices] == ["dri/renderD128", "kfd"]


def test_a_partition_takes_kfds_unique_id_where_sysfs_has_none() -> None:
    [_, partition] = amd_gpus((128, 129), sysfs_identity=False)
    assert (partition["bus_id"], partition["model"], partition["uuid"]) == (
        "0000:02:00.0",
        None,
        UNIQUE_HEX,
    )
