"""The socket file: bound under a private name, given its mode and group, listening, then
moved onto its path; unlinked on exit only if it is still ours (same inode).

The socket directory may be writable by users other than the daemon's (a hostPath shared
with a DaemonSet, a badly set up /run subdirectory). Such a user can swap any name the
daemon creates there, so the file is never touched by a name in that directory: it is
bound inside a private directory (mode 0700, created here, opened without following a
symlink, checked to be ours), and its mode and group are set and its move made relative
to that directory's fd. fchmod()/fchown() on the socket fd would not do: on Linux they
change the socket's own inode, not the file the path names.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import socket
import stat
from typing import Final

from watcher.errors import SocketInUseError, SocketSetupError

__all__ = [
    "SocketInUseError",
    "SocketSetupError",
    "UnixServerSocket",
    "bind_unix_socket",
    "ensure_socket_directory",
    "resolve_group",
    "unlink_socket",
]

_SUN_PATH_MAX: Final = 107  # sizeof(sun_path) - 1 for the terminating NUL
_GID_MAX: Final = 2**32 - 2  # (gid_t) -1 means "leave unchanged"
_NAME: Final = "s"


class UnixServerSocket(socket.socket):
    """A listening socket that remembers its path and the inode of its socket file."""

    __slots__ = ("inode", "path")
    inode: int
    path: str


def bind_unix_socket(
    path: str, mode: int = 0o660, group: str | int | None = None
) -> UnixServerSocket:
    """A listening Unix socket at `path`, which appears only once it accepts connections.

    A stale socket (its server is dead) is replaced; a live one raises `SocketInUseError`;
    anything that is not a socket is left alone and raises `SocketSetupError`.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise SocketSetupError(
            f"socket path {path} is too long ({len(os.fsencode(path))} bytes;"
            f" a Unix socket path has at most {_SUN_PATH_MAX})"
        )
    gid = resolve_group(group)
    directory, base = os.path.split(path)
    ensure_socket_directory(directory)
    _existing(path)  # fail early, before creating anything
    try:
        # The directory itself is the operator's choice and may be reached through a
        # symlink (/var/run); everything below it is handled through fds.
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise SocketSetupError(f"cannot create socket in {directory}: {error.strerror}") from None
    try:
        return _bind_in(dir_fd, directory, base, path=path, mode=mode, gid=gid)
    finally:
        os.close(dir_fd)


def ensure_socket_directory(directory: str) -> None:
    """Create the socket's own directory (`/run/gpu-device-watcher`) if missing: mode 0755,
    owned by the daemon's user (root, in the shipped deployments).

    Only the last component is made; its parent must exist. It is made private (0700) and
    opened without following links before it is opened up to 0755, so the mode never lands
    on something swapped in meanwhile. An existing directory is used as it is (a hostPath or
    a systemd socket unit made it); a symlink or anything else there is refused.
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        try:
            info = os.lstat(directory)
        except OSError as error:
            raise SocketSetupError(f"cannot examine {directory}: {error.strerror}") from error
        if not stat.S_ISDIR(info.st_mode):
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
            raise SocketSetupError(
                f"{directory} exists and is {kind}; the socket's directory must be a real "
                "directory (remove it, or choose another socket path)"
            ) from None
        return
    except OSError as error:
        raise SocketSetupError(
            f"cannot create the socket directory {directory}: {error.strerror}"
        ) from error
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
    except OSError as error:
        raise SocketSetupError(
            f"cannot set up the socket directory {directory}: {error.strerror}"
        ) from error


def _bind_in(
    dir_fd: int, directory: str, base: str, *, path: str, mode: int, gid: int | None
) -> UnixServerSocket:
    private = f".{base}.{secrets.token_hex(4)}.d"
    try:
        os.mkdir(private, 0o700, dir_fd=dir_fd)
    except OSError as error:
        raise SocketSetupError(f"cannot create socket in {directory}: {error.strerror}") from None
    sock = UnixServerSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    private_fd: int | None = None
    try:
        try:
            private_fd = os.open(
                private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
            info = os.fstat(private_fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise SocketSetupError(
                    f"{directory} changed under the daemon while the socket was set up"
                    " (another user can write there?)"
                )
            # Bound through the fd: the name in `directory` may be swapped meanwhile, the
            # directory the fd holds cannot (only its owner can add entries to it).
            sock.bind(f"/proc/self/fd/{private_fd}/{_NAME}")
        except OSError as error:
            raise SocketSetupError(
                f"cannot create socket in {directory}: {error.strerror}"
            ) from error
        try:
            os.chmod(_NAME, mode, dir_fd=private_fd)
            if gid is not None:
                os.chown(_NAME, -1, gid, dir_fd=private_fd, follow_symlinks=False)
            sock.listen(socket.SOMAXCONN)
            sock.inode = os.stat(_NAME, dir_fd=private_fd, follow_symlinks=False).st_ino
            _install(private_fd, dir_fd, base, path)
        except OSError as error:
            raise SocketSetupError(f"cannot set up socket {path}: {error.strerror}") from error
    except BaseException:
        sock.close()
        raise
    finally:
        if private_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_NAME, dir_fd=private_fd)
            os.close(private_fd)
        # Not followed if swapped for a symlink (rmdir does not follow); an empty directory
        # of someone else's is removed at worst.
        with contextlib.suppress(OSError):
            os.rmdir(private, dir_fd=dir_fd)
    sock.path = path
    return sock


def _install(private_fd: int, dir_fd: int, base: str, path: str) -> None:
    for _ in range(3):
        if _existing(path):
            # rename() swaps the stale file for ours in one step: no moment without a socket.
            os.rename(_NAME, base, src_dir_fd=private_fd, dst_dir_fd=dir_fd)
            return
        try:
            # Nothing there: link() rather than rename() so that a socket that appeared since
            # the check (a second daemon starting) is never silently replaced.
            os.link(_NAME, base, src_dir_fd=private_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:
            # A filesystem without hard links for sockets: the narrow race is accepted.
            os.rename(_NAME, base, src_dir_fd=private_fd, dst_dir_fd=dir_fd)
        return
    raise SocketSetupError(f"{path} keeps changing while being set up; is another daemon starting?")


def _existing(path: str) -> bool:
    """True for a stale socket at `path`, False for nothing; raises for anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise SocketSetupError(f"cannot examine {path}: {error.strerror}") from error
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise SocketSetupError(
            f"{path} exists and is {kind}; refusing to replace it (remove it or choose"
            " another socket path)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except FileNotFoundError:
            return False
        except (BlockingIOError, TimeoutError):
            pass  # a full backlog: someone is listening
        except OSError as error:
            raise SocketSetupError(
                f"cannot tell whether {path} is in use: {error.strerror}"
            ) from error
    raise SocketInUseError(f"another gpu-device-watcher is serving {path}")


def resolve_group(group: str | int | None) -> int | None:
    """The gid of `socket_group` (a name, a number, or a number written as a string)."""
    if group is None:
        return None
    if isinstance(group, str) and group.isascii() and group.isdigit():
        group = int(group)
    if isinstance(group, int):
        if not 0 <= group <= _GID_MAX:
            raise SocketSetupError(
                f"socket_group {group}: not a group id (0 to {_GID_MAX}, or a group name)"
            )
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise SocketSetupError(f"socket_group {group!r}: no such group") from None


def unlink_socket(path: str, inode: int) -> bool:
    """Remove `path` if it is still our socket (same inode); True when removed.

    A successor that already bound the path (a restart that overlapped) keeps its socket.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode) or info.st_ino != inode:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
