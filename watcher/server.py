"""The Unix socket: framing, limits, peer checks, dispatch and subscribers.

One task group per server and one task per connection. A connection is a sequence of
JSON Lines requests answered in order; every limit (line length, stalled partial lines,
client count, subscriber backlog) is enforced per connection, so a misbehaving client
costs only its own connection and never the daemon or other clients.

Where the contract is silent, this is what the server does:

- Lines: at most 64 KiB (65536 bytes) not counting the newline; a trailing ``\r`` is
  tolerated. An empty line is a ``bad-request``. At end of input, a last line without its
  newline is still answered.
- A partial line must be completed within the stall timeout (10 s) of the server starting
  to wait for its rest; otherwise the client gets a ``timeout`` error line and is closed.
  A connection with no partial line may stay idle indefinitely.
- ``busy`` (beyond ``max_clients``) and ``forbidden`` are one error line, then close.
- ``allowed_uids`` / ``allowed_gids``: checked with SO_PEERCRED (and SO_PEERGROUPS for
  supplementary groups) at accept time. Root and the daemon's own user are always admitted.
- ``wait``: a negative timeout is a ``bad-request``; more than 300 s is capped to 300 s. A
  client that hangs up while waiting is dropped at once; one that only half-closes (shut down
  its sending side) still gets its reply.
- ``subscribe`` turns the connection into a stream: later input is read and ignored. A
  subscriber whose queue of unsent generations exceeds 64 is dropped; it gets a ``busy``
  line first if it takes the line in flight and that one within a 1 s grace period.
- Replies for a connection are sent by that connection's task only; a client that does not
  read its replies blocks only itself (and keeps its slot).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import math
import os
import platform
import secrets
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from watcher import __version__
from watcher.config import Settings
from watcher.errors import SocketInUseError, SocketSetupError
from watcher.protocol import (
    MAX_LINE,
    ErrorReply,
    Get,
    Path,
    PathReply,
    Request,
    Rescan,
    Status,
    StatusBody,
    StatusReply,
    Subscribe,
    Wait,
    decode_request,
    encode,
    encode_changes,
    encode_error,
)
from watcher.state import Counters, MapState, Publication

__all__ = [
    "Server",
    "SocketInUseError",
    "SocketSetupError",
    "UnixServerSocket",
    "bind_unix_socket",
    "unlink_socket",
]

log = logging.getLogger("watcher.server")

READ_SIZE: Final = 64 * 1024
DEFAULT_STALL_TIMEOUT: Final = 10.0
DEFAULT_SEND_GRACE: Final = 1.0
DEFAULT_SUBSCRIBER_QUEUE: Final = 64

# A peer that vanished shows up as one of these, depending on where it was noticed.
_GONE: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    BrokenPipeError,
    ConnectionResetError,
)

_UCRED: Final = struct.Struct("3i")
# SO_PEERGROUPS (Linux 4.13) is missing from Python's socket module; 59 is its value on the
# architectures that use asm-generic/socket.h. Elsewhere only the primary gid is checked.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", None) or (
    59 if platform.machine() in {"x86_64", "aarch64", "riscv64", "ppc64le", "s390x"} else None
)
# Python's getsockopt caps the buffer at 1024 bytes: up to 256 supplementary groups.
_PEERGROUPS_BUFLEN: Final = 1024


class _TooLarge:
    """Marks, in a connection's queue of lines, the point where a line exceeded MAX_LINE."""


_TOO_LARGE: Final = _TooLarge()


class _Stalled(Exception):
    """A partial line did not complete within the stall timeout."""


