"""scan() on real host trees: tmpfs mounts, mknod'ed nodes and symlinks in a private namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.core.model import DeviceMap

from .hostlayout import HostLayout, ScanResult

pytestmark = pytest.mark.realfs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
OPERATOR_ROOT = "/run/nvidia/driver"
OPERATOR_DEV = "/run/nvidia/driver/dev"
MAJORS_580 = {"nvidia": 195, "nvidia-caps": 234, "nvidia-uvm": 509}
FULL_NAMES = [
    "nvidia-caps/nvidia-cap1",
    "nvidia-caps/nvidia-cap2",
    "nvidia-modeset",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia0",
    "nvidiactl",
]


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode("utf-8")


def nvidia_nodes(layout: HostLayout, dev: str, *, uvm: int = 509, tools: bool = True) -> None:
    """The listing of gpu-operator#2685, plus nvidia-uvm-tools unless told otherwise."""
    layout.node(f"{dev}/nvidia-caps/nvidia-cap1", 234, 1, mode=0o400)
    layout.node(f"{dev}/nvidia-caps/nvidia-cap2", 234, 2, mode=0o444)
    layout.node(f"{dev}/nvidia-modeset", 195, 254)
    layout.node(f"{dev}/nvidia-uvm", uvm, 0)
    if tools:
        layout.node(f"{dev}/nvidia-uvm-tools", uvm, 1)
    layout.node(f"{dev}/nvidia0", 195, 0)
    layout.node(f"{dev}/nvidiactl", 195, 255)


def loaded_driver(layout: HostLayout, majors: dict[str, int] | None = None) -> None:
    layout.proc_devices(majors or MAJORS_580)
    layout.driver_version("580.95.05")
    layout.gpu("0000:3b:00.0", 0)


def container_dev(
    layout: HostLayout, dev: str = "/dev", *, options: str = "nosuid,mode=755"
) -> None:
    """A /dev as container runtimes make it: a tmpfs with a few standard nodes."""
    layout.tmpfs(dev, options=options)
    layout.node(f"{dev}/null", 1, 3)
    layout.node(f"{dev}/zero", 1, 5)


def gpu_operator(layout: HostLayout, *, dev_options: str = "nosuid,size=65536k,mode=755") -> None:
    """The host of CRIU issue 2509: the driver container's root rbound at /run/nvidia/driver."""
    container_dev(layout)
    layout.tmpfs("/run", options="nosuid,nodev,noexec,mode=755")  # the host's /run is nodev
    layout.mkdir("/run/nvidia/validations")
    layout.file("/run/nvidia/toolkit.pid", "4242\n")
    layout.tmpfs(OPERATOR_ROOT, options="mode=755", source="driver-rootfs")
    layout.tmpfs(OPERATOR_DEV, options=dev_options)
    layout.mount("devpts", f"{OPERATOR_DEV}/pts", options="newinstance,gid=5,mode=620,ptmxmode=666")
    layout.mount("mqueue", f"{OPERATOR_DEV}/mqueue", options="nosuid,nodev,noexec,relatime")
    layout.tmpfs(f"{OPERATOR_DEV}/log", options="nosuid,nodev,noexec,relatime,mode=755")
    layout.bind_file(f"{OPERATOR_DEV}/termination-log")
    layout.tmpfs(
        f"{OPERATOR_DEV}/shm", source="shm", options="nosuid,nodev,noexec,relatime,size=65536k"
    )


def problems(device_map: DeviceMap) -> list[tuple[str, str, str | None]]:
    return [(p.code, p.severity, p.path) for p in device_map.problems]


def names(device_map: DeviceMap) -> list[str]:
    return [device.name for device in device_map.devices]


def invalid(device_map: DeviceMap) -> list[str]:
    return [device.name for device in device_map.devices if not device.valid]


def mount_id_at(result: ScanResult, fs_path: str) -> int:
    (entry,) = [e for e in result.mounts().entries if e.mount_point == fs_path]
    return entry.id


# ---------------------------------------------------------------- layouts


