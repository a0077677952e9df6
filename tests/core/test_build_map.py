"""watcher.core.scan.build_map: the pure decisions, from hand-built host snapshots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from watcher.core.devices import FAMILIES
from watcher.core.model import Device, DeviceMap, Gpu, Mount, Problem
from watcher.core.mountinfo import MountTable, parse_mountinfo
from watcher.core.procfs import GpuInformation, parse_gpu_information
from watcher.core.scan import build_map
from watcher.core.snapshot import (
    Candidate,
    DevRootListing,
    HostSnapshot,
    HostView,
    NodeEntry,
    candidates_for,
    scan_paths,
)

from ._fixtures import fixture_text

UPDATED = "2026-11-28T20:40:00.123456Z"
OPERATOR_ROOT = "/run/nvidia/driver"
OPERATOR_DEV = "/run/nvidia/driver/dev"
READY = "/run/nvidia/validations/driver-ready"

PROC_580 = fixture_text("proc-devices/nvidia-580.txt")  # nvidia 195, caps 234, uvm 509
PROC_535 = fixture_text("proc-devices/frontend-535.txt")  # nvidia-frontend 195, caps 235, uvm 510
PROC_NO_UVM = "Character devices:\n  1 mem\n195 nvidia\n234 nvidia-caps\n"
VERSION_580 = fixture_text("version/open-580.txt")
H200 = parse_gpu_information(fixture_text("information/h200-gsp.txt"), "0000:3b:00.0")
V100 = parse_gpu_information(fixture_text("information/v100-legacy.txt"), "0000:86:00.0")
CRIU_2509 = parse_mountinfo(fixture_text("mountinfo/criu-2509-gpu-operator.mountinfo"))

HOST_DEV_MOUNT = Mount(
    id=24,
    mount_point="/dev",
    fstype="devtmpfs",
    source="udev",
    options=("rw", "nosuid", "relatime"),
    nodev=False,
)
OPERATOR_DEV_MOUNT = Mount(
    id=614,
    mount_point=OPERATOR_DEV,
    fstype="tmpfs",
    source="tmpfs",
    options=("rw", "nosuid"),
    nodev=False,
)


def char(name: str, major: int, minor: int, mode: int = 0o666) -> NodeEntry:
    return NodeEntry(name=name, file_type="char", major=major, minor=minor, mode=mode)


# The node listing of gpu-operator#2685 (uvm 509, caps 234, no nvidia-uvm-tools).
ISSUE_2685 = (
    char("nvidia-caps/nvidia-cap1", 234, 1, 0o400),
    char("nvidia-caps/nvidia-cap2", 234, 2, 0o444),
    char("nvidia-modeset", 195, 254),
    char("nvidia-uvm", 509, 0),
    char("nvidia0", 195, 0),
    char("nvidiactl", 195, 255),
)
FULL = (*ISSUE_2685, char("nvidia-uvm-tools", 509, 1))
FULL_NAMES = [
    "nvidia-caps/nvidia-cap1",
    "nvidia-caps/nvidia-cap2",
    "nvidia-modeset",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia0",
    "nvidiactl",
]


@dataclass
class Host:
    """A snapshot as `watcher.probe.read_host` would gather it, written by hand."""

    dev_roots: Mapping[str, Iterable[NodeEntry] | None] = field(default_factory=dict)
    proc_devices: str | None = PROC_580
    proc_devices_error: str | None = None
    version: str | None = VERSION_580
    gpus: list[GpuInformation] = field(default_factory=lambda: [H200])
    mounts: MountTable = field(default_factory=lambda: CRIU_2509)
    driver_ready: str | None = None
    driver_ready_error: str | None = None
    existing: set[str] = field(default_factory=set)
    view: HostView = field(default_factory=HostView)

    def snapshot(self) -> HostSnapshot:
        candidates = candidates_for(self.view, self.driver_ready)
        paths = scan_paths(self.view, candidates, FAMILIES)
        listings = {}
        for dev_root in paths.dev_roots:
            entries = self.dev_roots.get(dev_root)
            listings[dev_root] = (
                DevRootListing(dev_root, exists=False)
                if entries is None
                else DevRootListing(dev_root, exists=True, entries=tuple(entries))
            )
        return HostSnapshot(
            proc_devices=self.proc_devices,
            proc_devices_error=self.proc_devices_error,
            driver_version_text=self.version,
            gpu_information=self.gpus,
            mounts=self.mounts,
            mounts_error=None,
            driver_ready=self.driver_ready,
            driver_ready_error=self.driver_ready_error,
            candidates=candidates,
            listings=listings,
            paths=paths,
            driver_roots_existing=self.existing,
        )

    def build(self, generation: int = 0) -> DeviceMap:
        return build_map(self.view, self.snapshot(), generation=generation, updated=UPDATED)


def problems(device_map: DeviceMap) -> list[tuple[str, str, str | None]]:
    return [(p.code, p.severity, p.path) for p in device_map.problems]


def names(device_map: DeviceMap) -> list[str]:
    return [device.name for device in device_map.devices]


def invalid(device_map: DeviceMap) -> list[str]:
    return [device.name for device in device_map.devices if not device.valid]


def operator_host(**changes: object) -> Host:
    """/dev without NVIDIA nodes; the driver container's root at /run/nvidia/driver."""
    host = Host(dev_roots={"/dev": (), OPERATOR_DEV: FULL}, existing={OPERATOR_ROOT})
    for key, value in changes.items():
        setattr(host, key, value)
    return host