class _Connection:
    """Framing state of one client: complete lines waiting, and the partial line after them."""

    __slots__ = ("deadline", "eof", "hung_up", "lines", "partial", "raw", "stream")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.raw = _raw_socket(stream)
        self.lines: deque[bytes | _TooLarge] = deque()
        self.partial = bytearray()
        self.deadline = math.inf
        self.eof = False
        self.hung_up = False

    @property
    def input_closed(self) -> bool:
        """Nothing more will be read: end of input, or a too-large line ends the connection."""
        return self.eof or (bool(self.lines) and self.lines[-1] is _TOO_LARGE)

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

    async def receive(self) -> bytes:
        """The next chunk of input; raises EndOfStream at its end.

        Straight on the socket rather than through the anyio stream: that one spends an
        event-loop round trip before every read and formats the socket's repr (two
        syscalls) each time it starts waiting, the larger part of what a `get` costs.
        """
        waited = False
        while True:
            try:
                data = self.raw.recv(READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(self.raw.fileno())
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
        self.lines.append(_TOO_LARGE)


class _Subscriber:
    __slots__ = ("overflowed", "receive", "scope", "send")

    def __init__(self, size: int) -> None:
        self.send: MemoryObjectSendStream[bytes]
        self.receive: MemoryObjectReceiveStream[bytes]
        self.send, self.receive = anyio.create_memory_object_stream[bytes](size)
        self.scope = anyio.CancelScope()
        self.overflowed = False

    def close(self) -> None:
        self.send.close()
        self.receive.close()


def _raw_socket(stream: anyio.abc.SocketStream) -> socket.socket:
    # S610 mistakes anyio's typed-attribute lookup for Django's QuerySet.extra().
    return stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610


def _peer_hung_up(sock: socket.socket) -> bool:
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
        send_grace: float = DEFAULT_SEND_GRACE,
        subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE,
    ) -> None:
        self._state = state
        self._counters = counters
        self._settings = settings
        self._rescan = rescan
        self._stall_timeout = stall_timeout
        self._send_grace = send_grace
        self._subscriber_queue = subscriber_queue
        self._subscribers: set[_Subscriber] = set()
        self._clients = 0
        self.configure(settings)
        self._behind_line = encode_error(
            "busy",
            f"subscriber fell behind by more than {subscriber_queue} generations;"
            " subscribe again to resynchronise",
        )
        self._too_large_line = encode_error(
            "too-large", f"request line longer than {MAX_LINE} bytes; closing the connection"
        )
        self._stalled_line = encode_error(
            "timeout",
            f"request line incomplete after {stall_timeout:g} s; closing the connection",
        )

    def configure(self, settings: Settings) -> None:
        """Admit by `settings` from now on (a reload): access lists and `max_clients`.

        Connections already admitted keep their slot; a client no longer allowed is refused
        at its next connection.
        """
        self._settings = settings
        self._busy_line = encode_error(
            "busy", f"too many clients (max_clients={settings.max_clients}); try again later"
        )

    @property
    def clients(self) -> int:
        """Connections being served now (refused ones are never counted)."""
        return self._clients

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

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
        unlisten = self._state.listen(self._on_publication)
        try:
            async with listener, anyio.create_task_group() as group:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except anyio.BrokenResourceError as error:
                        await self._accept_failed(error)
                        continue
                    if self._admit(stream):
                        self._clients += 1
                        group.start_soon(self._connection, stream)
                    else:
                        await _close(stream)
        finally:
            unlisten()
            for subscriber in self._subscribers:
                subscriber.close()
            self._subscribers.clear()

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

    def _admit(self, stream: anyio.abc.SocketStream) -> bool:
        """Check the peer and the client limit; a refused client gets one error line."""
        raw = _raw_socket(stream)
        try:
            refusal = self._refusal(raw)
        except OSError as error:
            log.debug("cannot check a new connection's peer: %s", error)
            return False
        if refusal is None:
            return True
        # A fresh socket's send buffer is empty, so a short line goes out without waiting;
        # a client too broken to take it loses nothing it was owed.
        with contextlib.suppress(OSError):
            raw.send(refusal)
        return False

    def _refusal(self, raw: socket.socket) -> bytes | None:
        settings = self._settings
        if settings.allowed_uids is not None or settings.allowed_gids is not None:
            pid, uid, gid = _UCRED.unpack(
                raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            if not self._allowed(raw, uid, gid):
                log.info("refused a client: pid %d uid %d gid %d is not allowed", pid, uid, gid)
                return encode_error(
                    "forbidden",
                    f"uid {uid} (gid {gid}) is not in allowed_uids or allowed_gids",
                )
        if self._clients >= settings.max_clients:
            log.warning("refused a client: max_clients=%d reached", settings.max_clients)
            return self._busy_line
        return None

    def _allowed(self, raw: socket.socket, uid: int, gid: int) -> bool:
        # Root, and the daemon's own user, could reach the map anyway (ptrace, /proc, the
        # socket file itself), so refusing them would only break operators' tools.
        if uid in (0, os.geteuid()):
            return True
        uids, gids = self._settings.allowed_uids, self._settings.allowed_gids
        if uids is not None and uid in uids:
            return True
        if gids is None:
            return False
        return gid in gids or not gids.isdisjoint(_peer_groups(raw))

    # --- one connection --------------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await self._converse(_Connection(stream))
        except _GONE:
            log.debug("a client went away mid-conversation")
        except Exception:
            # Safety net: a bug in serving one client must cost only that client.
            log.exception("a client connection failed")
        finally:
            self._clients -= 1
            await _close(stream)

    async def _converse(self, conn: _Connection) -> None:
        while True:
            try:
                item = await self._next_line(conn)
            except _Stalled:
                await self._last_words(conn, self._stalled_line)
                return
            if item is None:
                return
            if isinstance(item, _TooLarge):
                await self._last_words(conn, self._too_large_line)
                return
            request = decode_request(item)
            if isinstance(request, ErrorReply):
                await conn.send(encode(request))
            elif not await self._answer(conn, request):
                return

    async def _next_line(self, conn: _Connection) -> bytes | _TooLarge | None:
        """The next line, None at end of input; raises _Stalled for a partial line gone quiet."""
        lines = conn.lines
        if lines:
            # Pipelined lines need no read; yield anyway so that a client sending thousands
            # of requests in one write cannot hold the event loop for all of them.
            await anyio.lowlevel.checkpoint()
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
                    with anyio.CancelScope(deadline=conn.deadline) as scope:
                        chunk = await conn.receive()
                    if scope.cancelled_caught:
                        raise _Stalled
                else:
                    # Between requests a client may stay idle as long as it likes (and no
                    # cancel scope is set up on the hot path).
                    chunk = await conn.receive()
            except anyio.EndOfStream:
                conn.eof = True
                continue
            conn.feed(chunk)
        return lines.popleft()

    async def _last_words(self, conn: _Connection, line: bytes) -> None:
        """Send a final error line if the client takes it promptly; the caller then closes."""
        with anyio.move_on_after(self._send_grace):
            await conn.send(line)

    async def _answer(self, conn: _Connection, request: Request) -> bool:
        """Reply to one request; False when the connection is to close afterwards."""
        try:
            # `get` first: it is most of the traffic, and its reply is already encoded.
            if type(request) is Get:
                await conn.send(self._state.get_reply)
                return True
            match request:
                case Path(name=name):
                    await conn.send(self._path_reply(name))
                case Wait():
                    return await self._wait(conn, request)
                case Subscribe():
                    await self._subscribe(conn)
                    return False
                case Rescan():
                    await self._rescan()
                    await conn.send(self._state.get_reply)
                case Status():
                    await conn.send(self._status_reply())
        except _GONE:
            raise
        except Exception:
            # Safety net: one failing request gets `internal`; the connection, the other
            # clients and the daemon carry on.
            log.exception("request %r failed", request)
            await conn.send(encode_error("internal", "internal error; see the daemon's log"))
        return True

    def _path_reply(self, name: str) -> bytes:
        current = self._state.current
        # Looked up by name in the map only: a client's string never becomes a filesystem path.
        device = current.device(name)
        if device is None:
            if current.driver.dev_root is None:
                why = "there is no device root"
                problems = [p.message for p in current.problems if p.code == "no-device-root"]
                if problems:
                    why += f" ({problems[0]})"
            else:
                known = ", ".join(d.name for d in current.devices) or "none"
                why = f"{current.driver.dev_root} has no such node (present: {known})"
            return encode_error("not-found", f"device {name!r} is absent: {why}")
        if not device.valid:
            reasons = [p.message for p in current.problems if p.path == device.path]
            why = "; ".join(reasons) or (
                f"{device.major}:{device.minor}, mode {device.mode}, does not match the driver"
            )
            return encode_error(
                "not-found", f"device {name!r} is present at {device.path} but not valid: {why}"
            )
        return encode(PathReply(generation=current.generation, path=device.path))

    def _status_reply(self) -> bytes:
        counters = self._counters
        body = StatusBody(
            version=__version__,
            uptime_s=round(time.monotonic() - counters.started, 3),
            generation=self._state.generation,
            clients=self._clients,
            scans=counters.scans,
            events=counters.events,
            last_scan_ms=counters.last_scan_ms,
        )
        return encode(StatusReply(status=body))

    # --- wait --------------------------------------------------------------------------------

    async def _wait(self, conn: _Connection, request: Wait) -> bool:
        state = self._state
        after = state.generation if request.after is None else request.after
        timeout = request.bounded_timeout
        if state.generation <= after:
            arrived = False
            async with anyio.create_task_group() as group:
                # Keep reading meanwhile, so a client that hangs up frees its slot now rather
                # than when the wait ends (up to 300 s later).
                group.start_soon(self._read_ahead, conn, group.cancel_scope)
                with anyio.move_on_after(timeout):
                    await state.wait_after(after)
                    arrived = True
                group.cancel_scope.cancel()
            if conn.hung_up:
                return False
            if not arrived:
                await conn.send(
                    encode_error(
                        "timeout",
                        f"no generation after {after} within {timeout:g} s"
                        f" (current: {state.generation})",
                    )
                )
                return True
        await conn.send(state.get_reply)
        return True

    async def _read_ahead(self, conn: _Connection, scope: anyio.CancelScope) -> None:
        """Read pipelined input while a request blocks; cancel `scope` if the peer is gone.

        Reading stops at one line's worth of buffered input: beyond that the client waits on
        its own socket buffer, as it would with a server that reads nothing meanwhile.
        """
        while not conn.input_closed and conn.buffered() <= MAX_LINE:
            try:
                chunk = await conn.receive()
            except anyio.EndOfStream:
                conn.eof = True
                if _peer_hung_up(conn.raw):
                    conn.hung_up = True
                    scope.cancel()
                return
            except _GONE:
                conn.hung_up = True
                scope.cancel()
                return
            conn.feed(chunk)

    # --- subscribe ---------------------------------------------------------------------------

    async def _subscribe(self, conn: _Connection) -> None:
        subscriber = _Subscriber(self._subscriber_queue)
        # Registered and snapshotted without an await in between: the first line is the map
        # of generation G and the change lines that follow start at G+1, none missed.
        self._subscribers.add(subscriber)
        first = self._state.get_reply
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._discard_input, conn, group.cancel_scope)
                await self._pump(conn, subscriber, first)
                group.cancel_scope.cancel()
        finally:
            self._subscribers.discard(subscriber)
            subscriber.close()

    async def _pump(self, conn: _Connection, subscriber: _Subscriber, first: bytes) -> None:
        mid_line = False
        # Every send is inside the subscriber's scope, whose deadline an overflow sets: a
        # client that stopped reading is dropped after the grace period, wherever it stalled.
        with subscriber.scope:
            try:
                mid_line = True
                await conn.stream.send(first)
                mid_line = False
                async for line in subscriber.receive:
                    mid_line = True
                    await conn.stream.send(line)
                    mid_line = False
                    if subscriber.overflowed:
                        break
                if subscriber.overflowed:
                    mid_line = True
                    await conn.stream.send(self._behind_line)
                    mid_line = False
            except _GONE:
                return
        # Out of grace mid-line, no error line follows: glued to half a map it would read as
        # garbage, so such a client learns it fell behind from the connection closing.
        if subscriber.overflowed:
            log.info(
                "dropped a subscriber that fell behind%s",
                " (it had stopped reading)" if mid_line else "",
            )

    async def _discard_input(self, conn: _Connection, scope: anyio.CancelScope) -> None:
        """After `subscribe` the connection only streams; input is read to notice a hang-up."""
        conn.lines.clear()
        conn.partial.clear()
        while True:
            try:
                await conn.receive()
            except anyio.EndOfStream:
                # A half-close (the client is done talking) keeps the stream; a full close ends
                # it now rather than at the next generation.
                if _peer_hung_up(conn.raw):
                    scope.cancel()
                return
            except _GONE:
                scope.cancel()
                return

    def _on_publication(self, publication: Publication) -> None:
        """Fan a new generation out to subscribers; runs inside `MapState.publish`."""
        if not self._subscribers:
            return
        line = encode_changes(publication.changes, publication.map)
        for subscriber in tuple(self._subscribers):
            try:
                subscriber.send.send_nowait(line)
            except anyio.WouldBlock:
                # Its queue is full: drop it rather than buffer without bound. It may still
                # finish the line in flight and get the error line within the grace period.
                subscriber.overflowed = True
                subscriber.scope.deadline = min(
                    subscriber.scope.deadline, anyio.current_time() + self._send_grace
                )
                self._subscribers.discard(subscriber)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(subscriber)