def test_host_driver_in_dev(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    loaded_driver(layout)
    result = layout.scan()
    device_map = result.map
    assert device_map.generation == 0
    assert device_map.updated.endswith("Z")
    assert device_map.driver.loaded is True
    assert device_map.driver.version == "580.95.05"
    assert (device_map.driver.root, device_map.driver.dev_root) == ("/", "/dev")
    assert device_map.driver.source == "detected"
    assert problems(device_map) == []
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    dev_mount = mount_id_at(result, f"{layout.root}/dev")
    for device in device_map.devices:
        assert device.path == f"/dev/{device.name}"
        assert device.mount is not None
        assert (device.mount.id, device.mount.mount_point, device.mount.fstype) == (
            dev_mount,
            "/dev",
            "tmpfs",
        )
    control = device_map.device("nvidiactl")
    assert control is not None
    assert (control.kind, control.major, control.minor, control.mode) == (
        "control",
        195,
        255,
        "0666",
    )
    cap1 = device_map.device("nvidia-caps/nvidia-cap1")
    assert cap1 is not None
    assert (cap1.kind, cap1.mode) == ("cap", "0400")
    (gpu,) = device_map.gpus
    assert (gpu.minor, gpu.bus_id, gpu.model, gpu.device) == (
        0,
        "0000:3b:00.0",
        "NVIDIA H200",
        "/dev/nvidia0",
    )


def test_gpu_operator_driver_root_criu_2509(layout: HostLayout) -> None:
    """The headline: nodes only under /run/nvidia/driver/dev, on the driver's own tmpfs."""
    gpu_operator(layout)
    nvidia_nodes(layout, OPERATOR_DEV)
    loaded_driver(layout)
    result = layout.scan()
    device_map = result.map
    assert device_map.driver.loaded is True
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert device_map.driver.source == "detected"
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    dev_tmpfs = mount_id_at(result, f"{layout.root}{OPERATOR_DEV}")
    for device in device_map.devices:
        assert device.path == f"{OPERATOR_DEV}/{device.name}"
        assert device.mount is not None
        assert device.mount.id == dev_tmpfs
        assert device.mount.mount_point == OPERATOR_DEV
        assert device.mount.fstype == "tmpfs"
        assert device.mount.source == "tmpfs"
        assert device.mount.nodev is False
        assert "nosuid" in device.mount.options
    assert problems(device_map) == [("not-in-dev", "warning", OPERATOR_DEV)]
    assert device_map.gpus[0].device == f"{OPERATOR_DEV}/nvidia0"
    # The submounts of issue 2509 are there, and none of them was taken for the nodes'.
    mounted = {e.mount_point: e for e in result.mounts().entries}
    for sub, fstype in [
        ("pts", "devpts"),
        ("mqueue", "mqueue"),
        ("log", "tmpfs"),
        ("termination-log", "tmpfs"),
        ("shm", "tmpfs"),
    ]:
        entry = mounted[f"{layout.root}{OPERATOR_DEV}/{sub}"]
        assert entry.fstype == fstype
        assert entry.parent_id == dev_tmpfs
    assert mounted[f"{layout.root}/run"].nodev is True


def test_empty_driver_root_gpu_operator_425(layout: HostLayout) -> None:
    container_dev(layout)
    layout.tmpfs("/run", options="nosuid,nodev,noexec,mode=755")
    layout.mkdir(OPERATOR_ROOT)
    layout.mkdir("/run/nvidia/validations")
    layout.file("/run/nvidia/toolkit.pid", "4242\n")
    layout.proc_devices({"drm": 226})
    device_map = layout.scan().map
    assert device_map.driver.loaded is False
    assert device_map.driver.version is None
    assert (device_map.driver.root, device_map.driver.dev_root) == (None, None)
    assert device_map.devices == ()
    assert problems(device_map) == [
        ("driver-not-loaded", "error", None),
        ("driver-root-empty", "error", OPERATOR_ROOT),
        ("no-device-root", "error", None),
    ]


def test_missing_uvm_tools_gpu_operator_2685(layout: HostLayout) -> None:
    gpu_operator(layout)
    nvidia_nodes(layout, OPERATOR_DEV, tools=False)
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert names(device_map) == [n for n in FULL_NAMES if n != "nvidia-uvm-tools"]
    assert invalid(device_map) == []
    assert problems(device_map) == [
        ("missing-node", "warning", f"{OPERATOR_DEV}/nvidia-uvm-tools"),
        ("not-in-dev", "warning", OPERATOR_DEV),
    ]


def test_stale_uvm_major_after_driver_reload(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev", uvm=509)
    loaded_driver(layout, {"nvidia": 195, "nvidia-caps": 234, "nvidia-uvm": 510})
    device_map = layout.scan().map
    assert device_map.driver.dev_root == "/dev"
    assert invalid(device_map) == ["nvidia-uvm", "nvidia-uvm-tools"]
    assert problems(device_map) == [
        ("wrong-major", "error", "/dev/nvidia-uvm"),
        ("wrong-major", "error", "/dev/nvidia-uvm-tools"),
    ]


def test_old_nvidia_frontend_name_and_wrong_minor(layout: HostLayout) -> None:
    container_dev(layout)
    layout.node("/dev/nvidiactl", 195, 255)
    layout.node("/dev/nvidia0", 195, 0)
    layout.node("/dev/nvidia1", 195, 7)
    layout.proc_devices({"nvidia-frontend": 195, "nvidia-nvlink": 234})
    layout.gpu("0000:3b:00.0", 0)
    layout.gpu("0000:86:00.0", 1)
    device_map = layout.scan().map
    assert device_map.driver.loaded is True
    assert device_map.driver.version is None
    assert invalid(device_map) == ["nvidia1"]
    assert problems(device_map) == [("wrong-minor", "error", "/dev/nvidia1")]
    assert [(g.minor, g.device) for g in device_map.gpus] == [
        (0, "/dev/nvidia0"),
        (1, "/dev/nvidia1"),
    ]


def test_nodev_mount(layout: HostLayout) -> None:
    gpu_operator(layout, dev_options="nosuid,nodev,mode=755")
    nvidia_nodes(layout, OPERATOR_DEV)
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert invalid(device_map) == FULL_NAMES
    assert all(d.mount is not None and d.mount.nodev for d in device_map.devices)
    assert problems(device_map) == [
        *[("nodev-mount", "error", f"{OPERATOR_DEV}/{name}") for name in FULL_NAMES],
        ("not-in-dev", "warning", OPERATOR_DEV),
    ]


def test_planted_symlink_is_never_followed(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    layout.steps = [s for s in layout.steps if s.get("path") != "/dev/nvidiactl"]
    # /dev/null of the real host: a character device, 1:3, if anyone followed the link.
    layout.symlink("/dev/nvidiactl", "/dev/null")
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.driver.dev_root == "/dev"
    assert "nvidiactl" not in names(device_map)
    assert invalid(device_map) == []
    assert problems(device_map) == [("not-char-device", "error", "/dev/nvidiactl")]
    assert "symlink to '/dev/null' (not followed)" in device_map.problems[0].message


def test_block_device_with_the_right_numbers(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    layout.steps = [s for s in layout.steps if s.get("path") != "/dev/nvidia0"]
    layout.node("/dev/nvidia0", 195, 0, mode=0o660, block=True)
    loaded_driver(layout)
    device_map = layout.scan().map
    gpu = device_map.device("nvidia0")
    assert gpu is not None
    assert (gpu.kind, gpu.major, gpu.minor, gpu.mode, gpu.valid) == ("gpu", 195, 0, "0660", False)
    assert problems(device_map) == [("not-char-device", "error", "/dev/nvidia0")]


@pytest.mark.parametrize(
    ("link", "target"),
    [
        # The whole driver root is a link to a tree holding valid nodes.
        (OPERATOR_ROOT, "../../opt/real-driver"),
        # The driver root is real, its dev directory a link.
        (OPERATOR_DEV, "../../../opt/real-driver/dev"),
    ],
)
def test_symlinked_dev_dir_component_is_not_followed(
    layout: HostLayout, link: str, target: str
) -> None:
    container_dev(layout)
    layout.tmpfs("/opt/real-driver/dev", options="nosuid,mode=755")
    nvidia_nodes(layout, "/opt/real-driver/dev")
    if link == OPERATOR_DEV:
        layout.mkdir(OPERATOR_ROOT)
    layout.symlink(link, target)
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.devices == ()
    assert device_map.driver.dev_root is None
    assert problems(device_map) == [
        ("driver-root-empty", "error", OPERATOR_ROOT),
        ("no-device-root", "error", None),
    ]


def test_symlinked_caps_directory_is_not_followed(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    layout.steps = [s for s in layout.steps if "nvidia-caps/" not in s.get("path", "")]
    layout.node("/opt/caps/nvidia-cap1", 234, 1, mode=0o400)
    layout.symlink("/dev/nvidia-caps", "../opt/caps")
    loaded_driver(layout)
    device_map = layout.scan().map
    assert names(device_map) == [n for n in FULL_NAMES if not n.startswith("nvidia-caps/")]
    assert problems(device_map) == []


@pytest.mark.parametrize(
    ("driver_root", "in_mountinfo"),
    [
        ("/opt/nv driver", "/host\\040root/opt/nv\\040driver/dev "),
        ("/opt/nv\tdriver", "/host\\040root/opt/nv\\011driver/dev "),
        ("/opt/nv\\driver", "/host\\040root/opt/nv\\134driver/dev "),
        # The kernel leaves "\r" raw: it must survive reading and parsing the table.
        ("/opt/nv\rdriver", "/host\\040root/opt/nv\rdriver/dev "),
    ],
    ids=["space", "tab", "backslash", "carriage-return"],
)
def test_mount_point_needing_escapes(workdir: Path, driver_root: str, in_mountinfo: str) -> None:
    layout = HostLayout(workdir, root_name="host root")
    dev = f"{driver_root}/dev"
    container_dev(layout)
    layout.tmpfs(driver_root, options="mode=755")
    layout.tmpfs(dev, options="nosuid,mode=755")
    nvidia_nodes(layout, dev)
    layout.config_roots("/", driver_root)
    loaded_driver(layout)
    result = layout.scan()
    assert in_mountinfo in result.mountinfo
    device_map = result.map
    assert device_map.driver.source == "config"
    assert device_map.driver.root == driver_root
    assert device_map.driver.dev_root == dev
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    dev_tmpfs = mount_id_at(result, f"{layout.root}{dev}")
    for device in device_map.devices:
        assert device.path == f"{dev}/{device.name}"
        assert device.mount is not None
        assert (device.mount.id, device.mount.mount_point, device.mount.fstype) == (
            dev_tmpfs,
            dev,
            "tmpfs",
        )
    assert problems(device_map) == [("not-in-dev", "warning", dev)]


def test_driver_ready_names_the_root(layout: HostLayout) -> None:
    gpu_operator(layout)
    nvidia_nodes(layout, OPERATOR_DEV)
    # A valid host driver in /dev too: driver-ready still comes first.
    nvidia_nodes(layout, "/dev")
    layout.driver_ready(fixture_text("driver-ready/gpu-operator-container.env"))
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.driver.source == "validations"
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    assert problems(device_map) == []


def test_stale_driver_ready(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    layout.tmpfs("/run", options="nosuid,nodev,noexec,mode=755")
    layout.mkdir(OPERATOR_DEV)
    layout.driver_ready(fixture_text("driver-ready/quoted.env"))
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.driver.source == "detected"
    assert device_map.driver.dev_root == "/dev"
    assert problems(device_map) == [
        ("driver-root-empty", "warning", OPERATOR_ROOT),
        ("validations-mismatch", "warning", "/run/nvidia/validations/driver-ready"),
    ]


def test_root_reached_through_a_symlink(layout: HostLayout) -> None:
    container_dev(layout)
    nvidia_nodes(layout, "/dev")
    loaded_driver(layout)
    link = layout.workdir / "root-link"
    layout.fs_symlink(link, layout.root).through(link)
    device_map = layout.scan().map
    assert device_map.driver.dev_root == "/dev"
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    assert problems(device_map) == []


@pytest.mark.parametrize("target", ["../run", "/run"])
@pytest.mark.parametrize("named_by", ["config", "driver-ready"])
def test_driver_root_reached_through_a_symlinked_parent(
    layout: HostLayout, target: str, named_by: str
) -> None:
    # /var/run -> /run on most hosts: a driver root spelled through it is the real one, its
    # nodes found and attributed to the mounts the table lists at the real paths. (Before,
    # the O_NOFOLLOW walk stopped at var/run: "not a directory", no nodes.)
    gpu_operator(layout)
    nvidia_nodes(layout, OPERATOR_DEV)
    loaded_driver(layout)
    layout.mkdir("/var")
    layout.symlink("/var/run", target)
    spelled = "/var/run/nvidia/driver"
    if named_by == "config":
        layout.config_roots("/", spelled)
    else:
        # Only driver-ready names it: /run/nvidia/driver is not a fallback candidate.
        layout.config_roots("/")
        layout.driver_ready(f"NVIDIA_DRIVER_ROOT={spelled}\n")
    result = layout.scan()
    device_map = result.map
    assert device_map.driver.root == OPERATOR_ROOT
    assert device_map.driver.dev_root == OPERATOR_DEV
    assert names(device_map) == FULL_NAMES
    assert invalid(device_map) == []
    control = next(d for d in device_map.devices if d.name == "nvidiactl")
    assert control.mount is not None
    assert control.mount.mount_point == OPERATOR_DEV
    assert control.mount.id == mount_id_at(result, f"{layout.root}{OPERATOR_DEV}")
    assert all(p.code not in ("no-device-root", "driver-root-empty") for p in device_map.problems)


def test_a_symlinked_driver_root_itself_is_still_not_followed(layout: HostLayout) -> None:
    # Only the ancestors are resolved: a link at the driver root is refused as before.
    container_dev(layout)
    layout.tmpfs("/opt/real-driver/dev", options="nosuid,mode=755")
    nvidia_nodes(layout, "/opt/real-driver/dev")
    layout.mkdir("/var/run/nvidia")
    layout.symlink("/var/run/nvidia/driver", "../../../opt/real-driver")
    layout.config_roots("/", "/var/run/nvidia/driver")
    loaded_driver(layout)
    device_map = layout.scan().map
    assert device_map.devices == ()
    assert device_map.driver.dev_root is None
