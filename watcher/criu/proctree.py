"""Which device nodes a process tree holds open or mapped, read from `/proc`.

Used by the CRIU action script (`pre-dump`), which CRIU starts as a fresh process: this module
is stdlib only and imports nothing heavy (no asyncio, anyio or msgspec).

Processes are not frozen when CRIU runs `pre-dump` (it seizes the tree afterwards), so every
read tolerates a process or thread that exits mid-walk: it is skipped, never an error.

Devices are identified by their *character-device numbers* (`st_rdev`), never by path: a
container's `/dev/nvidiactl` and the host's `/run/nvidia/driver/dev/nvidiactl` are the same
device 195:255, and the map's host paths are matched to what the tree holds by major:minor.

- `fd`: `os.stat("/proc/PID/fd/N")` follows the fd's magic link to the open inode itself, so
  it works across mount namespaces and for nodes unlinked since they were opened.
- `maps`: the `dev` column of `/proc/PID/maps` is the device of the *filesystem* holding the
  mapped inode (for example 00:06 for devtmpfs), not the char device's number, so the path
  column is resolved in the process's own root and mount namespace
  (`/proc/PID/root/<path>`) and the node found there is accepted only if it is the mapped
  inode (the filesystem device and inode number agree with the maps line). If it is not (the
  node was replaced), `/proc/PID/map_files/<range>` gives the mapped inode itself (that needs
  CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; without it the mapping is skipped). Mappings whose
  path ends in ` (deleted)` are skipped: a `MAP_SHARED` mapping of `/dev/zero` shows up that
  way (it is really shmem), and so does a node unlinked since it was mapped.
"""

from __future__ import annotations

import errno
import os
import stat

# Not imported at run time: collections.abc pulls in `collections` (~2 ms at every CRIU
# pre-dump); the names serve annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "DeviceUse",
    "environment",
    "is_running",
    "open_char_devices",
    "process_tree",
    "used_devices",
]

PROC = "/proc"

# A process, thread or fd that went away between listing and reading: skip it.
_GONE = (errno.ENOENT, errno.ESRCH)
# Per entry (one fd, one mapped path), anything that means "not there any more" or "not
# resolvable from here" skips that entry only.
_ENTRY_SKIP = (*_GONE, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)

_DELETED = " (deleted)"

VIA_FD = "fd"
VIA_MAPS = "maps"


class DeviceUse:
    """One character device held by a process tree: which processes hold it, and how.

    `pids` is sorted; `via` is sorted and holds `"fd"` and/or `"maps"`. A plain class, not a
    dataclass: `dataclasses` imports `inspect`, 12-15 ms on every CRIU pre-dump.
    """

    __slots__ = ("major", "minor", "pids", "via")

    def __init__(self, major: int, minor: int, pids: tuple[int, ...], via: tuple[str, ...]) -> None:
        self.major = major
        self.minor = minor
        self.pids = pids
        self.via = via

    def _key(self) -> tuple[int, int, tuple[int, ...], tuple[str, ...]]:
        return (self.major, self.minor, self.pids, self.via)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeviceUse) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"DeviceUse(major={self.major}, minor={self.minor}, pids={self.pids}, via={self.via})"
        )


# --------------------------------------------------------------------------------------------
# The process tree
#
# The readers below return None when the process is gone and let PermissionError through, so
# that callers can tell "exited" (harmless) from "not allowed to look" (worth reporting).


def _read_bytes(path: str) -> bytes | None:
    # Binary on purpose: no codec lookup (nothing to import after a privilege drop).
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise


def _listdir(path: str) -> list[str] | None:
    try:
        return os.listdir(path)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise


def _children(pid: int, proc: str) -> list[int] | None:
    """Children of every thread of `pid` ([] if it is gone or unreadable).

    None means this kernel has no `task/*/children` (CONFIG_PROC_CHILDREN is off).
    """
    try:
        tids = _listdir(f"{proc}/{pid}/task")
    except PermissionError:
        return []
    found: list[int] = []
    for tid in tids or []:
        if not tid.isdigit():
            continue
        task = f"{proc}/{pid}/task/{tid}"
        try:
            with open(f"{task}/children", "rb") as f:
                data = f.read()
        except OSError as e:
            if e.errno == errno.ENOENT and os.path.isdir(task):
                return None  # the thread is there but the file is not: no such feature
            if e.errno in (*_GONE, errno.EACCES, errno.EPERM):
                continue
            raise
        found.extend(int(c) for c in data.split() if c.isdigit())
    return found


