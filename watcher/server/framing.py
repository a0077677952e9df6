"""Framing: one client's bytes in and out, split into request lines.

Where the contract is silent: lines are at most 64 KiB (65536 bytes) not counting the
newline, a trailing ``\\r`` is tolerated, and at end of input a last line without its
newline is still answered.
"""

from __future__ import annotations

import math
import select
import socket
from collections import deque
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel

from watcher.server.protocol import MAX_LINE

__all__ = [
    "GONE",
    "READ_SIZE",
    "TOO_LARGE",
    "Connection",
    "Stalled",
    "TooLarge",
    "close_stream",
    "peer_hung_up",
    "raw_socket",
]

READ_SIZE: Final = 64 * 1024

# A peer that vanished shows up as one of these, depending on where it was noticed.
GONE: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    BrokenPipeError,
    ConnectionResetError,
)


class TooLarge:
    """Marks, in a connection's queue of lines, the point where a line exceeded MAX_LINE."""


TOO_LARGE: Final = TooLarge()


class Stalled(Exception):
    """A partial line did not complete within the stall timeout, or the connection sat idle
    beyond the idle timeout."""


def raw_socket(stream: anyio.abc.SocketStream) -> socket.socket:
    # S610 mistakes anyio's typed-attribute lookup for Django's QuerySet.extra().
    return stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610


class Connection:
    """Framing state of one client: complete lines waiting, and the partial line after them."""

    __slots__ = ("deadline", "eof", "hung_up", "idle", "lines", "partial", "raw", "stream")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.raw = raw_socket(stream)
        self.lines: deque[bytes | TooLarge] = deque()
        self.partial = bytearray()
        self.deadline = math.inf
        self.eof = False
        self.hung_up = False
        # Ends the connection when it sits idle too long (set by the server).
        self.idle = anyio.CancelScope()

    @property
    def input_closed(self) -> bool:
        """Nothing more will be read: end of input, or a too-large line ends the connection."""
        return self.eof or (bool(self.lines) and self.lines[-1] is TOO_LARGE)

    def buffered(self) -> int:
        return len(self.partial) + sum(len(line) for line in self.lines if isinstance(line, bytes))

    def feed(self, chunk: bytes) -> None:
        """Split `chunk` into lines; never holds more than MAX_LINE of one unfinished line."""
        start = 0
        find = chunk.find
        while (end := find(b"\n", start)) >= 0:
            if self.partial:
                if len(self.partial) + end - start > MAX_LINE:
                    self._too_large()
                    return
                self.partial += chunk[start:end]
                line = bytes(self.partial)
                self.partial.clear()
            else:
                if end - start > MAX_LINE:
                    self._too_large()
                    return
                line = chunk[start:end]
            self.lines.append(line)
            # The stall clock is per line: a completed line restarts it.
            self.deadline = math.inf
            start = end + 1
        if start < len(chunk):
            if len(self.partial) + len(chunk) - start > MAX_LINE:
                self._too_large()
                return
            self.partial += memoryview(chunk)[start:]

    async def receive(self, deadline: float = math.inf) -> bytes:
        """The next chunk of input; raises EndOfStream at its end, Stalled past `deadline`.

        Straight on the socket rather than through the anyio stream: that one spends an
        event-loop round trip before every read and formats the socket's repr (two
        syscalls) each time it starts waiting, the larger part of what a `get` costs. The
        deadline costs a cancel scope only when the read has to wait.
        """
        waited = False
        while True:
            try:
                data = self.raw.recv(READ_SIZE)
            except BlockingIOError:
                if deadline == math.inf:
                    await anyio.wait_readable(self.raw.fileno())
                else:
                    with anyio.CancelScope(deadline=deadline) as scope:
                        await anyio.wait_readable(self.raw.fileno())
                    if scope.cancelled_caught:
                        raise Stalled from None
                waited = True
                continue
            except OSError as error:
                raise anyio.BrokenResourceError from error
            break
        if not waited:
            # Input was already there: yield once anyway, so that a client streaming bytes
            # cannot hold the event loop. Shielded, so the chunk just read is never lost.
            await anyio.lowlevel.cancel_shielded_checkpoint()
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, data: bytes) -> None:
        """Write a reply, straight to the socket when it has room.

        Saves the event-loop round trip of a checkpoint on every reply (about a third of a
        `get`); the receive that preceded the request already gave other tasks their turn.
        """
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            await self.stream.send(data[sent:])

    def _too_large(self) -> None:
        self.partial.clear()
        self.lines.append(TOO_LARGE)


def peer_hung_up(sock: socket.socket) -> bool:
    """After end of input: did the peer close entirely, or only shut down its sending side?

    Both read as end of file. A Unix stream socket reports POLLHUP only when the peer is
    gone, so a client that half-closes after its requests still gets its replies.
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True


async def close_stream(stream: anyio.abc.SocketStream) -> None:
    # Shielded: during shutdown the stream must still be closed, and closing never waits.
    with anyio.CancelScope(shield=True):
        await stream.aclose()