# ---------------------------------------------------------------- the main layouts


def test_host_driver_in_dev() -> None:
    device_map = Host(dev_roots={"/dev": FULL}).build(generation=3)
    assert device_map.generation == 3
    assert device_map.updated == UPDATED
    assert device_map.driver.loaded is True
    assert device_map.driver.version == "580.95.05"
    assert (device_map.driver.root, device_map.driver.dev_root) == ("/", "/dev")
    assert device_map.driver.source == "detected"
    assert device_map.problems == ()
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    assert device_map.device("nvidiactl") == Device(
        name="nvidiactl",
        path="/dev/nvidiactl",
        kind="control",
        major=195,
        minor=255,
        mode="0666",
        valid=True,
        mount=HOST_DEV_MOUNT,
    )
    assert {device.mount for device in device_map.devices} == {HOST_DEV_MOUNT}
    assert device_map.gpus == (
        Gpu(
            minor=0,
            bus_id="0000:3b:00.0",
            model="NVIDIA H200",
            uuid="GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
            device="/dev/nvidia0",
        ),
    )


def test_kinds_paths_and_modes() -> None:
    device_map = Host(dev_roots={"/dev": FULL}).build()
    assert [(d.name, d.kind, d.path, d.major, d.minor, d.mode) for d in device_map.devices] == [
        ("nvidia-caps/nvidia-cap1", "cap", "/dev/nvidia-caps/nvidia-cap1", 234, 1, "0400"),
        ("nvidia-caps/nvidia-cap2", "cap", "/dev/nvidia-caps/nvidia-cap2", 234, 2, "0444"),
        ("nvidia-modeset", "modeset", "/dev/nvidia-modeset", 195, 254, "0666"),
        ("nvidia-uvm", "uvm", "/dev/nvidia-uvm", 509, 0, "0666"),
        ("nvidia-uvm-tools", "uvm-tools", "/dev/nvidia-uvm-tools", 509, 1, "0666"),
        ("nvidia0", "gpu", "/dev/nvidia0", 195, 0, "0666"),
        ("nvidiactl", "control", "/dev/nvidiactl", 195, 255, "0666"),
    ]


def test_gpu_operator_driver_root_criu_2509() -> None:
    device_map = operator_host().build()
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert device_map.driver.source == "detected"
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    assert {device.mount for device in device_map.devices} == {OPERATOR_DEV_MOUNT}
    assert all(d.path == f"{OPERATOR_DEV}/{d.name}" for d in device_map.devices)
    assert problems(device_map) == [("not-in-dev", "warning", OPERATOR_DEV)]
    assert "/dev/nvidiactl" in device_map.problems[0].message
    assert device_map.gpus[0].device == f"{OPERATOR_DEV}/nvidia0"


def test_gpu_operator_missing_uvm_tools_gpu_operator_2685() -> None:
    device_map = operator_host(dev_roots={"/dev": (), OPERATOR_DEV: ISSUE_2685}).build()
    assert problems(device_map) == [
        ("missing-node", "warning", f"{OPERATOR_DEV}/nvidia-uvm-tools"),
        ("not-in-dev", "warning", OPERATOR_DEV),
    ]
    assert "nvidia-uvm-tools" not in names(device_map)
    assert invalid(device_map) == []


