"""The requests: what each op answers. Domain reasoning lives in the core
(`watcher.core.explain`); this module only turns it into reply lines.

``wait``: a negative timeout is a ``bad-request``; more than 300 s is capped to 300 s. A
client that hangs up while waiting is dropped at once; one that only half-closes (shut down
its sending side) still gets its reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio

from watcher import __version__
from watcher.core.explain import why_unusable
from watcher.daemon.state import Counters, MapState
from watcher.server.fanout import Fanout
from watcher.server.framing import GONE, Connection, peer_hung_up
from watcher.server.protocol import (
    MAX_LINE,
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
    encode,
    encode_error,
)

__all__ = ["Handlers"]

log = logging.getLogger("watcher.server")


class Handlers:
    def __init__(
        self,
        state: MapState,
        counters: Counters,
        rescan: Callable[[], Awaitable[None]],
        fanout: Fanout,
        clients: Callable[[], int],
    ) -> None:
        self._state = state
        self._counters = counters
        self._rescan = rescan
        self._fanout = fanout
        self._clients = clients

    async def answer(self, conn: Connection, request: Request) -> bool:
        """Reply to one request; False when the connection is to close afterwards."""
        try:
            # `get` first: it is most of the traffic, and its reply is already encoded.
            if type(request) is Get:
                await conn.send(self._state.get_reply)
                return True
            match request:
                case Path(name=name):
                    await conn.send(self.path_reply(name))
                case Wait():
                    return await self._wait(conn, request)
                case Subscribe():
                    await self._fanout.subscribe(conn)
                    return False
                case Rescan():
                    try:
                        await self._rescan()
                    except TimeoutError as error:
                        await conn.send(encode_error("busy", str(error)))
                    else:
                        await conn.send(self._state.get_reply)
                case Status():
                    await conn.send(self.status_reply())
        except GONE:
            raise
        except Exception:
            # Safety net: one failing request gets `internal`; the connection, the other
            # clients and the daemon carry on.
            log.exception("request %r failed", request)
            await conn.send(encode_error("internal", "internal error; see the daemon's log"))
        return True

    def path_reply(self, name: str) -> bytes:
        current = self._state.current
        # Looked up by name in the map only: a client's string never becomes a filesystem path.
        why = why_unusable(current, name)
        device = current.device(name)
        if why is not None or device is None:
            return encode_error("not-found", why or f"device {name!r} is absent")
        return encode(PathReply(generation=current.generation, path=device.path))

    def status_reply(self) -> bytes:
        counters = self._counters
        body = StatusBody(
            version=__version__,
            uptime_s=round(time.monotonic() - counters.started, 3),
            generation=self._state.generation,
            clients=self._clients(),
            scans=counters.scans,
            events=counters.events,
            uevents=counters.uevents,
            last_scan_ms=counters.last_scan_ms,
            scan_running_s=(
                None
                if counters.scan_started is None
                else round(time.monotonic() - counters.scan_started, 3)
            ),
            scan_stuck=counters.scan_overdue,
            metrics=counters.metrics,
        )
        return encode(StatusReply(status=body))

    async def _wait(self, conn: Connection, request: Wait) -> bool:
        state = self._state
        after = state.generation if request.after is None else request.after
        timeout = request.bounded_timeout
        if state.generation <= after:
            arrived = False
            async with anyio.create_task_group() as group:
                # Keep reading meanwhile, so a client that hangs up frees its slot now rather
                # than when the wait ends (up to 300 s later).
                group.start_soon(_read_ahead, conn, group.cancel_scope)
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


async def _read_ahead(conn: Connection, scope: anyio.CancelScope) -> None:
    """Read pipelined input while a request blocks; cancel `scope` if the peer is gone.

    Reading stops at one line's worth of buffered input: beyond that the client waits on
    its own socket buffer, as it would with a server that reads nothing meanwhile.
    """
    while not conn.input_closed and conn.buffered() <= MAX_LINE:
        try:
            chunk = await conn.receive()
        except anyio.EndOfStream:
            conn.eof = True
            if peer_hung_up(conn.raw):
                conn.hung_up = True
                scope.cancel()
            return
        except GONE:
            conn.hung_up = True
            scope.cancel()
            return
        conn.feed(chunk)
