"""One file replaced in one rename: a reader finds the old file or the whole new one.

Used for what other programs read while we write it: the CRIU record (CRIU and the restore
gate), the NFD feature file (NFD's worker), the installed action file (CRIU). Standard
library `os` only: the CRIU action imports it at pre-dump, and `install-action` packs it.
"""

from __future__ import annotations

import os

__all__ = ["write_atomically"]


def write_atomically(
    directory: str,
    name: str,
    data: bytes,
    *,
    mode: int = 0o644,
    sync_directory: bool = True,
    sync_data: bool = True,
    new_in_place: bool = False,
) -> int:
    """Replace `directory/name` by a file holding exactly `data`, with `mode` whatever the
    umask; returns the new file's inode.

    The directory is opened once and everything happens relative to it, so the temporary
    file and the rename land in the same directory even when `directory` is a link that
    changes meanwhile (CRIU's `CRTOOLS_IMAGE_DIR` is a `/proc/<pid>/fd/<n>` link). The
    temporary name starts with a dot (NFD skips dot files) and is never a link followed.
    Raises OSError; the file at `name` is then untouched and no temporary file remains.
    `sync_directory` also makes the rename itself durable (best effort). Without
    `sync_data` the content is not flushed before the rename: for a file whose neighbours
    are not flushed either, where a crash loses the whole set anyway.

    With `new_in_place`, a `name` that does not exist yet is created and written where it
    is (exclusively: whatever appears there meanwhile, a link included, is never opened),
    saving the temporary file and the rename: for a file nobody reads before its writer is
    done, whose partial content after a crash is refused by its reader. Something already
    at `name` is replaced in one rename as always.
    """
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if new_in_place:
            try:
                return _create_filled(dir_fd, name, data, mode, sync_data)
            except FileExistsError:
                pass  # something is there already: replaced in one rename below
        temporary = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        inode = _create_filled(dir_fd, temporary, data, mode, sync_data)
        try:
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _unlink_quietly(dir_fd, temporary)
            raise
        if sync_directory:
            try:  # noqa: SIM105 (the CRIU action does not import contextlib)
                os.fsync(dir_fd)
            except OSError:
                pass  # some file systems refuse a directory fsync
        return inode
    finally:
        os.close(dir_fd)


def _create_filled(dir_fd: int, name: str, data: bytes, mode: int, sync_data: bool) -> int:
    """Create `name` (exclusively, never through a link: FileExistsError when anything is
    there) holding `data`; its inode. A file that cannot be filled is removed again."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Before the rename: after a crash the file is the old one or the whole new
            # one, never an empty one.
            if sync_data:
                os.fsync(fd)
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(dir_fd, name)
        raise


def _unlink_quietly(dir_fd: int, name: str) -> None:
    # Not contextlib.suppress: the CRIU action does not import contextlib at all.
    try:  # noqa: SIM105
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass  # never created, or already renamed
