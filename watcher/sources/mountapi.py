"""The kernel's mount API, `statmount(2)` and `listmount(2)` (Linux 6.8+), through ctypes.

One home for the request struct, the reply layout and the two calls, shared by the
statmount judge (`sources/statmount.py`, which reads whole mounts) and the fanotify tracker
(`sources/fanotify.py`, which keeps only mount points). Both run without privileges.

The reply is `struct statmount`: a fixed part of 512 bytes, then the strings, each named by
an offset into that string area; a field is present only when its bit is in the reply's
mask (the kernel leaves an empty string out: no MNT_OPTS for a tmpfs without options).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from typing import Final

__all__ = [
    "LSMT_ROOT",
    "STATMOUNT_FS_SUBTYPE",
    "STATMOUNT_FS_TYPE",
    "STATMOUNT_MNT_BASIC",
    "STATMOUNT_MNT_OPTS",
    "STATMOUNT_MNT_POINT",
    "STATMOUNT_MNT_ROOT",
    "STATMOUNT_SB_BASIC",
    "STATMOUNT_SB_SOURCE",
    "MountApi",
    "MountBasic",
    "Reply",
]

# Syscall numbers from the unified table (asm-generic and x86_64 alike since 6.8).
SYS_STATMOUNT: Final = 457
SYS_LISTMOUNT: Final = 458
# listmount's "the root of this namespace as this process sees it".
LSMT_ROOT: Final = 0xFFFFFFFFFFFFFFFF

# <linux/mount.h>: what statmount is asked for.
STATMOUNT_SB_BASIC: Final = 0x1
STATMOUNT_MNT_BASIC: Final = 0x2
STATMOUNT_MNT_ROOT: Final = 0x8
STATMOUNT_MNT_POINT: Final = 0x10
STATMOUNT_FS_TYPE: Final = 0x20
STATMOUNT_MNT_OPTS: Final = 0x80
STATMOUNT_FS_SUBTYPE: Final = 0x100
STATMOUNT_SB_SOURCE: Final = 0x200

# struct mnt_id_req (MNT_ID_REQ_SIZE_VER1): size, mnt_ns_fd, mnt_id, param, mnt_ns_id.
# `param` is the mask for statmount and the last id already seen for listmount.
_REQUEST: Final = struct.Struct("=IIQQQ")
_HEADER: Final = 512
_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_SB_DEVICE: Final = struct.Struct("=II")  # at 16: sb_dev_major, sb_dev_minor
_MNT_BASIC: Final = struct.Struct("=QQIIQ")  # at 40: id, parent, old id, old parent, attr
_SB_FLAGS_AT: Final = 32
# Offsets into str[] of each string field, by the field's mask bit.
_STRING_AT: Final = {
    STATMOUNT_MNT_OPTS: 4,
    STATMOUNT_FS_TYPE: 36,
    STATMOUNT_MNT_ROOT: 104,
    STATMOUNT_MNT_POINT: 108,
    STATMOUNT_FS_SUBTYPE: 120,
    STATMOUNT_SB_SOURCE: 124,
}
_BATCH: Final = 4096
# A reply that does not fit is asked again in a buffer four times larger, up to this.
_LARGEST_REPLY: Final = 1 << 20

StringBuffer = ctypes.Array[ctypes.c_char]


class MountBasic:
    """STATMOUNT_MNT_BASIC of a reply: the ids, old and new, and the MOUNT_ATTR_* flags."""

    __slots__ = ("attributes", "mount_id", "old_id", "old_parent", "parent")

    def __init__(self, raw: bytes) -> None:
        (self.mount_id, self.parent, self.old_id, self.old_parent, self.attributes) = (
            _MNT_BASIC.unpack_from(raw, 40)
        )


class Reply:
    """One statmount answer, read field by field."""

    __slots__ = ("_raw", "_total", "mask")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        (self._total,) = _U32.unpack_from(raw, 0)
        self.mask: int = _U64.unpack_from(raw, 8)[0]

    def has(self, fields: int) -> bool:
        return self.mask & fields == fields

    def string(self, field: int) -> str:
        """A string field (STATMOUNT_MNT_POINT, ...); "" when the kernel left it out."""
        if not self.mask & field:
            return ""
        start = _HEADER + _U32.unpack_from(self._raw, _STRING_AT[field])[0]
        end = self._raw.find(b"\0", start, self._total)
        return os.fsdecode(self._raw[start : end if end >= 0 else self._total])

    def basic(self) -> MountBasic:
        return MountBasic(self._raw)

    def sb_flags(self) -> int:
        flags: int = _U32.unpack_from(self._raw, _SB_FLAGS_AT)[0]
        return flags

    def sb_device(self) -> tuple[int, int]:
        major, minor = _SB_DEVICE.unpack_from(self._raw, 16)
        return major, minor


class MountApi:
    """statmount and listmount with buffers reused per instance: one instance per thread.

    ctypes releases the GIL around each call, so a statmount never stalls the event loop's
    other threads.
    """

    def __init__(self, syscall: Callable[..., int]) -> None:
        self._syscall = syscall
        self._request = ctypes.create_string_buffer(_REQUEST.size)
        self._buffer: StringBuffer = ctypes.create_string_buffer(4096)
        self._ids = (ctypes.c_uint64 * _BATCH)()

    def statmount(self, mount_id: int, mask: int) -> Reply | None:
        """The fields in `mask` of mount `mount_id` (a 64-bit unique id); None once the
        mount is gone (ENOENT). Raises OSError for any other error."""
        _REQUEST.pack_into(self._request, 0, _REQUEST.size, 0, mount_id, mask, 0)
        while True:
            size = len(self._buffer)
            called = self._syscall(
                SYS_STATMOUNT, self._request, self._buffer, ctypes.c_size_t(size), ctypes.c_uint(0)
            )
            if called == 0:
                return Reply(self._buffer.raw)
            code = ctypes.get_errno()
            if code == errno.ENOENT:
                return None
            if code == errno.EOVERFLOW and size < _LARGEST_REPLY:
                # A mount point (or options) longer than the buffer: grow and ask again.
                self._buffer = ctypes.create_string_buffer(size * 4)
                continue
            raise OSError(code, f"statmount({mount_id}): {os.strerror(code)}")

    def listmount(self, mount_id: int = LSMT_ROOT, after: int = 0) -> list[int]:
        """The ids of every mount below `mount_id` (recursively) greater than `after`, in
        ascending order."""
        found: list[int] = []
        while True:
            _REQUEST.pack_into(self._request, 0, _REQUEST.size, 0, mount_id, after, 0)
            count = self._syscall(
                SYS_LISTMOUNT, self._request, self._ids, ctypes.c_size_t(_BATCH), ctypes.c_uint(0)
            )
            if count < 0:
                code = ctypes.get_errno()
                raise OSError(code, f"listmount({mount_id}): {os.strerror(code)}")
            found.extend(self._ids[:count])
            if count < _BATCH:
                return found
            after = found[-1]