def _parent_map(proc: str) -> dict[int, list[int]]:
    """Parent pid -> child pids, from every `/proc/PID/stat` (the fallback walk)."""
    by_parent: dict[int, list[int]] = {}
    for name in _listdir(proc) or []:
        if not name.isdigit():
            continue
        try:
            data = _read_bytes(f"{proc}/{name}/stat")
        except PermissionError:
            continue
        if data is None:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        _, sep, rest = data.rpartition(b")")
        fields = rest.split()
        if not sep or len(fields) < 2 or not fields[1].isdigit():
            continue
        by_parent.setdefault(int(fields[1]), []).append(int(name))
    return by_parent


def process_tree(root_pid: int, proc: str = PROC) -> list[int]:
    """`root_pid` and all its descendants, root first, then breadth first; no duplicates.

    Children come from `/proc/PID/task/*/children` of every thread (a child's parent is the
    thread that forked it); a kernel without that file is walked through the parent pids in
    `/proc/PID/stat` instead. Processes that exit mid-walk are skipped. An empty list means
    `root_pid` does not exist (or is not visible in `proc`).
    """
    if root_pid <= 0 or not os.path.isdir(f"{proc}/{root_pid}"):
        return []
    order: list[int] = [root_pid]
    seen: set[int] = {root_pid}
    by_parent: dict[int, list[int]] | None = None
    i = 0
    while i < len(order):
        pid = order[i]
        i += 1
        kids = _children(pid, proc) if by_parent is None else None
        if kids is None:
            if by_parent is None:
                by_parent = _parent_map(proc)
            kids = by_parent.get(pid, [])
        for kid in kids:
            if kid not in seen:
                seen.add(kid)
                order.append(kid)
    return order


# --------------------------------------------------------------------------------------------
# Open and mapped character devices


def _fd_devices(pid: int, proc: str) -> set[int] | None:
    """`st_rdev` of every character device `pid` holds open; None if it is gone.

    Raises PermissionError when the fd table may not be read.
    """
    fd_dir = f"{proc}/{pid}/fd"
    names = _listdir(fd_dir)
    if names is None:
        return None
    found: set[int] = set()
    for name in names:
        path = f"{fd_dir}/{name}"
        try:
            # Follows the magic link to the open inode itself; one call whatever the fd is (a
            # socket, pipe or anonymous inode is simply not a character device).
            st = os.stat(path)
        except OSError as e:
            if e.errno in _ENTRY_SKIP:  # closed meanwhile, or not resolvable
                continue
            raise
        if stat.S_ISCHR(st.st_mode):
            found.add(st.st_rdev)
    return found


class _Mapping:
    __slots__ = ("end", "fs_dev", "inode", "path", "start")

    def __init__(self, start: int, end: int, fs_dev: int, inode: int, path: str) -> None:
        self.start = start
        self.end = end
        self.fs_dev = fs_dev
        self.inode = inode
        self.path = path


def _parse_maps_line(line: str | bytes) -> _Mapping | None:
    """A file-backed mapping from one `/proc/PID/maps` line, or None.

    Anonymous mappings, pseudo paths (`[heap]`, `[vdso]`), inode 0 and ` (deleted)` files are
    None. The kernel escapes only newline in the path (as `\\012`): a line ends at `\\n` and
    nowhere else (a `\\r` in a file name is part of the name, never a line break).
    """
    raw = os.fsencode(line) if isinstance(line, str) else line
    parts = raw.split(maxsplit=5)
    if len(parts) < 6:
        return None
    addresses, _perms, _offset, dev, inode_text, raw_path = parts
    if raw_path.endswith(b"\n"):
        raw_path = raw_path[:-1]
    # Paths are bytes; surrogateescape round-trips them to stat.
    path = os.fsdecode(raw_path).replace("\\012", "\n")
    if not path.startswith("/") or path.endswith(_DELETED):
        return None
    try:
        start_text, _, end_text = addresses.partition(b"-")
        start, end = int(start_text, 16), int(end_text, 16)
        major_text, _, minor_text = dev.partition(b":")
        fs_dev = os.makedev(int(major_text, 16), int(minor_text, 16))
        inode = int(inode_text)
    except (ValueError, OverflowError):
        return None
    if inode == 0:
        return None
    return _Mapping(start, end, fs_dev, inode, path)


def _stat_mapping(pid: int, m: _Mapping, proc: str) -> os.stat_result | None:
    """The mapped inode's stat, found through the process's root, else through map_files."""
    try:
        st = os.stat(f"{proc}/{pid}/root{m.path}")
    except OSError as e:
        if e.errno not in _ENTRY_SKIP:
            raise
    else:
        if st.st_ino == m.inode and st.st_dev == m.fs_dev:
            return st
    # The path names another inode now (or nothing): ask for the mapped inode itself.
    try:
        return os.stat(f"{proc}/{pid}/map_files/{m.start:x}-{m.end:x}")
    except OSError as e:
        if e.errno in _ENTRY_SKIP:
            return None
        raise


