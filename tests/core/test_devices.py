"""watcher.core.devices: the /proc/devices parser and the NVIDIA family table."""

from __future__ import annotations

import pytest

from watcher.core.devices import NVIDIA, ProcDevicesError, parse_proc_devices
from watcher.core.model import Kind

from ._fixtures import fixture_text

NVIDIA_NAMES = (
    "nvidia",
    "nvidia-frontend",
    "nvidia-uvm",
    "nvidia-caps",
    "nvidia-caps-imex-channels",
    "nvidia-nvswitch",
    "nvidia-nvlink",
)


def nvidia_majors(majors: dict[str, int]) -> dict[str, int]:
    return {name: major for name, major in majors.items() if name in NVIDIA_NAMES}


# ---------------------------------------------------------------- /proc/devices


@pytest.mark.parametrize(
    ("name", "expected", "loaded"),
    [
        # Current naming (driver >= 550.40) with the dynamic majors of gpu-operator#2685.
        (
            "proc-devices/nvidia-580.txt",
            {"nvidia": 195, "nvidia-caps": 234, "nvidia-uvm": 509},
            True,
        ),
        # Old naming (toolkit#324) and the majors from the toolkit's tests.
        (
            "proc-devices/frontend-535.txt",
            {
                "nvidia-frontend": 195,
                "nvidia-nvlink": 234,
                "nvidia-caps": 235,
                "nvidia-uvm": 510,
                "nvidia-nvswitch": 511,
            },
            True,
        ),
        # dra-driver-nvidia-gpu#304: the imex line comes first and must not lend its major.
        (
            "proc-devices/imex-before-caps.txt",
            {
                "nvidia": 195,
                "nvidia-caps-imex-channels": 237,
                "nvidia-caps": 238,
                "nvidia-uvm": 239,
            },
            True,
        ),
        (
            "proc-devices/imex-only.txt",
            {"nvidia": 195, "nvidia-caps-imex-channels": 237, "nvidia-uvm": 487},
            True,
        ),
        # Only the block section names nvidia: the character driver is not loaded.
        ("proc-devices/block-nvidia-only.txt", {}, False),
        ("proc-devices/not-loaded.txt", {}, False),
    ],
)
def test_proc_devices_fixtures(name: str, expected: dict[str, int], loaded: bool) -> None:
    majors = parse_proc_devices(fixture_text(name))
    assert nvidia_majors(majors) == expected
    assert NVIDIA.loaded(majors) is loaded


def test_proc_devices_keeps_other_character_drivers_and_skips_block() -> None:
    majors = parse_proc_devices(fixture_text("proc-devices/nvidia-580.txt"))
    assert majors["mem"] == 1
    assert majors["cpu/msr"] == 202
    # "4 /dev/vc/0" then "4 tty": names with slashes are whole names.
    assert majors["/dev/vc/0"] == 4
    assert majors["tty"] == 4
    assert "sd" not in majors
    assert "device-mapper" not in majors
    assert "blkext" not in majors


def test_nvidia_caps_is_not_taken_from_the_imex_line() -> None:
    majors = parse_proc_devices(fixture_text("proc-devices/imex-only.txt"))
    assert "nvidia-caps" not in majors
    cap = NVIDIA.match("nvidia-caps/nvidia-cap1")
    imex = NVIDIA.match("nvidia-caps-imex-channels/channel0")
    assert cap is not None
    assert imex is not None
    assert NVIDIA.registered_major(cap[0], majors) is None
    assert NVIDIA.registered_major(imex[0], majors) == 237


def test_block_section_nvidia_does_not_lend_its_major() -> None:
    text = "Character devices:\n  1 mem\n\nBlock devices:\n195 nvidia\n"
    majors = parse_proc_devices(text)
    assert majors == {"mem": 1}
    assert NVIDIA.loaded(majors) is False


def test_lines_before_any_section_are_ignored() -> None:
    assert parse_proc_devices("195 nvidia\nCharacter devices:\n  1 mem\n") == {"mem": 1}


def test_first_registration_of_a_name_wins() -> None:
    text = "Character devices:\n195 nvidia\n196 nvidia\n"
    assert parse_proc_devices(text) == {"nvidia": 195}


@pytest.mark.parametrize(
    "text",
    [
        fixture_text("proc-devices/malformed.txt"),
        "Character devices:\n195\n",
        "Character devices:\n19x nvidia\n",
        "Character devices:\n-1 nvidia\n",
        "Character devices:\n1\u00b2 nvidia\n",
    ],
)
def test_malformed_character_line_raises(text: str) -> None:
    with pytest.raises(ProcDevicesError, match=r"line \d+: expected '<major> <name>'"):
        parse_proc_devices(text)


