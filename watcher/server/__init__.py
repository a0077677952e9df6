"""The Unix socket server, in parts: `server` (the `Server`: accepts and runs one task per
connection), `framing` (lines in, replies out), `admission` (peer credentials and limits),
`handlers` (what each op answers), `fanout` (subscribers), `protocol` (the request and reply
structs) and `socketfile` (the socket file's lifecycle)."""

from __future__ import annotations

from watcher.server.server import (
    DEFAULT_IDLE_TIMEOUT,
    Server,
    SocketInUseError,
    SocketSetupError,
    UnixServerSocket,
    bind_unix_socket,
    unlink_socket,
)

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "Server",
    "SocketInUseError",
    "SocketSetupError",
    "UnixServerSocket",
    "bind_unix_socket",
    "unlink_socket",
]
