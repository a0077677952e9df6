"""Fan-out: every new generation to every subscriber, without buffering without bound.

``subscribe`` turns the connection into a stream: later input is read and ignored. A
subscriber whose queue of unsent generations exceeds 64 is dropped; it gets a ``busy``
line first if it takes the line in flight and that one within a 1 s grace period.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from watcher.daemon.state import MapState, Publication
from watcher.server.framing import GONE, Connection, peer_hung_up
from watcher.server.protocol import encode_changes, encode_error

__all__ = ["DEFAULT_SEND_GRACE", "DEFAULT_SUBSCRIBER_QUEUE", "Fanout"]

log = logging.getLogger("watcher.server")

DEFAULT_SEND_GRACE: Final = 1.0
DEFAULT_SUBSCRIBER_QUEUE: Final = 64


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


class Fanout:
    """The subscribers of one `MapState`; `listen()` registers with it."""

    def __init__(
        self,
        state: MapState,
        *,
        queue: int = DEFAULT_SUBSCRIBER_QUEUE,
        send_grace: float = DEFAULT_SEND_GRACE,
    ) -> None:
        self._state = state
        self._queue = queue
        self._send_grace = send_grace
        self._subscribers: set[_Subscriber] = set()
        self._behind_line = encode_error(
            "busy",
            f"subscriber fell behind by more than {queue} generations;"
            " subscribe again to resynchronise",
        )

    def __len__(self) -> int:
        return len(self._subscribers)

    def close_all(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()

    async def subscribe(self, conn: Connection) -> None:
        """Stream generations to `conn` until it hangs up, falls behind, or is cancelled."""
        subscriber = _Subscriber(self._queue)
        # Registered and snapshotted without an await in between: the first line is the map
        # of generation G and the change lines that follow start at G+1, none missed.
        self._subscribers.add(subscriber)
        first = self._state.get_reply
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_discard_input, conn, group.cancel_scope)
                await self._pump(conn, subscriber, first)
                group.cancel_scope.cancel()
        finally:
            self._subscribers.discard(subscriber)
            subscriber.close()

    async def _pump(self, conn: Connection, subscriber: _Subscriber, first: bytes) -> None:
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
            except GONE:
                return
        # Out of grace mid-line, no error line follows: glued to half a map it would read as
        # garbage, so such a client learns it fell behind from the connection closing.
        if subscriber.overflowed:
            log.info(
                "dropped a subscriber that fell behind%s",
                " (it had stopped reading)" if mid_line else "",
            )

    def on_publication(self, publication: Publication) -> None:
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


async def _discard_input(conn: Connection, scope: anyio.CancelScope) -> None:
    """After `subscribe` the connection only streams; input is read to notice a hang-up."""
    conn.lines.clear()
    conn.partial.clear()
    while True:
        try:
            await conn.receive()
        except anyio.EndOfStream:
            # A half-close (the client is done talking) keeps the stream; a full close ends
            # it now rather than at the next generation.
            if peer_hung_up(conn.raw):
                scope.cancel()
            return
        except GONE:
            scope.cancel()
            return
