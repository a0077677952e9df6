"""`Server`: accepts connections on the Unix socket and runs one task per connection.

A connection is a sequence of JSON Lines requests answered in order; every limit (line
length, stalled partial lines, idle connections, client count, subscriber backlog) is
enforced per connection, so a misbehaving client costs only its own connection and never
the daemon or other clients.

Where the contract is silent, this is what the server does:

- A partial line must be completed within the stall timeout (10 s) of the server starting
  to wait for its rest; otherwise the client gets a ``timeout`` error line and is closed.
- A connection that sits idle between requests (no partial line, not subscribed, not in a
  ``wait``) for the idle timeout (60 s) gets a ``timeout`` error line and is closed, so
  idle connections cannot hold ``max_clients`` slots forever.
- ``busy`` (beyond ``max_clients``) and ``forbidden`` are one error line, then close; the
  server lingers up to 1 s for the client's request so that the client reads the line.
- Replies for a connection are sent by that connection's task only; a client that does not
  read its replies blocks only itself (and keeps its slot).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel

from watcher.config import Settings
from watcher.daemon.state import Counters, MapState
from watcher.errors import SocketInUseError, SocketSetupError
from watcher.server.admission import Admission, Peer, peer_of
from watcher.server.fanout import DEFAULT_SEND_GRACE, DEFAULT_SUBSCRIBER_QUEUE, Fanout
from watcher.server.framing import (
    GONE,
    Connection,
    Stalled,
    TooLarge,
    close_stream,
    raw_socket,
)
from watcher.server.handlers import Handlers
from watcher.server.protocol import MAX_LINE, ErrorReply, decode_request, encode, encode_error
from watcher.server.socketfile import UnixServerSocket, bind_unix_socket, unlink_socket

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "Server",
    "SocketInUseError",
    "SocketSetupError",
    "UnixServerSocket",
    "bind_unix_socket",
    "unlink_socket",
]

log = logging.getLogger("watcher.server")

DEFAULT_STALL_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 60.0
# A refused client is given this long to send its request and read the refusal, and at
# most this many refused connections linger at once (a flood of them is closed at once).
REFUSAL_LINGER: Final = 1.0
MAX_LINGERING: Final = 64


class _Client:
    """An admitted connection: who it is, and the scope that ends it (a reload may)."""

    __slots__ = ("peer", "scope")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.scope = anyio.CancelScope()


class Server:
    """Serves one `MapState` on a listening Unix socket until cancelled."""

    def __init__(
        self,
        state: MapState,
        counters: Counters,
        settings: Settings,
        rescan: Callable[[], Awaitable[None]],
        *,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        send_grace: float = DEFAULT_SEND_GRACE,
        subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE,
        refusal_linger: float = REFUSAL_LINGER,
    ) -> None:
        self._state = state
        self._stall_timeout = stall_timeout
        self._idle_timeout = idle_timeout
        self._send_grace = send_grace
        self._refusal_linger = refusal_linger
        self._admission = Admission(settings)
        self._fanout = Fanout(state, queue=subscriber_queue, send_grace=send_grace)
        self._handlers = Handlers(state, counters, rescan, self._fanout, lambda: self.clients)
        self._clients: set[_Client] = set()
        self._lingering = 0
        self._too_large_line = encode_error(
            "too-large", f"request line longer than {MAX_LINE} bytes; closing the connection"
        )
        self._stalled_line = encode_error(
            "timeout",
            f"request line incomplete after {stall_timeout:g} s; closing the connection",
        )
        self._idle_line = encode_error(
            "timeout", f"no request for {idle_timeout:g} s; closing the connection"
        )

    def configure(self, settings: Settings) -> None:
        """Admit by `settings` from now on (a reload): access lists and `max_clients`.

        Open connections whose peer the new access lists no longer allow are closed; a
        lower `max_clients` applies to new connections (those open keep their slot).
        """
        self._admission.configure(settings)
        for client in tuple(self._clients):
            if not self._admission.allowed(client.peer):
                log.info(
                    "closing a connection of uid %d: no longer allowed after the reload",
                    client.peer.uid,
                )
                client.scope.cancel()

    @property
    def clients(self) -> int:
        """Connections being served now (refused ones are never counted)."""
        return len(self._clients)

    @property
    def subscribers(self) -> int:
        return len(self._fanout)

    async def serve(
        self,
        listener_socket: socket.socket,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until cancelled; takes ownership of the socket.

        On cancellation the listener is closed and every connection, subscribers included,
        is closed without waiting on its client. The socket path is the caller's to unlink.
        """
        listener = await anyio.abc.SocketListener.from_socket(listener_socket)
        unlisten = self._state.listen(self._fanout.on_publication)
        try:
            async with listener, anyio.create_task_group() as group:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except anyio.BrokenResourceError as error:
                        await self._accept_failed(error)
                        continue
                    self._admit(stream, group)
        finally:
            unlisten()
            self._fanout.close_all()

    async def _accept_failed(self, error: anyio.BrokenResourceError) -> None:
        cause = error.__cause__
        code = cause.errno if isinstance(cause, OSError) else None
        if code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # Out of descriptors or memory: the pending connection stays in the backlog and
            # the listener stays readable, so retrying at once would spin. Give running
            # connections a moment to finish and release theirs.
            log.warning("cannot accept a connection: %s; retrying in 100 ms", cause)
            await anyio.sleep(0.1)
        else:
            # ECONNABORTED and friends concern one connection, not the listener.
            log.debug("accept failed: %s", cause)

    # --- admission -------------------------------------------------------------------------

    def _admit(self, stream: anyio.abc.SocketStream, group: anyio.abc.TaskGroup) -> None:
        """Serve the connection, or refuse it with one error line."""
        raw = raw_socket(stream)
        try:
            peer = peer_of(raw)
        except OSError as error:
            log.debug("cannot check a new connection's peer: %s", error)
            group.start_soon(close_stream, stream)
            return
        refusal = self._admission.refusal(peer, len(self._clients))
        if refusal is None:
            client = _Client(peer)
            # Counted from here, so the next accept already sees this client.
            self._clients.add(client)
            group.start_soon(self._connection_of, client, stream)
            return
        # A fresh socket's send buffer is empty, so a short line goes out without waiting;
        # a client too broken to take it loses nothing it was owed.
        with contextlib.suppress(OSError):
            raw.send(refusal)
        if self._lingering >= MAX_LINGERING or _has_input(raw):
            # Its request is already here (its send is done) or too many linger already.
            group.start_soon(close_stream, stream)
            return
        self._lingering += 1
        group.start_soon(self._linger, stream)

    async def _linger(self, stream: anyio.abc.SocketStream) -> None:
        """After a refusal: stop writing, let the client send its request and read the
        line, close at its end of input or after the linger time.

        Closing at once made the client's send fail (EPIPE) before it read the refusal,
        and it reported the daemon unreachable instead of `forbidden` or `busy`.
        """
        try:
            raw = raw_socket(stream)
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
            conn = Connection(stream)
            deadline = anyio.current_time() + self._refusal_linger
            with contextlib.suppress(anyio.EndOfStream, Stalled, *GONE):
                # Read and drop; nothing it sends is answered. Bounded by the deadline.
                while True:
                    await conn.receive(deadline)
        finally:
            self._lingering -= 1
            await close_stream(stream)

    # --- one connection --------------------------------------------------------------------

    async def _connection_of(self, client: _Client, stream: anyio.abc.SocketStream) -> None:
        try:
            with client.scope:
                await self._connection(stream)
        finally:
            self._clients.discard(client)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            conn = Connection(stream)
            # One scope for the connection's life; its deadline is set only while the
            # connection waits for its next request (cheaper than a scope per wait).
            with anyio.CancelScope() as conn.idle:
                await self._converse(conn)
            if conn.idle.cancelled_caught:
                await self._last_words(conn, self._idle_line)
        except GONE:
            log.debug("a client went away mid-conversation")
        except Exception:
            # Safety net: a bug in serving one client must cost only that client.
            log.exception("a client connection failed")
        finally:
            await close_stream(stream)

    async def _converse(self, conn: Connection) -> None:
        while True:
            try:
                item = await self._next_line(conn)
            except Stalled:
                await self._last_words(conn, self._stalled_line)
                return
            if item is None:
                return
            if isinstance(item, TooLarge):
                await self._last_words(conn, self._too_large_line)
                return
            request = decode_request(item)
            if isinstance(request, ErrorReply):
                await conn.send(encode(request))
            elif not await self._handlers.answer(conn, request):
                return

    async def _next_line(self, conn: Connection) -> bytes | TooLarge | None:
        """The next line, None at end of input; raises Stalled for a partial line gone
        quiet. A connection idle beyond the idle timeout is cancelled (conn.idle)."""
        lines = conn.lines
        if lines:
            # Pipelined lines need no read; yield anyway so that a client sending thousands
            # of requests in one write cannot hold the event loop for all of them.
            await anyio.lowlevel.checkpoint()
        idle_until = math.inf
        while not lines:
            if conn.eof:
                if conn.partial:
                    # A last request without its newline (`printf` into socat) still counts.
                    line = bytes(conn.partial)
                    conn.partial.clear()
                    return line
                return None
            try:
                if conn.partial:
                    if conn.deadline == math.inf:
                        # The clock runs only while the server waits for the rest of the
                        # line, not while it was busy answering an earlier request.
                        conn.deadline = anyio.current_time() + self._stall_timeout
                    chunk = await conn.receive(conn.deadline)
                else:
                    # Between requests: the idle clock runs while the server waits for the
                    # next request, from the moment it starts waiting.
                    if idle_until == math.inf:
                        idle_until = anyio.current_time() + self._idle_timeout
                    conn.idle.deadline = idle_until
                    try:
                        chunk = await conn.receive()
                    finally:
                        conn.idle.deadline = math.inf
            except anyio.EndOfStream:
                conn.eof = True
                continue
            conn.feed(chunk)
        return lines.popleft()

    async def _last_words(self, conn: Connection, line: bytes) -> None:
        """Send a final error line if the client takes it promptly; the caller then closes."""
        with anyio.move_on_after(self._send_grace):
            await conn.send(line)


def _has_input(raw: socket.socket) -> bool:
    """Whether the client already sent something (so its send cannot meet a closed socket)."""
    try:
        return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