def test_gpu_operator_dev_missing_from_the_listings_still_warns_not_in_dev() -> None:
    # read_host always lists /dev; a snapshot without it must not hide the warning.
    host = operator_host()
    snapshot = host.snapshot()
    del snapshot.listings["/dev"]
    device_map = build_map(host.view, snapshot, generation=0, updated=UPDATED)
    assert problems(device_map) == [("not-in-dev", "warning", OPERATOR_DEV)]


def test_operator_root_with_host_nvidiactl_in_dev_prefers_the_first_candidate() -> None:
    # Both roots hold valid nodes: "/" comes first in the default driver_roots.
    device_map = operator_host(dev_roots={"/dev": FULL, OPERATOR_DEV: FULL}).build()
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == []


# ---------------------------------------------------------------- driver-ready


def test_driver_ready_names_the_root() -> None:
    device_map = operator_host(
        driver_ready=fixture_text("driver-ready/gpu-operator-container.env"),
        dev_roots={"/dev": FULL, OPERATOR_DEV: FULL},
    ).build()
    # driver-ready comes first, ahead of "/" which holds valid nodes too.
    assert device_map.driver.source == "validations"
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert problems(device_map) == []


def test_a_driver_ready_that_cannot_be_read_is_named_and_ignored() -> None:
    device_map = operator_host(driver_ready_error="a FIFO, not a regular file").build()
    ready = "/run/nvidia/validations/driver-ready"
    assert device_map.driver.source == "detected"
    assert ("validations-mismatch", "warning", ready) in problems(device_map)
    (message,) = [p.message for p in device_map.problems if p.code == "validations-mismatch"]
    assert message.startswith(f"{ready} cannot be read (a FIFO, not a regular file)")


def test_driver_ready_quoted_values() -> None:
    device_map = operator_host(driver_ready=fixture_text("driver-ready/quoted.env")).build()
    assert device_map.driver.source == "validations"
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert problems(device_map) == [("not-in-dev", "warning", OPERATOR_DEV)]


def test_driver_ready_dev_root_differs_from_driver_root() -> None:
    host = Host(
        driver_ready=fixture_text("driver-ready/dev-root-on-host.env"),
        dev_roots={"/dev": FULL},
        existing={"/home/kubernetes/bin/nvidia"},
    )
    assert [c.dev_root for c in host.snapshot().candidates] == ["/dev", OPERATOR_DEV]
    device_map = host.build()
    assert device_map.driver.source == "validations"
    assert device_map.driver.root == "/home/kubernetes/bin/nvidia"
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == []


def test_driver_ready_paths_are_normalised_and_a_relative_dev_root_ignored() -> None:
    host = operator_host(driver_ready=fixture_text("driver-ready/relative-dev-root.env"))
    assert host.snapshot().candidates == [
        Candidate(OPERATOR_ROOT, OPERATOR_DEV, True),
        Candidate("/", "/dev", False),
    ]
    device_map = host.build()
    assert device_map.driver.source == "validations"
    assert device_map.driver.dev_root == OPERATOR_DEV


def test_stale_driver_ready() -> None:
    # driver-ready still names the driver container's root, but that root is empty now and
    # the host driver in /dev serves the GPUs.
    device_map = operator_host(
        driver_ready=fixture_text("driver-ready/gpu-operator-container.env"),
        dev_roots={"/dev": FULL, OPERATOR_DEV: ()},
    ).build()
    assert device_map.driver.source == "detected"
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == [
        ("driver-root-empty", "warning", OPERATOR_ROOT),
        ("validations-mismatch", "warning", READY),
    ]
    mismatch = device_map.problems[1]
    assert OPERATOR_DEV in mismatch.message
    assert "/dev instead" in mismatch.message


def test_stale_driver_ready_with_invalid_nodes_in_its_root() -> None:
    stale = [char(e.name, 196, e.minor) if e.major == 195 else e for e in FULL]
    device_map = operator_host(
        driver_ready=fixture_text("driver-ready/gpu-operator-container.env"),
        dev_roots={"/dev": FULL, OPERATOR_DEV: stale},
    ).build()
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == [("validations-mismatch", "warning", READY)]


