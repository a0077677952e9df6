"""The project's exceptions, in one import-light module (stdlib only, nothing imported).

The lean client and the CRIU action raise and catch some of these, so this module must stay
free of msgspec, anyio and asyncio. The modules that raise them re-export them under their
old names.
"""

from __future__ import annotations

from watcher.contract import SOCKET_ENV

__all__ = [
    "ConfigError",
    "ServerError",
    "SocketInUseError",
    "SocketSetupError",
    "Unreachable",
    "UsageError",
]


class UsageError(Exception):
    """Something the user can fix in how the command was called or configured: exit 2."""


class ConfigError(UsageError, ValueError):
    """The config file is missing, unreadable, unsafe or invalid; the message names the key."""


class SocketSetupError(Exception):
    """The socket path cannot be set up; the message says why."""


class SocketInUseError(SocketSetupError):
    """A live server already answers on the socket path."""


class Unreachable(Exception):
    """The daemon could not be reached on `path` (exit code 3 in the CLI)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the daemon at {path}: {reason} (is `gpu-device-watcher serve` "
            f"running? set --socket or {SOCKET_ENV} if it listens elsewhere)"
        )
        self.path = path


class ServerError(Exception):
    """The daemon answered with `{"ok": false, ...}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
