"""Admission: who may connect (SO_PEERCRED against the access lists) and how many at once.

``allowed_uids`` / ``allowed_gids`` are checked with SO_PEERCRED (and SO_PEERGROUPS for
supplementary groups) at accept time, and again for every open connection when a reload
changes them. Root and the daemon's own user are always admitted. Beyond ``max_clients``
a client gets ``busy``. A refused client gets its one error line, then the server stops
writing and waits (bounded) for the client to finish, so the client reads the line rather
than a broken pipe.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import struct
from typing import Final

from watcher.config import Settings
from watcher.server.protocol import encode_error

__all__ = ["Admission", "Peer", "peer_of"]

log = logging.getLogger("watcher.server")

_UCRED: Final = struct.Struct("3i")
# SO_PEERGROUPS (Linux 4.13) is missing from Python's socket module; 59 is its value on the
# architectures that use asm-generic/socket.h. Elsewhere only the primary gid is checked.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", None) or (
    59 if platform.machine() in {"x86_64", "aarch64", "riscv64", "ppc64le", "s390x"} else None
)
# Python's getsockopt caps the buffer at 1024 bytes: up to 256 supplementary groups.
_PEERGROUPS_BUFLEN: Final = 1024


class Peer:
    """Who is at the other end of a connection, as the kernel saw it at connect time."""

    __slots__ = ("gid", "groups", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int, groups: tuple[int, ...]) -> None:
        self.pid, self.uid, self.gid, self.groups = pid, uid, gid, groups


def peer_of(raw: socket.socket) -> Peer:
    """SO_PEERCRED (and the supplementary groups); raises OSError."""
    pid, uid, gid = _UCRED.unpack(
        raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid, _peer_groups(raw))


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Admit by `settings` from now on (start, and every reload)."""
        self.settings = settings
        self.busy_line = encode_error(
            "busy", f"too many clients (max_clients={settings.max_clients}); try again later"
        )

    @property
    def restricted(self) -> bool:
        return self.settings.allowed_uids is not None or self.settings.allowed_gids is not None

    def refusal(self, peer: Peer | None, clients: int) -> bytes | None:
        """The error line for a new connection, or None to admit it. `peer` may be None
        when no access list is set (the credentials are then not needed)."""
        if peer is not None and not self.allowed(peer):
            log.info(
                "refused a client: pid %d uid %d gid %d is not allowed",
                peer.pid,
                peer.uid,
                peer.gid,
            )
            return encode_error(
                "forbidden",
                f"uid {peer.uid} (gid {peer.gid}) is not in allowed_uids or allowed_gids",
            )
        if clients >= self.settings.max_clients:
            log.warning("refused a client: max_clients=%d reached", self.settings.max_clients)
            return self.busy_line
        return None

    def allowed(self, peer: Peer) -> bool:
        # Root, and the daemon's own user, could reach the map anyway (ptrace, /proc, the
        # socket file itself), so refusing them would only break operators' tools.
        if peer.uid in (0, os.geteuid()):
            return True
        uids, gids = self.settings.allowed_uids, self.settings.allowed_gids
        if uids is None and gids is None:
            return True
        if uids is not None and peer.uid in uids:
            return True
        if gids is None:
            return False
        return peer.gid in gids or not gids.isdisjoint(peer.groups)


def _peer_groups(raw: socket.socket) -> tuple[int, ...]:
    if _SO_PEERGROUPS is None:
        return ()
    try:
        data = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
    except OSError:
        # ERANGE: more groups than fit; the primary gid alone decides.
        return ()
    return struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