def test_driver_ready_without_a_driver_root() -> None:
    device_map = Host(
        driver_ready=fixture_text("driver-ready/no-driver-root.env"), dev_roots={"/dev": FULL}
    ).build()
    assert device_map.driver.source == "detected"
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == [("validations-mismatch", "warning", READY)]
    assert "no absolute NVIDIA_DRIVER_ROOT" in device_map.problems[0].message


def test_driver_ready_naming_a_root_with_nothing_anywhere() -> None:
    device_map = operator_host(
        driver_ready=fixture_text("driver-ready/gpu-operator-container.env"),
        dev_roots={"/dev": ()},
        existing=set(),
    ).build()
    assert device_map.driver.dev_root is None
    assert problems(device_map) == [("no-device-root", "error", None)]


# ---------------------------------------------------------------- configured roots


def test_explicit_driver_roots_source_config() -> None:
    view = HostView(driver_roots=("/opt/nvidia/driver",), driver_roots_configured=True)
    device_map = Host(
        view=view,
        dev_roots={"/dev": (), "/opt/nvidia/driver/dev": FULL},
        existing={"/opt/nvidia/driver"},
        mounts=parse_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw"),
    ).build()
    assert device_map.driver.source == "config"
    assert device_map.driver.root == "/opt/nvidia/driver"
    assert device_map.driver.dev_root == "/opt/nvidia/driver/dev"
    assert problems(device_map) == [("not-in-dev", "warning", "/opt/nvidia/driver/dev")]
    root_mount = Mount(
        id=1, mount_point="/", fstype="ext4", source="/dev/sda1", options=("rw",), nodev=False
    )
    assert {device.mount for device in device_map.devices} == {root_mount}


def test_explicit_default_roots_still_say_config() -> None:
    view = HostView(driver_roots=("/", OPERATOR_ROOT), driver_roots_configured=True)
    device_map = Host(view=view, dev_roots={"/dev": FULL}).build()
    assert device_map.driver.source == "config"
    assert device_map.driver.dev_root == "/dev"


def test_driver_ready_wins_over_config() -> None:
    view = HostView(driver_roots=("/",), driver_roots_configured=True)
    device_map = Host(
        view=view,
        driver_ready=fixture_text("driver-ready/gpu-operator-container.env"),
        dev_roots={"/dev": (), OPERATOR_DEV: FULL},
        existing={OPERATOR_ROOT},
    ).build()
    assert device_map.driver.source == "validations"


def test_first_candidate_with_a_valid_nvidiactl_wins_over_an_earlier_invalid_one() -> None:
    view = HostView(driver_roots=("/a", "/b"), driver_roots_configured=True)
    broken = [char("nvidiactl", 195, 254), char("nvidia0", 195, 0)]
    device_map = Host(
        view=view, dev_roots={"/a/dev": broken, "/b/dev": FULL}, existing={"/a", "/b"}
    ).build()
    assert device_map.driver.dev_root == "/b/dev"
    assert ("driver-root-empty", "warning", "/a") not in problems(device_map)


def test_without_a_valid_nvidiactl_the_first_root_with_nodes_is_reported() -> None:
    view = HostView(driver_roots=("/a", "/b", "/c"), driver_roots_configured=True)
    device_map = Host(
        view=view,
        dev_roots={
            "/a/dev": (),
            "/b/dev": [char("nvidia0", 195, 0)],
            "/c/dev": [char("nvidia0", 195, 0)],
        },
        existing={"/b", "/c"},
        mounts=parse_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw"),
    ).build()
    assert device_map.driver.dev_root == "/b/dev"
    assert problems(device_map) == [
        ("missing-node", "error", "/b/dev/nvidia-uvm"),
        ("missing-node", "error", "/b/dev/nvidiactl"),
        ("missing-node", "warning", "/b/dev/nvidia-uvm-tools"),
        ("not-in-dev", "warning", "/b/dev"),
    ]


# ---------------------------------------------------------------- nothing there


