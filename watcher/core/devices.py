"""The NVIDIA device family, as data, and the `/proc/devices` parser.

Adding a node type means adding a `NodeSpec`; the scanner only walks this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from watcher.core.model import Kind

__all__ = ["NVIDIA", "Family", "NodeSpec", "ProcDevicesError", "parse_proc_devices"]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One kind of node: how its name looks, which major and minor the driver gives it.

    `pattern` matches the whole name relative to the dev root. When `minor` is None the
    expected minor is the number captured by the pattern's `n` group (`nvidia3` is 195:3).
    """

    kind: Kind
    pattern: re.Pattern[str]
    majors: tuple[str, ...]
    minor: int | None = None

    def expected_minor(self, match: re.Match[str]) -> int:
        if self.minor is not None:
            return self.minor
        return int(match.group("n"))


@dataclass(frozen=True, slots=True)
class Family:
    """A driver's node family: its specs and the subdirectories of the dev root it uses."""

    specs: tuple[NodeSpec, ...]
    subdirs: tuple[str, ...]
    # Names in /proc/devices that prove the driver is loaded.
    core_majors: tuple[str, ...]

    def match(self, name: str) -> tuple[NodeSpec, int] | None:
        """The spec a name belongs to and the minor it should carry, or None."""
        for spec in self.specs:
            found = spec.pattern.fullmatch(name)
            if found is not None:
                return spec, spec.expected_minor(found)
        return None

    def registered_major(self, spec: NodeSpec, majors: dict[str, int]) -> int | None:
        for name in spec.majors:
            if name in majors:
                return majors[name]
        return None

    def loaded(self, majors: dict[str, int]) -> bool:
        return any(name in majors for name in self.core_majors)


# Drivers before 550.40 registered 195 as "nvidia-frontend"; later ones as "nvidia".
_CORE = ("nvidia", "nvidia-frontend")
_NUMBER = r"(?P<n>0|[1-9][0-9]{0,5})"

NVIDIA = Family(
    specs=(
        NodeSpec("control", re.compile(r"nvidiactl"), _CORE, 255),
        NodeSpec("modeset", re.compile(r"nvidia-modeset"), _CORE, 254),
        NodeSpec("gpu", re.compile(rf"nvidia{_NUMBER}"), _CORE),
        NodeSpec("uvm", re.compile(r"nvidia-uvm"), ("nvidia-uvm",), 0),
        NodeSpec("uvm-tools", re.compile(r"nvidia-uvm-tools"), ("nvidia-uvm",), 1),
        NodeSpec("cap", re.compile(rf"nvidia-caps/nvidia-cap{_NUMBER}"), ("nvidia-caps",)),
        NodeSpec(
            "imex-channel",
            re.compile(rf"nvidia-caps-imex-channels/channel{_NUMBER}"),
            ("nvidia-caps-imex-channels",),
        ),
        NodeSpec("nvswitch-control", re.compile(r"nvidia-nvswitchctl"), ("nvidia-nvswitch",), 255),
        NodeSpec("nvswitch", re.compile(rf"nvidia-nvswitch{_NUMBER}"), ("nvidia-nvswitch",)),
    ),
    subdirs=("nvidia-caps", "nvidia-caps-imex-channels"),
    core_majors=_CORE,
)


class ProcDevicesError(ValueError):
    pass


def parse_proc_devices(text: str) -> dict[str, int]:
    """Character-device majors by name from `/proc/devices`.

    Only the "Character devices:" section counts: a block driver of the same name must not
    lend its major. Names are whole tokens, so `nvidia-caps` never matches
    `nvidia-caps-imex-channels`. A name registered twice keeps its first major.
    """
    majors: dict[str, int] = {}
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            section = line[:-1].strip().lower()
            continue
        if section != "character devices":
            continue
        fields = line.split(None, 1)
        if len(fields) != 2 or not (fields[0].isascii() and fields[0].isdigit()):
            shown = raw if len(raw) <= 120 else raw[:117] + "..."  # a line may be 1 MiB
            raise ProcDevicesError(f"line {number}: expected '<major> <name>', got {shown!r}")
        majors.setdefault(fields[1].strip(), int(fields[0]))
    return majors
