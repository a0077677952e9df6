"""A lean socket client: the C `_socket` module and `watcher.leanjson` only.

CRIU launches the action script at dump time, and operators run `get`/`path` in loops;
neither should pay for importing asyncio, anyio or msgspec (tens of milliseconds each), nor
even `socket` (~3 ms: it builds its enums at import) and `json` (~5 ms: `re`).
"""

from __future__ import annotations

import _socket

from watcher.contract import DEFAULT_SOCKET, SOCKET_ENV, socket_path
from watcher.errors import ServerError, Unreachable
from watcher.leanjson import dumps, loads

# Not `from typing import ...`: importing typing costs milliseconds at every client start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "Connection",
    "ServerError",
    "Unreachable",
    "request",
    "socket_path",
]


class Connection:
    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as error:
            self._sock.close()
            raise Unreachable(path, error.strerror or str(error)) from None
        # What was received beyond the last line handed out.
        self._buffer = bytearray()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _readline(self) -> bytes:
        """One line, newline included; what is left at the end of the stream; b"" at its end."""
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = self._sock.recv(65536)
            if not chunk:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    def send(self, request: dict[str, Any]) -> None:
        try:
            self._sock.sendall(dumps(request).encode() + b"\n")
        except OSError as error:
            # A daemon that refuses a client (busy, forbidden) writes its reason first and
            # then closes; our request may meet the closed socket (EPIPE) with the reason
            # already waiting to be read. Read it: ServerError says why, not "unreachable".
            failure = Unreachable(self.path, f"send failed: {error.strerror or error}")
            try:
                self.receive()
            except Unreachable:
                raise failure from None  # nothing was waiting: the send error is the news
            raise failure from None

    def receive(self) -> dict[str, Any]:
        """One reply line; a `{"ok": false}` reply raises ServerError."""
        try:
            line = self._readline()
        except TimeoutError:
            raise Unreachable(self.path, "no reply in time") from None
        except OSError as error:
            raise Unreachable(self.path, f"receive failed: {error.strerror or error}") from None
        if not line:
            raise Unreachable(self.path, "the daemon closed the connection")
        reply: dict[str, Any] = loads(line)
        if not reply.get("ok"):
            failure = reply.get("error") or {}
            raise ServerError(str(failure.get("code", "internal")), str(failure.get("message", "")))
        return reply

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def replies(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.receive()


def request(path: str, payload: dict[str, Any], timeout: float | None = 10.0) -> dict[str, Any]:
    with Connection(path, timeout) as connection:
        return connection.request(payload)