def test_no_nodes_anywhere() -> None:
    device_map = Host(dev_roots={"/dev": ()}).build()
    assert device_map.devices == ()
    assert device_map.driver.loaded is True
    assert (device_map.driver.root, device_map.driver.dev_root) == (None, None)
    assert problems(device_map) == [("no-device-root", "error", None)]
    assert "/dev, /run/nvidia/driver/dev" in device_map.problems[0].message
    assert device_map.gpus[0].device is None


def test_empty_driver_root_gpu_operator_425() -> None:
    # /run/nvidia/driver exists with nothing in it; the driver is not up yet.
    device_map = Host(
        dev_roots={"/dev": ()},
        existing={OPERATOR_ROOT},
        proc_devices=fixture_text("proc-devices/not-loaded.txt"),
        gpus=[],
        version=None,
    ).build()
    assert device_map.driver.loaded is False
    assert device_map.driver.version is None
    assert problems(device_map) == [
        ("driver-not-loaded", "error", None),
        ("driver-root-empty", "error", OPERATOR_ROOT),
        ("no-device-root", "error", None),
    ]


def test_empty_driver_root_next_to_a_working_host_driver_is_a_warning() -> None:
    device_map = Host(dev_roots={"/dev": FULL, OPERATOR_DEV: ()}, existing={OPERATOR_ROOT}).build()
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == [("driver-root-empty", "warning", OPERATOR_ROOT)]


def test_absent_driver_root_is_not_empty() -> None:
    device_map = Host(dev_roots={"/dev": FULL}, existing=set()).build()
    assert problems(device_map) == []


# ---------------------------------------------------------------- driver not loaded


def test_driver_not_loaded_lists_nodes_as_invalid_without_node_problems() -> None:
    device_map = Host(
        dev_roots={"/dev": FULL}, proc_devices=fixture_text("proc-devices/not-loaded.txt")
    ).build()
    assert device_map.driver.loaded is False
    assert device_map.driver.dev_root == "/dev"
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == FULL_NAMES
    assert problems(device_map) == [("driver-not-loaded", "error", None)]
    assert "lists neither 'nvidia' nor 'nvidia-frontend'" in device_map.problems[0].message


def test_block_nvidia_does_not_mean_loaded() -> None:
    device_map = Host(
        dev_roots={"/dev": FULL}, proc_devices=fixture_text("proc-devices/block-nvidia-only.txt")
    ).build()
    assert device_map.driver.loaded is False


def test_unreadable_proc_devices() -> None:
    device_map = Host(
        dev_roots={"/dev": FULL},
        proc_devices=None,
        proc_devices_error="ENOENT: No such file or directory",
    ).build()
    assert device_map.driver.loaded is False
    assert problems(device_map) == [("driver-not-loaded", "error", None)]
    assert "cannot read /proc/devices (ENOENT" in device_map.problems[0].message


def test_malformed_proc_devices() -> None:
    device_map = Host(
        dev_roots={"/dev": FULL}, proc_devices=fixture_text("proc-devices/malformed.txt")
    ).build()
    assert device_map.driver.loaded is False
    assert problems(device_map) == [("driver-not-loaded", "error", "/proc/devices")]


def test_old_nvidia_frontend_naming_loads() -> None:
    nodes = [
        char("nvidiactl", 195, 255),
        char("nvidia0", 195, 0),
        char("nvidia-uvm", 510, 0),
        char("nvidia-uvm-tools", 510, 1),
        char("nvidia-caps/nvidia-cap1", 235, 1),
        char("nvidia-nvswitchctl", 511, 255),
        char("nvidia-nvswitch0", 511, 0),
    ]
    device_map = Host(dev_roots={"/dev": nodes}, proc_devices=PROC_535).build()
    assert device_map.driver.loaded is True
    assert invalid(device_map) == []
    assert problems(device_map) == []
    assert [d.kind for d in device_map.devices] == [
        "cap",
        "nvswitch",
        "nvswitch-control",
        "uvm",
        "uvm-tools",
        "gpu",
        "control",
    ]


# ---------------------------------------------------------------- missing nodes


def test_missing_nvidiactl_gpu_operator_377() -> None:
    nodes = [e for e in FULL if e.name != "nvidiactl"]
    device_map = operator_host(dev_roots={"/dev": (), OPERATOR_DEV: nodes}).build()
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert problems(device_map) == [
        ("missing-node", "error", f"{OPERATOR_DEV}/nvidiactl"),
        ("not-in-dev", "warning", OPERATOR_DEV),
    ]