# Library names kept per dump: a tree maps a few dozen driver libraries; a process that maps
# thousands of files named like one cannot grow the record without bound.
MAX_LIBRARIES = 256
_MAX_NAME = 255  # NAME_MAX


def _library_name(raw_path: bytes, suffix: bytes) -> str | None:
    """The file name of a mapped path when it ends in `suffix` (` (deleted)` or not)."""
    name = raw_path.rstrip(b"\n").rpartition(b"/")[2]
    if name.endswith(b" (deleted)"):
        # A library replaced on disk since it was mapped (a driver upgraded under a running
        # process) is still the version the process needs back.
        name = name[: -len(b" (deleted)")]
    if not name.endswith(suffix) or len(name) > _MAX_NAME:
        return None
    return name.decode("utf-8", "backslashreplace")


# Per inode mapped anywhere in the tree, keyed by the maps line's own `dev` and `inode` text:
# its st_rdev when it is a character device, else None.
_Examined = dict[tuple[bytes, bytes], int | None]


def _maps_devices(
    pid: int,
    proc: str,
    library_suffix: bytes | None = None,
    libraries: set[str] | None = None,
    examined: _Examined | None = None,
) -> set[int] | None:
    """`st_rdev` of every character device `pid` has mapped; None if it is gone.

    With `library_suffix` and `libraries`, the names of mapped files that end in the suffix
    are added to `libraries` (at most MAX_LIBRARIES). Raises PermissionError when the maps may
    not be read.

    The maps are streamed line by line (binary, so a line ends at b"\\n" only), and each mapped
    inode is examined once, for every process that shares `examined`: an inode is a device
    node or not whichever process maps it, and the processes of a tree map the same
    libraries (a CUDA process maps a few hundred files). Memory stays bounded whatever the
    size of the maps (a process with 60,000 mappings of a long-named file has 63 MiB of them).
    """
    try:
        maps = open(f"{proc}/{pid}/maps", "rb")  # noqa: SIM115 (closed below, errors apart)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    found: set[int] = set()
    examined = {} if examined is None else examined
    with maps:
        try:
            for line in maps:
                parts = line.split(maxsplit=5)
                # Anonymous and pseudo mappings ([heap], [vdso]) have no absolute path.
                if len(parts) < 6 or not parts[5].startswith(b"/"):
                    continue
                if library_suffix and libraries is not None and library_suffix in parts[5]:
                    name = _library_name(parts[5], library_suffix)
                    if name is not None and len(libraries) < MAX_LIBRARIES:
                        libraries.add(name)
                key = (parts[3], parts[4])
                if key in examined:
                    rdev = examined[key]
                else:
                    rdev = _mapped_device(pid, line, proc, examined, key)
                if rdev is not None:
                    found.add(rdev)
        except OSError as e:
            if e.errno in _GONE:  # exited while its maps were read
                return None
            raise
    return found


def _mapped_device(
    pid: int, line: bytes, proc: str, examined: _Examined, key: tuple[bytes, bytes]
) -> int | None:
    """The st_rdev of the character device one maps line maps, or None; remembered in
    `examined` when the answer holds for every process (the inode was found)."""
    m = _parse_maps_line(line)
    if m is None:
        # Not remembered: a node unlinked since this process mapped it (" (deleted)") may be
        # mapped by another process, or again, through a name that still stands.
        return None
    st = _stat_mapping(pid, m, proc)
    if st is None:
        return None  # not resolvable from this process: another may still tell
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) else None
    examined[key] = rdev
    return rdev


