"""Which `cuda-checkpoint` CRIU's CUDA plugin runs, and whether it is our wrapper.

CRIU's CUDA plugin runs `cuda-checkpoint` by bare name through CRIU's `PATH`. The project's
wrapper (a `/bin/sh` front, `scripts/cuda-checkpoint`, also written by `install-action DIR`)
stands first on that `PATH` and runs the real binary: the first one on `PATH` past itself,
else the map's `driver.cuda_checkpoint`. This module answers the questions about that chain
for the dump check, the restore gate, the wrapper's Python side and `doctor`. Standard
library only (the CRIU action and the wrapper import it); nothing here runs a binary.

Public names:

- `WRAPPER_MARKER`: a line present in every wrapper file the project writes or installs.
- `is_wrapper(path, *, root="/")`: whether the file at `path` (a host path, read under
  `root`) is such a wrapper. Reads at most `MARKER_WINDOW` bytes of a regular file; a FIFO,
  a device or a directory is never opened for reading, and symbolic links are resolved inside
  `root` (an absolute link target means the same path under `root`), never outside it.
- `resolve_on_path(path_env, root="/")`: the host path of the `cuda-checkpoint` that a PATH
  value leads to, as `execvp` would pick it (the first regular, executable file of that name),
  looked up under `root` (`--root /host`); None when there is none. Empty and relative
  entries mean the working directory, as for execvp, and are skipped under another root.
- `find_real(path_env, *, skip, map_cuda_checkpoint, root="/")`: the real binary the wrapper
  would run: the first executable `cuda-checkpoint` on `path_env` that is neither `skip` (the
  wrapper itself, compared by the file it resolves to) nor any wrapper, else
  `map_cuda_checkpoint` (the map's `driver.cuda_checkpoint`) when it is an executable that is
  not a wrapper; None when there is none. Host paths, as given (links not resolved).
- `host_path_in_root(path, root)`: where a host path lies under `root`, links resolved inside.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "MARKER_WINDOW",
    "NAME",
    "WRAPPER_MARKER",
    "find_real",
    "host_path_in_root",
    "is_wrapper",
    "resolve_on_path",
]

NAME = "cuda-checkpoint"
WRAPPER_MARKER = "gpu-device-watcher cuda-checkpoint wrapper"
# The marker sits in the wrapper's first lines; a real binary is never read further.
MARKER_WINDOW = 4096
_MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup


def host_path_in_root(path: str, root: str = "/") -> str | None:
    """`path` (absolute, of the host) as a path under `root`, every link resolved inside root.

    None when a link loops or the path is not absolute. With root "/" this is the path with
    its links resolved, as the kernel would.
    """
    if not path.startswith("/"):
        return None
    base = os.path.abspath(root)
    if base == "/":
        return os.path.realpath(path)
    pending = [part for part in path.split("/") if part]
    pending.reverse()
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()  # never above root: ".." of root is root
            continue
        current = base + "/" + "/".join([*resolved, part])
        try:
            target = os.readlink(current)
        except OSError:
            resolved.append(part)  # not a link (or absent): taken as it is
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([piece for piece in target.split("/") if piece]))
    return base + "/" + "/".join(resolved) if resolved else base


def _regular_executable(real: str) -> bool:
    try:
        status = os.stat(real)
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and bool(status.st_mode & 0o111)


def is_wrapper(path: str | os.PathLike[str], *, root: str = "/") -> bool:
    """Whether `path` (a host path, under `root`) is a wrapper this project wrote."""
    text = os.fspath(path)
    real = host_path_in_root(text, root) if text.startswith("/") else os.path.realpath(text)
    if real is None:
        return False
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the caller; it is refused
        # just below, as is anything else that is not a regular file.
        descriptor = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return False
        head = os.read(descriptor, MARKER_WINDOW)
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return head.startswith(b"#!") and WRAPPER_MARKER.encode() in head


def _candidates(path_env: str, root: str) -> Iterator[tuple[str, str]]:
    """(host path, resolved path under root) of each executable `cuda-checkpoint` on PATH, in
    PATH's order, found as they are asked for (the first is often all that is needed)."""
    under_root = os.path.abspath(root) != "/"
    for entry in path_env.split(os.pathsep):
        if not entry.startswith("/") and under_root:
            continue  # the working directory of a process of another root: unknowable
        host = os.path.join(os.path.abspath(entry or "."), NAME)
        # Under "/" the kernel resolves links itself: one stat per entry, no realpath (this
        # runs inside pre-dump, for every PATH entry).
        real = host_path_in_root(host, root) if under_root else host
        if real is not None and _regular_executable(real):
            yield host, real


def resolve_on_path(path_env: str, root: str = "/") -> str | None:
    """The host path of the `cuda-checkpoint` that `path_env` leads to, or None."""
    return next((host for host, _ in _candidates(path_env, root)), None)


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def find_real(
    path_env: str, *, skip: str | None, map_cuda_checkpoint: str | None, root: str = "/"
) -> str | None:
    """The real `cuda-checkpoint` the wrapper would run (host path), or None."""
    skipped = host_path_in_root(skip, root) if skip and skip.startswith("/") else skip
    for host, real in _candidates(path_env, root):
        if skipped is not None and _same_file(real, skipped):
            continue
        if not is_wrapper(host, root=root):
            return host
    if map_cuda_checkpoint and map_cuda_checkpoint.startswith("/"):
        in_root = host_path_in_root(map_cuda_checkpoint, root)
        if (
            in_root is not None
            and _regular_executable(in_root)
            and not is_wrapper(map_cuda_checkpoint, root=root)
        ):
            return map_cuda_checkpoint
    return None