def test_missing_gpu_node_of_a_listed_gpu() -> None:
    device_map = Host(dev_roots={"/dev": FULL}, gpus=[H200, V100]).build()
    assert problems(device_map) == [("missing-node", "error", "/dev/nvidia3")]
    assert [(g.minor, g.device) for g in device_map.gpus] == [(0, "/dev/nvidia0"), (3, None)]


def test_gpu_with_unknown_minor_expects_no_node() -> None:
    unknown = parse_gpu_information(
        fixture_text("information/excluded-unknown-minor.txt"), "0000:c1:00.0"
    )
    device_map = Host(dev_roots={"/dev": FULL}, gpus=[unknown, H200]).build()
    assert problems(device_map) == []
    assert [(g.minor, g.bus_id) for g in device_map.gpus] == [
        (0, "0000:3b:00.0"),
        (None, "0000:c1:00.0"),
    ]


def test_uvm_nodes_missing_while_uvm_is_registered() -> None:
    nodes = [e for e in FULL if not e.name.startswith("nvidia-uvm")]
    device_map = Host(dev_roots={"/dev": nodes}).build()
    assert problems(device_map) == [
        ("missing-node", "error", "/dev/nvidia-uvm"),
        ("missing-node", "warning", "/dev/nvidia-uvm-tools"),
    ]


def test_uvm_nodes_not_expected_while_uvm_is_not_registered() -> None:
    nodes = [e for e in FULL if not e.name.startswith("nvidia-uvm")]
    device_map = Host(dev_roots={"/dev": nodes}, proc_devices=PROC_NO_UVM).build()
    assert problems(device_map) == []
    assert invalid(device_map) == []


def test_missing_nodes_not_reported_when_the_driver_is_not_loaded() -> None:
    device_map = Host(
        dev_roots={"/dev": [char("nvidia0", 195, 0)]},
        proc_devices=fixture_text("proc-devices/not-loaded.txt"),
    ).build()
    assert problems(device_map) == [("driver-not-loaded", "error", None)]


# ---------------------------------------------------------------- broken nodes


@pytest.mark.parametrize(
    ("node", "proc_devices", "codes"),
    [
        # Stale uvm major after a driver reload: node 509, registered 510.
        (char("nvidia-uvm", 509, 0), PROC_535, ["wrong-major"]),
        (char("nvidia-uvm-tools", 509, 1), PROC_535, ["wrong-major"]),
        (char("nvidia0", 196, 0), PROC_580, ["wrong-major"]),
        (char("nvidia-caps/nvidia-cap1", 235, 1), PROC_580, ["wrong-major"]),
        # nvidia-caps is not registered at all: whatever the node says is stale.
        (
            char("nvidia-caps/nvidia-cap1", 234, 1),
            fixture_text("proc-devices/imex-only.txt"),
            ["wrong-major"],
        ),
        (
            char("nvidia-caps-imex-channels/channel0", 237, 0),
            fixture_text("proc-devices/imex-only.txt"),
            [],
        ),
        (char("nvidia-modeset", 195, 0), PROC_580, ["wrong-minor"]),
        (char("nvidia0", 195, 1), PROC_580, ["wrong-minor"]),
        (char("nvidia-uvm-tools", 509, 0), PROC_580, ["wrong-minor"]),
        (char("nvidia-caps/nvidia-cap2", 234, 1), PROC_580, ["wrong-minor"]),
        (char("nvidia-uvm", 510, 1), PROC_580, ["wrong-major", "wrong-minor"]),
        (NodeEntry("nvidia0", "block", 195, 0, 0o660), PROC_580, ["not-char-device"]),
    ],
)
def test_broken_node(node: NodeEntry, proc_devices: str, codes: list[str]) -> None:
    nodes = [e for e in FULL if e.name != node.name] + [node]
    device_map = Host(dev_roots={"/dev": nodes}, proc_devices=proc_devices).build()
    path = f"/dev/{node.name}"
    node_problems = [p for p in device_map.problems if p.path == path]
    assert [(p.code, p.severity) for p in node_problems] == [(code, "error") for code in codes]
    device = device_map.device(node.name)
    assert device is not None
    assert device.valid is (not codes)
    assert (device.major, device.minor) == (node.major, node.minor)


