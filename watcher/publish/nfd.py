"""The Node Feature Discovery feature file, written atomically (blocking: run off the loop).

NFD's worker watches its `features.d` directory and reads every file whose name does not
start with `.`; a file is read whole, so a reader must never find half of one. Hence: a
temporary dot file in the same directory (same file system, and ignored by NFD), written and
fsynced, then renamed over the feature file. On any error the temporary file is removed, so
nothing is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

__all__ = ["remove_if_ours", "write_atomically"]

# Feature files are world-readable on the host: NFD's worker runs as another user.
_MODE = 0o644


def write_atomically(path: str, data: bytes) -> int:
    """Replace `path` by a file holding exactly `data`; returns the new file's inode.

    Raises OSError (the file at `path` is then untouched and no temporary file remains).
    """
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _MODE)
    try:
        try:
            # O_CREAT's mode went through the umask (the unit sets 0077): NFD must read it.
            os.fchmod(fd, _MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # The content is on disk before the name points at it: after a crash the file is
            # the old one or the new one, never an empty one.
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)
    return inode


def _sync_directory(directory: str) -> None:
    # The rename itself made durable; best effort (some file systems refuse a directory fsync).
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_if_ours(path: str, inode: int) -> bool:
    """Remove `path` if it is still the file we wrote (same inode); True when removed.

    A successor daemon that already wrote its own file (a restart that overlapped) keeps it.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_ino != inode:
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