def _peer_groups(raw: socket.socket) -> tuple[int, ...]:
    if _SO_PEERGROUPS is None:
        return ()
    try:
        data = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
    except OSError:
        # ERANGE: more groups than fit; the primary gid alone decides.
        return ()
    return struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])


async def _close(stream: anyio.abc.SocketStream) -> None:
    # Shielded: during shutdown the stream must still be closed, and closing never waits.
    with anyio.CancelScope(shield=True):
        await stream.aclose()


# --- the socket file -------------------------------------------------------------------------

_SUN_PATH_MAX: Final = 107  # sizeof(sun_path) - 1 for the terminating NUL


class UnixServerSocket(socket.socket):
    """A listening socket that remembers its path and the inode of its socket file."""

    __slots__ = ("inode", "path")
    inode: int
    path: str


def bind_unix_socket(
    path: str, mode: int = 0o660, group: str | int | None = None
) -> UnixServerSocket:
    """A listening Unix socket at `path`, which appears only once it accepts connections.

    Bound under a temporary name in the same directory, given `mode` and `group`, set
    listening, then moved onto `path`. A stale socket (its server is dead) is replaced; a
    live one raises `SocketInUseError`; anything that is not a socket is left alone and
    raises `SocketSetupError`.
    """
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise SocketSetupError(
            f"socket path {path} is too long ({len(os.fsencode(path))} bytes;"
            f" a Unix socket path has at most {_SUN_PATH_MAX})"
        )
    gid = _resolve_group(group)
    _existing(path)  # fail early, before creating anything
    directory, base = os.path.split(path)
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    if len(os.fsencode(temporary)) > _SUN_PATH_MAX:
        temporary = os.path.join(directory, f".gdw.{secrets.token_hex(4)}")
    sock = UnixServerSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(temporary)
        except OSError as error:
            raise SocketSetupError(
                f"cannot create socket in {directory}: {error.strerror}"
            ) from error
        try:
            os.chmod(temporary, mode)
            if gid is not None:
                os.chown(temporary, -1, gid)
            sock.listen(socket.SOMAXCONN)
            sock.inode = os.lstat(temporary).st_ino
            _install(temporary, path)
        except OSError as error:
            raise SocketSetupError(f"cannot set up socket {path}: {error.strerror}") from error
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except BaseException:
        sock.close()
        raise
    sock.path = path
    return sock


def _install(temporary: str, path: str) -> None:
    for _ in range(3):
        if _existing(path):
            # rename() swaps the stale file for ours in one step: no moment without a socket.
            os.rename(temporary, path)
            return
        try:
            # Nothing there: link() rather than rename() so that a socket that appeared since
            # the check (a second daemon starting) is never silently replaced.
            os.link(temporary, path)
        except FileExistsError:
            continue
        except OSError:
            # A filesystem without hard links for sockets: the narrow race is accepted.
            os.rename(temporary, path)
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


def _resolve_group(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
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