def test_stale_uvm_major_after_reload_leaves_the_rest_valid() -> None:
    device_map = Host(dev_roots={"/dev": FULL}, proc_devices=PROC_535).build()
    # PROC_535 registers uvm 510 and caps 235; FULL carries 509 and 234.
    assert invalid(device_map) == [
        "nvidia-caps/nvidia-cap1",
        "nvidia-caps/nvidia-cap2",
        "nvidia-uvm",
        "nvidia-uvm-tools",
    ]
    assert problems(device_map) == [
        ("wrong-major", "error", "/dev/nvidia-caps/nvidia-cap1"),
        ("wrong-major", "error", "/dev/nvidia-caps/nvidia-cap2"),
        ("wrong-major", "error", "/dev/nvidia-uvm"),
        ("wrong-major", "error", "/dev/nvidia-uvm-tools"),
    ]
    uvm = next(p for p in device_map.problems if p.path == "/dev/nvidia-uvm")
    assert "major 509" in uvm.message
    assert "registered 510" in uvm.message


def test_block_nvidiactl_is_listed_invalid_and_not_chosen_over_a_valid_root() -> None:
    block = NodeEntry("nvidiactl", "block", 195, 255, 0o666)
    nodes = [e for e in FULL if e.name != "nvidiactl"] + [block]
    alone = Host(dev_roots={"/dev": nodes}).build()
    assert alone.driver.dev_root == "/dev"
    assert problems(alone) == [("not-char-device", "error", "/dev/nvidiactl")]
    control = alone.device("nvidiactl")
    assert control is not None
    assert (control.kind, control.valid) == ("control", False)
    other = operator_host(dev_roots={"/dev": nodes, OPERATOR_DEV: FULL}).build()
    assert other.driver.dev_root == OPERATOR_DEV


@pytest.mark.parametrize(
    ("entry", "described"),
    [
        (
            NodeEntry("nvidiactl", "symlink", link_target="/dev/null"),
            "a symlink to '/dev/null' (not followed)",
        ),
        (NodeEntry("nvidiactl", "file"), "is a file,"),
        (NodeEntry("nvidiactl", "dir"), "is a directory,"),
        (NodeEntry("nvidiactl", "other"), "is a other,"),
    ],
)
def test_nvidiactl_that_is_not_a_device(entry: NodeEntry, described: str) -> None:
    nodes = [e for e in FULL if e.name != "nvidiactl"] + [entry]
    device_map = Host(dev_roots={"/dev": nodes}).build()
    assert device_map.driver.dev_root == "/dev"
    assert "nvidiactl" not in names(device_map)
    assert problems(device_map) == [("not-char-device", "error", "/dev/nvidiactl")]
    assert described in device_map.problems[0].message


def test_symlinked_nvidiactl_in_the_operator_root_falls_back_to_nodes_present() -> None:
    link = NodeEntry("nvidiactl", "symlink", link_target="/dev/null")
    nodes = [e for e in FULL if e.name != "nvidiactl"] + [link]
    device_map = operator_host(dev_roots={"/dev": (), OPERATOR_DEV: nodes}).build()
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert problems(device_map) == [
        ("not-char-device", "error", f"{OPERATOR_DEV}/nvidiactl"),
        ("not-in-dev", "warning", OPERATOR_DEV),
    ]


NODEV_DEV = parse_mountinfo(
    "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
    "2 1 0:5 / /dev rw,nosuid,nodev,relatime - devtmpfs udev rw,mode=755\n"
    "3 1 0:6 / /run rw,nosuid,nodev - tmpfs tmpfs rw\n"
    "4 3 0:7 / /run/nvidia/driver/dev rw,nosuid - tmpfs tmpfs rw\n"
)


def test_nodev_mount() -> None:
    device_map = Host(dev_roots={"/dev": FULL}, mounts=NODEV_DEV).build()
    assert device_map.driver.dev_root == "/dev"
    assert invalid(device_map) == FULL_NAMES
    assert problems(device_map) == [("nodev-mount", "error", f"/dev/{n}") for n in FULL_NAMES]
    nodev = Mount(
        id=2,
        mount_point="/dev",
        fstype="devtmpfs",
        source="udev",
        options=("rw", "nosuid", "nodev", "relatime"),
        nodev=True,
    )
    assert {device.mount for device in device_map.devices} == {nodev}


