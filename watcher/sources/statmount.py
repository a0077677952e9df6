"""The few mounts that can move the map, read one by one (Linux 6.8+, no privileges needed).

A mount-table wake-up says only that something in the namespace was mounted, unmounted or
remounted; re-reading `/proc/self/mountinfo` to learn what costs ~17 ms of kernel time at
10,000 mounts (plus the parsing). Measured on 6.18, as uid 65534 with every capability
dropped as well as root:

* `statx(path, STATX_MNT_ID_UNIQUE)` names the mount a path lands on (64-bit id at 0x90):
  ~4 us. A mount on the path or on one of its ancestors changes it.
* `statmount(id)` gives one mount's attributes, mount point, root, type and source: ~12 us;
  walking its parents gives the stack of mounts the path resolves through.
* `listmount(id)` lists every mount below that mount, recursively, in ascending id order
  (~1.5 ms for 10,000); unique ids only grow, so `listmount(id, after=largest seen)`
  lists only the mounts that are new since (~0.1 ms).

So a wake-up is judged by the mounts on, above and below the paths a scan reads, compared
with what they were (`RelevantMounts.read`), and a scan reads the same mounts instead of
the whole table (`RelevantMounts.table`): resolving a path only ever follows the visible
stack of mounts on its ancestors, which is exactly the parent chain of its statx mount id.

Only relevant mounts are kept in memory. Listing every mount below a mount walks the whole
namespace in the kernel, so a wake-up lists only the ids that are new since the last one,
and rechecks the relevant mounts it knows. A mount *moved* in (`mount --move` keeps its id)
shows as neither: where the namespace's mount count (NS_MNT_GET_INFO, 6.12+) says that a
wake-up added and removed nothing, the mounts below a small mount (32 or fewer under it: a
dev root's tmpfs, /dev) are all listed again. What that cannot see: a mount moved to a place
strictly below a watched path that is not a mount point, inside a mount with more than 32
mounts under it (a /run holding every container's rootfs), or in the same wake-up as an
unrelated mount or umount. A mount moved on or above a watched path is always seen (its
statx id changes), and a scan always lists everything below its paths.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Final

from watcher.core.mountinfo import MountEntry, MountTable, PathFilter, parse_mountinfo
from watcher.sources.fanotify import same_mount_namespace
from watcher.sources.mountapi import (
    LSMT_ROOT,
    STATMOUNT_FS_SUBTYPE,
    STATMOUNT_FS_TYPE,
    STATMOUNT_MNT_BASIC,
    STATMOUNT_MNT_OPTS,
    STATMOUNT_MNT_POINT,
    STATMOUNT_MNT_ROOT,
    STATMOUNT_SB_BASIC,
    STATMOUNT_SB_SOURCE,
    MountApi,
)

__all__ = [
    "MountRecord",
    "MountSyscalls",
    "RelevantMounts",
    "StatmountUnavailable",
    "mount_options",
    "targeted_mismatch",
]

# <linux/stat.h>, <linux/fcntl.h>
STATX_MNT_ID_UNIQUE: Final = 0x4000
AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
_STATX_MASK: Final = struct.Struct("=I")  # stx_mask at 0
_STATX_MNT_ID: Final = struct.Struct("=Q")  # stx_mnt_id at 0x90
_WANTED: Final = (
    STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
    | STATMOUNT_MNT_OPTS
    | STATMOUNT_FS_SUBTYPE
    | STATMOUNT_SB_SOURCE
)
# Without these the records cannot stand in for mountinfo lines. The string fields are
# left out of the answer's mask when they are empty (measured: no MNT_OPTS for a tmpfs
# without options, no FS_SUBTYPE for anything but fuse), so they count as empty then.
_REQUIRED: Final = (
    STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
)
# MOUNT_ATTR_*: the per-mount flags, as mountinfo's sixth field writes them.
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
MOUNT_ATTR_NOATIME: Final = 0x10
MOUNT_ATTR_STRICTATIME: Final = 0x20
MOUNT_ATTR_ATIME: Final = 0x70
MOUNT_ATTR_NODIRATIME: Final = 0x80
MOUNT_ATTR_IDMAP: Final = 0x100000
MOUNT_ATTR_NOSYMFOLLOW: Final = 0x200000
# SB_* flags mountinfo writes among the super options (show_sb_opts).
_SB_RDONLY: Final = 0x1
_SB_OPTIONS: Final = ((0x10, "sync"), (0x80, "dirsync"), (1 << 25, "lazytime"))

_U32: Final = struct.Struct("=I")

# <linux/nsfs.h>: _IOR(0xb7, 10, struct mnt_ns_info {u32 size, nr_mounts; u64 mnt_ns_id})
NS_MNT_GET_INFO: Final = 0x8010B70A
# Below a mount with more mounts than this under it, only new ids are listed per wake-up.
SMALL_SUBTREE: Final = 32


class StatmountUnavailable(Exception):
    """No statx mount ids, statmount or listmount here (kernel, seccomp, C library)."""


def mount_options(attributes: int) -> tuple[str, ...]:
    """mountinfo's per-mount options from statmount's MOUNT_ATTR_* (the kernel's order)."""
    options = ["ro" if attributes & MOUNT_ATTR_RDONLY else "rw"]
    if attributes & MOUNT_ATTR_NOSUID:
        options.append("nosuid")
    if attributes & MOUNT_ATTR_NODEV:
        options.append("nodev")
    if attributes & MOUNT_ATTR_NOEXEC:
        options.append("noexec")
    atime = attributes & MOUNT_ATTR_ATIME
    if atime == MOUNT_ATTR_NOATIME:
        options.append("noatime")
    if attributes & MOUNT_ATTR_NODIRATIME:
        options.append("nodiratime")
    if atime == 0:  # MOUNT_ATTR_RELATIME
        options.append("relatime")
    if attributes & MOUNT_ATTR_NOSYMFOLLOW:
        options.append("nosymfollow")
    if attributes & MOUNT_ATTR_IDMAP:
        options.append("idmapped")
    return tuple(options)


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One mount as statmount tells it; compared whole to see a remount."""

    mount_id: int
    parent: int
    old_id: int
    old_parent: int
    attributes: int
    point: str
    root: str
    fstype: str
    source: str
    options: str
    sb_flags: int
    major: int
    minor: int

    def entry(self) -> MountEntry:
        """The mountinfo line this mount would have (propagation fields left out: the map
        never reads them)."""
        super_options = ["ro" if self.sb_flags & _SB_RDONLY else "rw"]
        super_options += [name for flag, name in _SB_OPTIONS if self.sb_flags & flag]
        if self.options:
            super_options += self.options.split(",")
        return MountEntry(
            id=self.old_id,
            parent_id=self.old_parent,
            major=self.major,
            minor=self.minor,
            root=self.root,
            mount_point=self.point,
            options=mount_options(self.attributes),
            optional=(),
            fstype=self.fstype,
            # mountinfo writes "none" where a mount has no source.
            source=self.source or "none",
            super_options=tuple(super_options),
        )


class MountSyscalls:
    """statx, statmount and listmount through ctypes, with buffers reused per instance (one
    instance per thread)."""

    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        libc = MountSyscalls._libc
        if libc is None:
            try:
                libc = MountSyscalls._libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                libc.statx.restype = ctypes.c_int
            except (OSError, AttributeError) as error:
                raise StatmountUnavailable(f"no statx in the C library: {error}") from None
        self._statx = libc.statx
        self._api = MountApi(libc.syscall)
        self._statx_buffer = ctypes.create_string_buffer(256)
        self._info = bytearray(16)

    def mount_id(self, path: str) -> int:
        """The unique id of the mount `path` lands on (the last component not followed)."""
        result = self._statx(
            AT_FDCWD,
            os.fsencode(path),
            AT_SYMLINK_NOFOLLOW,
            ctypes.c_uint(STATX_MNT_ID_UNIQUE),
            self._statx_buffer,
        )
        if result != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        raw = self._statx_buffer.raw
        if not _STATX_MASK.unpack_from(raw, 0)[0] & STATX_MNT_ID_UNIQUE:
            # Before 6.8 the kernel leaves the bit out and the field holds the old id.
            raise OSError(errno.ENOSYS, "statx without STATX_MNT_ID_UNIQUE", path)
        mount_id: int = _STATX_MNT_ID.unpack_from(raw, 0x90)[0]
        return mount_id

    def statmount(self, mount_id: int) -> MountRecord | None:
        """The mount's attributes; None once it is gone (ENOENT)."""
        reply = self._api.statmount(mount_id, _WANTED)
        if reply is None:
            return None
        if not reply.has(_REQUIRED):
            raise OSError(errno.EINVAL, f"statmount({mount_id}) answered only {reply.mask:#x}")
        basic = reply.basic()
        major, minor = reply.sb_device()
        fstype = reply.string(STATMOUNT_FS_TYPE)
        if subtype := reply.string(STATMOUNT_FS_SUBTYPE):
            fstype = f"{fstype}.{subtype}"  # as mountinfo writes it: fuse.sshfs
        return MountRecord(
            mount_id=mount_id,
            parent=basic.parent,
            old_id=basic.old_id,
            old_parent=basic.old_parent,
            attributes=basic.attributes,
            point=reply.string(STATMOUNT_MNT_POINT),
            root=reply.string(STATMOUNT_MNT_ROOT),
            fstype=fstype,
            source=reply.string(STATMOUNT_SB_SOURCE),
            options=reply.string(STATMOUNT_MNT_OPTS),
            sb_flags=reply.sb_flags(),
            major=major,
            minor=minor,
        )

    def mount_count(self) -> int | None:
        """How many mounts this namespace has (NS_MNT_GET_INFO, 6.12+), or None."""
        try:
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.ioctl(fd, NS_MNT_GET_INFO, self._info)
        except OSError:
            return None  # ENOTTY before 6.12
        finally:
            os.close(fd)
        count: int = _U32.unpack_from(self._info, 4)[0]
        return count

    def listmount(self, mount_id: int, after: int = 0) -> list[int]:
        """The ids of every mount below `mount_id` (recursively) greater than `after`."""
        return self._api.listmount(mount_id, after)


def _under(point: str, path: str) -> bool:
    return point.startswith(path + "/") if path != "/" else point != "/"


@dataclass(slots=True)
class _Subtree:
    """What is kept of the mounts below one mount a watched path lies in."""

    large: bool
    # Mounts below the watched path, by id (the only ones kept).
    below: set[int]


class RelevantMounts:
    """The mounts on, above and below the watched paths, read with statx/statmount/listmount.

    `read(filter)` returns them by unique id; two reads compare equal unless one of them was
    mounted, unmounted, moved or remounted in between (beyond the one gap the module
    docstring names). `table(filter)` gives them as a MountTable for a scan.
    """

    def __init__(self, calls: MountSyscalls | None = None) -> None:
        self._calls = calls if calls is not None else MountSyscalls()
        # Per (watched path, mount it lies in): what is below it, listed incrementally.
        self._subtrees: dict[tuple[str, int], _Subtree] = {}
        # The namespace's mount count and newest mount at the last read: a change that adds
        # no mount and removes none is a remount or a move (or a mount gone again already).
        self._count: int | None = None
        self._newest = 0

    @classmethod
    def open(cls, mountinfo: str, calls: MountSyscalls | None = None) -> RelevantMounts:
        """For the table `mountinfo` (ours only); raises StatmountUnavailable."""
        if not same_mount_namespace(mountinfo):
            raise StatmountUnavailable(f"{mountinfo} is not this process's mount table")
        mounts = cls(calls)
        try:
            root = mounts._calls.mount_id("/")
            mounts._calls.statmount(root)
            mounts._calls.listmount(root, after=LSMT_ROOT - 1)
        except OSError as error:
            # ENOSYS: before 6.8; EPERM: a seccomp filter; EINVAL: an older statmount.
            raise StatmountUnavailable(error.strerror or str(error)) from None
        return mounts

    def read(self, relevant: PathFilter, *, thorough: bool = False) -> dict[int, MountRecord]:
        """The relevant mounts now. Raises OSError when one cannot be read.

        Below a small mount, every mount is listed again when the namespace's count says a
        mount may have moved in (or always: `thorough`, or without the count); otherwise
        only the new ones are (listing all of them walks the whole namespace in the kernel:
        ~0.2 ms at 10,000 mounts, more during a storm).
        """
        count = self._calls.mount_count()
        # Every mount of the namespace newer than the last read (ids only grow): ~3 us.
        fresh = self._calls.listmount(LSMT_ROOT, after=self._newest)
        if fresh:
            self._newest = max(self._newest, *fresh)
        if count is None or (count == self._count and not fresh):
            thorough = True
        self._count = count
        found: dict[int, MountRecord] = {}
        # Every mount read during this read, relevant or not: watched paths often lie in
        # the same mount, whose subtree is then read once.
        seen: dict[int, MountRecord | None] = {}
        subtrees: dict[tuple[str, int], _Subtree] = {}
        for path in relevant.paths:
            top = self._chain(path, found)
            if top is not None:
                key = (path, top)
                known = self._subtrees.get(key)
                subtrees[key] = self._below(
                    path, top, known, found, seen=seen, fresh=fresh, thorough=thorough
                )
        for path in relevant.ancestors_of:
            self._chain(path, found)
        self._subtrees = subtrees
        return found

    def table(self, relevant: PathFilter) -> MountTable:
        """The relevant mounts as mountinfo lines (for a scan: listed thoroughly)."""
        found = self.read(relevant, thorough=True)
        records = sorted(found.values(), key=lambda record: record.mount_id)
        return MountTable([record.entry() for record in records])

    def _chain(self, path: str, found: dict[int, MountRecord]) -> int | None:
        """Add the mounts `path` resolves through; the id of the one it lands on."""
        probe = path
        while True:
            try:
                top = self._calls.mount_id(probe)
                break
            except FileNotFoundError:
                # A missing path lies on its nearest existing ancestor's mount; a mount on
                # the path needs the directory first, and then changes this answer.
                if probe == "/":
                    return None
                probe = os.path.dirname(probe)
            except NotADirectoryError:
                probe = os.path.dirname(probe)
        mount_id = top
        while mount_id not in found:
            record = self._calls.statmount(mount_id)
            if record is None:
                # Unmounted while we looked: the wake-up of that umount follows.
                raise OSError(errno.ENOENT, f"mount {mount_id} went away during the read")
            found[mount_id] = record
            if record.point == "/" or record.parent == mount_id:
                break  # our root: its parent, if any, lies outside what we can see
            mount_id = record.parent
        return top if probe == path else None

    def _below(
        self,
        path: str,
        top: int,
        known: _Subtree | None,
        found: dict[int, MountRecord],
        *,
        seen: dict[int, MountRecord | None],
        fresh: list[int],
        thorough: bool,
    ) -> _Subtree:
        """Add the mounts below `path` (inside `top`); what to keep for the next read."""
        if known is None or (thorough and not known.large):
            ids = self._calls.listmount(top)
            large = len(ids) > SMALL_SUBTREE
            below: set[int] = set()
            for mount_id in ids:
                record = self._statmount(mount_id, found, seen)
                if record is not None and _under(record.point, path):
                    found[mount_id] = record
                    below.add(mount_id)
            return _Subtree(large, below)
        # The known mounts below the path again, and whatever is new in the namespace.
        below = set()
        for mount_id in (*known.below, *fresh):
            record = self._statmount(mount_id, found, seen)
            if record is not None and _under(record.point, path):
                found[mount_id] = record
                below.add(mount_id)
        return _Subtree(known.large, below)

    def _statmount(
        self, mount_id: int, found: dict[int, MountRecord], seen: dict[int, MountRecord | None]
    ) -> MountRecord | None:
        if mount_id in found:
            return found[mount_id]
        if mount_id not in seen:
            seen[mount_id] = self._calls.statmount(mount_id)
        return seen[mount_id]


def targeted_mismatch(mountinfo: str, relevant: PathFilter) -> str | None:
    """Why a table read by statmount would not stand in for `mountinfo` here, or None.

    Checked once per watched table: for every watched path, the mount that the table read
    whole resolves it to must be the one the statmount read resolves it to, field by field
    as the map shows it. A difference (a path through a symlink, a kernel that writes a
    field otherwise) keeps whole-table reads.
    """
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape", newline="\n") as file:
            text = file.read()
        ours = RelevantMounts().table(relevant)
    except OSError as error:
        return f"cannot compare with {mountinfo}: {error.strerror or error}"
    whole = parse_mountinfo(text, relevant)
    for path in relevant.paths + relevant.ancestors_of:
        expected, got = whole.resolve(path), ours.resolve(path)
        if _shown(expected) != _shown(got):
            return f"statmount and {mountinfo} disagree about the mount of {path}"
    return None


def _shown(entry: MountEntry | None) -> tuple[object, ...] | None:
    if entry is None:
        return None
    return (entry.id, entry.mount_point, entry.fstype, entry.source, entry.options)
