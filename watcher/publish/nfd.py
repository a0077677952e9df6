"""The Node Feature Discovery feature file, written atomically (blocking: run off the loop).

NFD's worker watches its `features.d` directory and reads every file whose name does not
start with `.`; a file is read whole, so a reader must never find half of one. Hence: a
temporary dot file in the same directory (same file system, and ignored by NFD), written and
fsynced, then renamed over the feature file. On any error the temporary file is removed, so
nothing is ever left behind.
"""

from __future__ import annotations

import os
import stat

from watcher import atomicfile

__all__ = ["remove_if_ours", "write_atomically"]

# Feature files are world-readable on the host: NFD's worker runs as another user.
_MODE = 0o644


def write_atomically(path: str, data: bytes) -> int:
    """Replace `path` by a file holding exactly `data`, readable by NFD's worker whatever the
    umask (the unit sets 0077); returns the new file's inode.

    Raises OSError (the file at `path` is then untouched and no temporary file remains).
    """
    directory, name = os.path.split(path)
    return atomicfile.write_atomically(directory or ".", name, data, mode=_MODE)


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