def open_char_devices(
    pids: Iterable[int],
    proc: str = PROC,
    *,
    unreadable: list[int] | None = None,
    library_suffix: str | None = None,
    libraries: set[str] | None = None,
) -> dict[tuple[int, int], DeviceUse]:
    """(major, minor) -> DeviceUse for every character device the pids hold open or mapped.

    A pid that is gone is skipped. A pid whose fd table or maps may not be read (EACCES,
    EPERM) is skipped too; if `unreadable` is given, such pids are appended to it. With
    `library_suffix` and `libraries`, the names of mapped files ending in the suffix (the
    driver's versioned libraries: `.so.580.95.05`) are collected into `libraries`.
    """
    holders: dict[int, set[int]] = {}
    ways: dict[int, set[str]] = {}
    suffix = library_suffix.encode() if library_suffix else None
    examined: _Examined = {}
    for pid in dict.fromkeys(pids):
        for via in (VIA_FD, VIA_MAPS):
            try:
                found = (
                    _fd_devices(pid, proc)
                    if via == VIA_FD
                    else _maps_devices(pid, proc, suffix, libraries, examined)
                )
            except PermissionError:
                if unreadable is not None and pid not in unreadable:
                    unreadable.append(pid)
                continue
            for rdev in found or ():
                holders.setdefault(rdev, set()).add(pid)
                ways.setdefault(rdev, set()).add(via)
    result: dict[tuple[int, int], DeviceUse] = {}
    for rdev in sorted(holders):
        major, minor = os.major(rdev), os.minor(rdev)
        result[(major, minor)] = DeviceUse(
            major, minor, tuple(sorted(holders[rdev])), tuple(sorted(ways[rdev]))
        )
    return result


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def used_devices(
    root_pid: int,
    devices: Sequence[Mapping[str, object]],
    proc: str = PROC,
    *,
    unreadable: list[int] | None = None,
    library_suffix: str | None = None,
    libraries: set[str] | None = None,
) -> list[dict[str, object]]:
    """The contract's `used` entries: each map device held by the tree under `root_pid`.

    `devices` is the map's `devices` list (dicts with name, path, kind, major, minor, valid).
    A device matches by (major, minor), whatever path the processes opened it by. Entries are
    `{"name", "path", "kind", "major", "minor", "valid", "pids", "via"}` and the device's
    `family` when the map has one, sorted by name,
    with `pids` and `via` sorted lists. Map entries without integer numbers are ignored.
    """
    held = open_char_devices(
        process_tree(root_pid, proc),
        proc,
        unreadable=unreadable,
        library_suffix=library_suffix,
        libraries=libraries,
    )
    used: list[dict[str, object]] = []
    for device in devices:
        major, minor = _number(device.get("major")), _number(device.get("minor"))
        if major is None or minor is None:
            continue
        use = held.get((major, minor))
        if use is None:
            continue
        used.append(
            {
                "name": device.get("name"),
                "path": device.get("path"),
                "kind": device.get("kind"),
                "major": major,
                "minor": minor,
                "valid": device.get("valid"),
                "pids": list(use.pids),
                "via": list(use.via),
            }
        )
        if isinstance(device.get("family"), str):
            used[-1]["family"] = device["family"]  # maps before the AMD family have none
    used.sort(key=lambda entry: str(entry["name"]))
    return used


# --------------------------------------------------------------------------------------------
# The tree's root: is it there, and its environment


def is_running(pid: int, proc: str = PROC) -> bool:
    """True when `pid` exists and is neither a zombie nor dead (`/proc/PID/stat`)."""
    if pid <= 0:
        return False
    try:
        data = _read_bytes(f"{proc}/{pid}/stat")
    except PermissionError:
        return True  # there, but not ours to look at
    if data is None:
        return False
    fields = data.rpartition(b")")[2].split()
    return bool(fields) and fields[0] not in (b"Z", b"X", b"x")


_ENV_CHUNK = 65536


def environment(
    pid: int, names: Sequence[str], proc: str = PROC, *, limit: int = 4096
) -> dict[str, str]:
    """Those of `names` set in `pid`'s environment, each value cut to `limit` characters.

    `/proc/PID/environ` is streamed: memory stays bounded by the chunk size and `limit`, however
    large the environment (up to a quarter of the stack limit). Bytes that are not UTF-8 are
    kept as backslash escapes. A process that is gone, or not ours to read, has none.
    """
    wanted = {name.encode(): name for name in names}
    keep = max((len(name) for name in wanted), default=0) + 1 + limit * 4
    found: dict[str, str] = {}

    def take(entry: bytes) -> None:
        key, sep, value = entry.partition(b"=")
        name = wanted.get(key)
        if sep and name is not None and name not in found:  # the first one, as getenv
            found[name] = value.decode("utf-8", "backslashreplace")[:limit]

    try:
        with open(f"{proc}/{pid}/environ", "rb") as file:
            carry = b""
            while chunk := file.read(_ENV_CHUNK):
                entries = (carry + chunk).split(b"\0")
                carry = entries.pop()
                for entry in entries:
                    take(entry)
                # An entry longer than anything worth keeping: its head is all that matters.
                carry = carry[:keep]
            if carry:
                take(carry)
    except OSError as e:
        if e.errno in (*_GONE, errno.EACCES, errno.EPERM):
            return {}
        raise
    return found
