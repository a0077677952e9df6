"""Where the daemon looks for `cuda-checkpoint` on the host (blocking: run off the loop).

The contract: an executable `cuda-checkpoint` in the driver root's `usr/bin`, else in
`/usr/local/bin` or `/usr/bin` of the host (all under `--root`), else none. The map of this
version does not carry `driver.cuda_checkpoint` yet; once it does, take it from there and
drop this module (see `Publisher`).
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Final

from watcher.core.scan import HostView

__all__ = ["HOST_BIN_DIRS", "find_cuda_checkpoint", "is_executable"]

NAME: Final = "cuda-checkpoint"
HOST_BIN_DIRS: Final = ("/usr/local/bin", "/usr/bin")
# As the kernel's limit on symlinks followed in one lookup.
_MAX_LINKS: Final = 40


def candidates(driver_root: str | None) -> list[str]:
    """The host paths looked at, in order (the driver root's own first)."""
    dirs = [posixpath.join(driver_root, "usr/bin")] if driver_root else []
    dirs += HOST_BIN_DIRS
    return [posixpath.join(directory, NAME) for directory in dict.fromkeys(dirs)]


def is_executable(view: HostView, host_path: str) -> bool:
    """A regular file with an execute bit, symlinks in the last component followed inside
    the host view: under `--root /host` an absolute link such as `/usr/bin/cuda-checkpoint ->
    /opt/cuda/bin/cuda-checkpoint` means the host's /opt, not this container's."""
    path = host_path
    for _ in range(_MAX_LINKS):
        try:
            info = os.lstat(view.fs_path(path))
        except (OSError, ValueError):
            return False
        if not stat.S_ISLNK(info.st_mode):
            return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)
        try:
            target = os.readlink(view.fs_path(path))
        except OSError:
            return False
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return False


def find_cuda_checkpoint(view: HostView, driver_root: str | None) -> str | None:
    """The host path of the first executable `cuda-checkpoint`, or None."""
    for path in candidates(driver_root):
        if is_executable(view, path):
            return path
    return None