def test_nodev_dev_loses_to_a_valid_operator_root() -> None:
    device_map = operator_host(
        dev_roots={"/dev": FULL, OPERATOR_DEV: FULL}, mounts=NODEV_DEV
    ).build()
    # /run is nodev, but the driver's own /dev tmpfs on top of it is not.
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert invalid(device_map) == []
    # /dev/nvidiactl exists but cannot be opened (nodev): tools looking in /dev still fail.
    assert problems(device_map) == [("not-in-dev", "warning", OPERATOR_DEV)]


def test_stale_dev_nvidiactl_does_not_hide_not_in_dev() -> None:
    stale = (char("nvidiactl", 194, 255),)  # major of an earlier driver load
    device_map = operator_host(dev_roots={"/dev": stale, OPERATOR_DEV: FULL}).build()
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert ("not-in-dev", "warning", OPERATOR_DEV) in problems(device_map)


def test_device_without_a_known_mount() -> None:
    device_map = Host(dev_roots={"/dev": FULL}, mounts=MountTable([])).build()
    assert {device.mount for device in device_map.devices} == {None}
    assert invalid(device_map) == []


# ---------------------------------------------------------------- --root translation


def test_mount_points_under_root_are_host_paths() -> None:
    view = HostView(root="/host")
    mounts = parse_mountinfo(
        "1 0 0:40 / / rw - overlay overlay rw\n"
        "2 1 8:1 / /host rw,relatime - ext4 /dev/sda1 rw\n"
        "3 2 0:5 / /host/dev rw,nosuid - devtmpfs udev rw\n"
        "4 2 0:6 / /host/run rw,nosuid,nodev - tmpfs tmpfs rw\n"
        "5 4 0:7 / /host/run/nvidia/driver/dev rw,nosuid - tmpfs tmpfs rw\n"
    )
    host = operator_host(view=view, mounts=mounts)
    device_map = host.build()
    assert device_map.driver.dev_root == OPERATOR_DEV
    device = device_map.device("nvidiactl")
    assert device is not None
    assert device.path == f"{OPERATOR_DEV}/nvidiactl"
    assert device.mount is not None
    assert (device.mount.id, device.mount.mount_point) == (5, OPERATOR_DEV)
    in_dev = Host(view=view, mounts=mounts, dev_roots={"/dev": FULL}).build()
    assert {d.mount.mount_point for d in in_dev.devices if d.mount} == {"/dev"}


def test_mount_holding_root_itself_is_slash() -> None:
    view = HostView(root="/host/")
    mounts = parse_mountinfo("1 0 0:40 / / rw - overlay overlay rw\n")
    device_map = Host(view=view, mounts=mounts, dev_roots={"/dev": FULL}).build()
    assert {d.mount.mount_point for d in device_map.devices if d.mount} == {"/"}


# ---------------------------------------------------------------- ordering and sorting


def test_devices_sorted_by_name_and_problems_by_severity_code_path() -> None:
    nodes = [
        char("nvidia1", 195, 1),
        char("nvidiactl", 195, 254),
        char("nvidia-caps-imex-channels/channel3", 237, 3),
        char("nvidia0", 195, 0),
        char("nvidia-nvswitch2", 511, 2),
    ]
    device_map = Host(
        dev_roots={"/dev": nodes},
        proc_devices=fixture_text("proc-devices/imex-before-caps.txt"),
        gpus=[H200],
    ).build()
    assert names(device_map) == sorted(n.name for n in nodes)
    assert problems(device_map) == [
        ("missing-node", "error", "/dev/nvidia-uvm"),
        ("wrong-major", "error", "/dev/nvidia-nvswitch2"),
        ("wrong-minor", "error", "/dev/nvidiactl"),
        ("missing-node", "warning", "/dev/nvidia-uvm-tools"),
    ]


def test_every_problem_has_a_message() -> None:
    device_map = operator_host(
        dev_roots={"/dev": (), OPERATOR_DEV: ISSUE_2685},
        driver_ready=fixture_text("driver-ready/no-driver-root.env"),
    ).build()
    assert len(device_map.problems) == 3
    assert all(isinstance(p, Problem) and len(p.message) > 20 for p in device_map.problems)
