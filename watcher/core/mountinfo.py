"""Parse `/proc/<pid>/mountinfo` and find which mount holds a path.

Line format (proc(5)):

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7...)  (8) (9)    (10)         (11)

Fields 4, 5 and 10 escape space, tab, newline and backslash as `\\040 \\011 \\012 \\134`;
there may be zero or several optional fields before the ` - ` separator.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "MountEntry",
    "MountTable",
    "MountinfoError",
    "PathFilter",
    "escape",
    "parse_line",
    "parse_mountinfo",
    "unescape",
]

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# The kernel escapes exactly these; anything else reaching us unescaped is taken literally.
_NEEDS_ESCAPE = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


def unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _OCTAL_ESCAPE.sub(lambda found: chr(int(found.group(1), 8)), text)


def escape(text: str) -> str:
    """The kernel's escaping of a path field (the inverse of `unescape`)."""
    return "".join(_NEEDS_ESCAPE.get(char, char) for char in text)


class MountinfoError(ValueError):
    def __init__(self, line_number: int, reason: str, line: str) -> None:
        shown = line if len(line) <= 120 else line[:117] + "..."
        super().__init__(f"mountinfo line {line_number}: {reason}: {shown!r}")
        self.line_number = line_number
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MountEntry:
    id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def nodev(self) -> bool:
        return "nodev" in self.options


def _is_number(text: str) -> bool:
    # str.isdigit() accepts "²" and other Unicode digits that int() rejects or misreads.
    return text.isascii() and text.isdigit()


def parse_line(line: str, line_number: int = 1) -> MountEntry:
    fields = line.split(" ")
    try:
        separator = fields.index("-", 6)
    except ValueError:
        raise MountinfoError(line_number, "no ' - ' separator after field 6", line) from None
    if separator < 6:
        raise MountinfoError(line_number, "fewer than 6 fields before ' - '", line)
    if len(fields) - separator != 4:
        raise MountinfoError(
            line_number, "expected fstype, source and super options after ' - '", line
        )
    mount_id, parent_id, device, root, mount_point, options = fields[:6]
    if not (_is_number(mount_id) and _is_number(parent_id)):
        raise MountinfoError(line_number, "mount and parent ids must be numbers", line)
    major, colon, minor = device.partition(":")
    if not (colon and _is_number(major) and _is_number(minor)):
        raise MountinfoError(line_number, "device must be MAJOR:MINOR", line)
    if not mount_point.startswith("/"):
        raise MountinfoError(line_number, "mount point must be absolute", line)
    fstype, source, super_options = fields[separator + 1 :]
    return MountEntry(
        id=int(mount_id),
        parent_id=int(parent_id),
        major=int(major),
        minor=int(minor),
        root=unescape(root),
        mount_point=unescape(mount_point),
        options=tuple(options.split(",")),
        optional=tuple(fields[6:separator]),
        fstype=unescape(fstype),
        source=unescape(source),
        super_options=tuple(super_options.split(",")),
    )


@dataclass(slots=True)
class MountTable:
    """A parsed mount table: entries in kernel order and the lines that did not parse."""

    entries: list[MountEntry]
    errors: list[MountinfoError] = field(default_factory=list)
    _children: dict[tuple[int, str], MountEntry] | None = None

    def _index(self) -> dict[tuple[int, str], MountEntry]:
        if self._children is None:
            # A later entry with the same parent and mount point was mounted after the earlier
            # one and sits on top of it; keeping the last one keeps the visible one.
            self._children = {(entry.parent_id, entry.mount_point): entry for entry in self.entries}
        return self._children

    def _root(self) -> MountEntry | None:
        ids = {entry.id for entry in self.entries}
        for entry in self.entries:
            if entry.parent_id not in ids or entry.parent_id == entry.id:
                return entry
        return None

    def resolve(self, path: str) -> MountEntry | None:
        """The mount whose filesystem a lookup of the absolute `path` lands in.

        Walks from the root mount down the path, at each prefix following the mount stacked
        there, so a mount hidden by a later mount over one of its ancestors is never chosen.
        """
        children = self._index()
        current = self._root()
        if current is None:
            return None
        prefix = "/"
        current = _top_of_stack(children, current, prefix)
        for component in path.split("/"):
            if not component:
                continue
            prefix = prefix + component if prefix == "/" else f"{prefix}/{component}"
            current = _top_of_stack(children, current, prefix)
        return current


def _top_of_stack(
    children: dict[tuple[int, str], MountEntry], current: MountEntry, prefix: str
) -> MountEntry:
    seen = {current.id}
    while (above := children.get((current.id, prefix))) is not None and above.id not in seen:
        seen.add(above.id)
        current = above
    return current


class PathFilter:
    """Keeps only the lines that can matter when resolving paths in or under `paths`.

    Resolving a path walks the mounts on its ancestors; attributing a node under a dev root
    needs the mounts on and below that root. Every other line of a 10,000-mount table is
    skipped after one cheap split, before any unescaping or object is made.
    """

    def __init__(self, paths: Iterable[str], ancestors_of: Iterable[str] = ()) -> None:
        self.paths = tuple(path.rstrip("/") or "/" for path in paths)
        # Paths whose own mount matters (it exists, it is a directory) but not what lies
        # below them: a driver root, whose container mounts churn beside its dev root.
        self.ancestors_of = tuple(path.rstrip("/") or "/" for path in ancestors_of)
        self._ancestors: set[str] = {"/"}
        for path in self.paths + self.ancestors_of:
            parts = [part for part in path.split("/") if part]
            for depth in range(1, len(parts) + 1):
                self._ancestors.add("/" + "/".join(parts[:depth]))
        self._below = tuple(path + "/" for path in self.paths if path != "/")

    @property
    def key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Equal for two filters that keep the same lines."""
        return self.paths, self.ancestors_of

    def wants(self, mount_point: str) -> bool:
        """For a mount point as mountinfo writes it (escaped)."""
        if "\\" in mount_point:
            mount_point = unescape(mount_point)
        return self.covers(mount_point)

    def covers(self, mount_point: str) -> bool:
        """For a plain path (statmount's): a backslash in it is a backslash."""
        return mount_point in self._ancestors or mount_point.startswith(self._below)


def parse_mountinfo(text: str | Iterable[str], relevant: PathFilter | None = None) -> MountTable:
    """Parse a table; malformed lines are collected in `errors`, never fatal.

    With `relevant`, lines whose mount point cannot matter for those paths are skipped.
    """
    # Only "\n" ends a line: the kernel leaves "\r", "\x85", "\u2028"... unescaped in paths,
    # and str.splitlines() would cut a mount point containing one of them in two.
    lines = text.split("\n") if isinstance(text, str) else text
    entries: list[MountEntry] = []
    errors: list[MountinfoError] = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if relevant is not None:
            fields = line.split(" ", 5)
            if len(fields) == 6 and not relevant.wants(fields[4]):
                continue
        try:
            entries.append(parse_line(line.rstrip("\n"), number))
        except MountinfoError as error:
            errors.append(error)
    return MountTable(entries, errors)