def test_malformed_line_number_is_reported() -> None:
    with pytest.raises(ProcDevicesError, match=r"^line 3: "):
        parse_proc_devices(fixture_text("proc-devices/malformed.txt"))


def test_malformed_block_line_is_ignored() -> None:
    assert parse_proc_devices("Character devices:\n195 nvidia\n\nBlock devices:\nbad\n") == {
        "nvidia": 195
    }


# ---------------------------------------------------------------- family table


@pytest.mark.parametrize(
    ("name", "kind", "minor", "major_names"),
    [
        ("nvidiactl", "control", 255, ("nvidia", "nvidia-frontend")),
        ("nvidia-modeset", "modeset", 254, ("nvidia", "nvidia-frontend")),
        ("nvidia0", "gpu", 0, ("nvidia", "nvidia-frontend")),
        ("nvidia7", "gpu", 7, ("nvidia", "nvidia-frontend")),
        ("nvidia15", "gpu", 15, ("nvidia", "nvidia-frontend")),
        ("nvidia-uvm", "uvm", 0, ("nvidia-uvm",)),
        ("nvidia-uvm-tools", "uvm-tools", 1, ("nvidia-uvm",)),
        ("nvidia-caps/nvidia-cap1", "cap", 1, ("nvidia-caps",)),
        ("nvidia-caps/nvidia-cap2", "cap", 2, ("nvidia-caps",)),
        ("nvidia-caps/nvidia-cap0", "cap", 0, ("nvidia-caps",)),
        ("nvidia-caps-imex-channels/channel0", "imex-channel", 0, ("nvidia-caps-imex-channels",)),
        (
            "nvidia-caps-imex-channels/channel2047",
            "imex-channel",
            2047,
            ("nvidia-caps-imex-channels",),
        ),
        ("nvidia-nvswitchctl", "nvswitch-control", 255, ("nvidia-nvswitch",)),
        ("nvidia-nvswitch0", "nvswitch", 0, ("nvidia-nvswitch",)),
        ("nvidia-nvswitch11", "nvswitch", 11, ("nvidia-nvswitch",)),
    ],
)
def test_family_names(name: str, kind: Kind, minor: int, major_names: tuple[str, ...]) -> None:
    matched = NVIDIA.match(name)
    assert matched is not None
    spec, expected_minor = matched
    assert (spec.kind, expected_minor, spec.majors) == (kind, minor, major_names)


@pytest.mark.parametrize(
    "name",
    [
        "nvidia",
        "nvidia-uvmx",
        "nvidia-uvm-tool",
        "nvidia00",  # leading zero: the driver never names a node like this
        "nvidia01",
        "nvidia-1",
        "nvidia1a",
        "nvidia-caps",
        "nvidia-caps-imex-channels",
        "nvidia-nvlink",
        "nvidia-cap1",  # only inside nvidia-caps/
        "nvidia-caps/nvidia-cap",
        "nvidia-caps/nvidia-cap01",
        "nvidia-caps/channel0",
        "nvidia-caps-imex-channels/nvidia-cap1",
        "nvidia-caps-imex-channels/channel",
        "nvidia-nvswitch",
        "nvidia-nvswitchctl0",
        "other/nvidiactl",
        "nvidiactl/",
        "NVIDIACTL",
        "nvidiactl ",
        "nvidia0\n",
        "nvidia\u0661",  # Arabic-Indic digit one: not a minor
        "dri/card0",
    ],
)
def test_non_family_names(name: str) -> None:
    assert NVIDIA.match(name) is None


def test_family_subdirs_and_core_majors() -> None:
    assert NVIDIA.subdirs == ("nvidia-caps", "nvidia-caps-imex-channels")
    assert NVIDIA.core_majors == ("nvidia", "nvidia-frontend")


@pytest.mark.parametrize(
    ("majors", "name", "expected"),
    [
        ({"nvidia": 195}, "nvidiactl", 195),
        ({"nvidia-frontend": 195}, "nvidia0", 195),
        ({"nvidia": 195, "nvidia-uvm": 509}, "nvidia-uvm-tools", 509),
        ({"nvidia": 195}, "nvidia-uvm", None),
        ({"nvidia-caps": 234}, "nvidia-caps/nvidia-cap1", 234),
        ({"nvidia-nvswitch": 511}, "nvidia-nvswitchctl", 511),
        ({"nvidia-nvlink": 234}, "nvidia-nvswitch0", None),
    ],
)
def test_registered_major(majors: dict[str, int], name: str, expected: int | None) -> None:
    matched = NVIDIA.match(name)
    assert matched is not None
    assert NVIDIA.registered_major(matched[0], majors) == expected
