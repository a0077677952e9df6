"""The one live map: swapped whole, never edited, with waiters and subscribers.

A rescan builds a complete `DeviceMap` off to the side; `publish` swaps it in (generation
+1) only when its content differs. Readers hold a reference to an immutable map, so none
ever sees a half-built one. The encoded `get` reply is made once per generation, because
queries outnumber changes by orders of magnitude.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import msgspec

from watcher.core.diff import Change, diff_maps
from watcher.core.model import DeviceMap

__all__ = ["Counters", "Listener", "MapReply", "MapState", "Publication"]


class MapReply(msgspec.Struct, kw_only=True):
    ok: bool = True
    generation: int
    map: DeviceMap


# Upper bounds (seconds) of the scan-duration histogram: a scan that reuses the mount table
# takes ~1 ms, a full read of a 10,000-mount table ~40 ms, a host in trouble much longer.
SCAN_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


@dataclass(slots=True)
class Counters:
    """What `status` and the metrics report about the daemon's own work."""

    started: float = field(default_factory=time.monotonic)
    scans: int = 0
    events: int = 0
    # Of `events`, the kernel uevents (a module or a render node came or went).
    uevents: int = 0
    last_scan_ms: float = 0.0
    # Scans per SCAN_BUCKETS bound (not cumulative; the last slot counts the longer ones),
    # and their total duration in seconds.
    scan_buckets: list[int] = field(default_factory=lambda: [0] * (len(SCAN_BUCKETS) + 1))
    scan_seconds: float = 0.0
    # The scan under way: when it started (monotonic), and whether it is past its deadline.
    scan_started: float | None = None
    scan_overdue: bool = False
    # Where the metrics are served, for `status` (see protocol.StatusBody.metrics).
    metrics: str = "off"

    def book_scan(self, milliseconds: float) -> None:
        """Count one finished scan of this duration."""
        self.scans += 1
        self.last_scan_ms = milliseconds
        seconds = milliseconds / 1000
        self.scan_seconds += seconds
        self.scan_buckets[bisect.bisect_left(SCAN_BUCKETS, seconds)] += 1


@dataclass(frozen=True, slots=True)
class Publication:
    """One generation as subscribers receive it."""

    map: DeviceMap
    changes: tuple[Change, ...]


Listener = Callable[[Publication], None]

_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class MapState:
    current: DeviceMap
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _listeners: list[Listener] = field(default_factory=list)
    _reply: bytes = b""

    def __post_init__(self) -> None:
        self._reply = _encode_reply(self.current)

    @property
    def generation(self) -> int:
        return self.current.generation

    @property
    def get_reply(self) -> bytes:
        """The encoded `get` reply line for the current generation, newline included."""
        return self._reply

    def publish(self, candidate: DeviceMap) -> Publication | None:
        """Swap in `candidate` as the next generation if it differs; None when it does not."""
        if candidate.same_content(self.current):
            return None
        previous = self.current
        new_map = msgspec.structs.replace(candidate, generation=previous.generation + 1)
        changes = tuple(diff_maps(previous, new_map))
        self.current = new_map
        self._reply = _encode_reply(new_map)
        publication = Publication(new_map, changes)
        # Wake every `wait` at once; a fresh Event serves the next generation.
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        for listener in list(self._listeners):
            listener(publication)
        return publication

    async def wait_after(self, generation: int) -> DeviceMap:
        """The first map whose generation exceeds `generation` (callers bound it in time)."""
        while self.current.generation <= generation:
            await self._changed.wait()
        return self.current

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` on every publication (synchronously); returns the unsubscribe."""
        self._listeners.append(listener)

        def unlisten() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unlisten


def _encode_reply(current: DeviceMap) -> bytes:
    return _encoder.encode(MapReply(generation=current.generation, map=current)) + b"\n"
