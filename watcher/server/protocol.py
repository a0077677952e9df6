"""The socket protocol: request and reply Structs, one Decoder and one Encoder, error codes.

JSON Lines: one request object per line, one reply line per request. Requests are a tagged
union on ``op``; unknown fields are ignored so clients may send more than this version knows.
Everything here is pure (bytes in, values or bytes out) so it can be tested without a socket.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

from watcher.core.diff import Change
from watcher.core.model import DeviceMap

__all__ = [
    "ERROR_CODES",
    "KNOWN_OPS",
    "MAX_LINE",
    "MAX_WAIT_TIMEOUT",
    "ChangeReply",
    "ErrorCode",
    "ErrorReply",
    "Get",
    "Path",
    "PathReply",
    "Request",
    "Rescan",
    "Status",
    "StatusBody",
    "StatusReply",
    "Subscribe",
    "Wait",
    "decode_request",
    "encode",
    "encode_changes",
    "encode_error",
]

MAX_LINE: Final = 64 * 1024
"""The longest request line accepted, in bytes, not counting the newline."""

DEFAULT_WAIT_TIMEOUT: Final = 30.0
MAX_WAIT_TIMEOUT: Final = 300.0

ErrorCode = Literal[
    "bad-request", "too-large", "not-found", "timeout", "forbidden", "busy", "internal"
]
ERROR_CODES: Final[tuple[ErrorCode, ...]] = (
    "bad-request",
    "too-large",
    "not-found",
    "timeout",
    "forbidden",
    "busy",
    "internal",
)


# --- requests ------------------------------------------------------------------------------


class _Request(msgspec.Struct, tag_field="op", frozen=True, kw_only=True):
    pass


class Get(_Request, tag="get", frozen=True, kw_only=True):
    pass


class Path(_Request, tag="path", frozen=True, kw_only=True):
    name: str


class Wait(_Request, tag="wait", frozen=True, kw_only=True):
    after: int | None = None
    timeout: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_WAIT_TIMEOUT

    @property
    def bounded_timeout(self) -> float:
        # The contract caps a wait at 300 s rather than refusing a longer one: a client
        # asking for "a long time" gets the longest the server grants.
        return min(self.timeout, MAX_WAIT_TIMEOUT)


class Subscribe(_Request, tag="subscribe", frozen=True, kw_only=True):
    pass


class Rescan(_Request, tag="rescan", frozen=True, kw_only=True):
    pass


class Status(_Request, tag="status", frozen=True, kw_only=True):
    pass


Request = Get | Path | Wait | Subscribe | Rescan | Status
KNOWN_OPS: Final = ("get", "path", "wait", "subscribe", "rescan", "status")


# --- replies -------------------------------------------------------------------------------
# Field order is the order on the wire: "ok" first, as in the contract's examples.


class ErrorBody(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = False
    error: ErrorBody


class PathReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    generation: int
    path: str


class ChangeItem(msgspec.Struct, frozen=True, kw_only=True):
    change: Literal["added", "removed", "changed"]
    name: str
    path: str


class ChangeReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    generation: int
    changes: tuple[ChangeItem, ...]
    map: DeviceMap


class StatusBody(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    uptime_s: float
    generation: int
    clients: int
    scans: int
    events: int
    uevents: int
    last_scan_ms: float
    # How long the scan under way has run (null: none), and whether it is past its deadline.
    scan_running_s: float | None = None
    scan_stuck: bool = False
    # "http://HOST:PORT/metrics", "off" (no metrics_listen), or "not served: <why>".
    metrics: str = "off"


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True
    status: StatusBody


# --- codec ---------------------------------------------------------------------------------

_decoder: Final[msgspec.json.Decoder[Request]] = msgspec.json.Decoder(Request)
_encoder: Final = msgspec.json.Encoder()


class _Envelope(msgspec.Struct):
    """Just the op: used only to explain a request the full decoder refused."""

    op: str


_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_KNOWN: Final = ", ".join(KNOWN_OPS)
_AT: Final = re.compile(r"^(?P<what>.*?) - at `\$\.?(?P<where>[^`]*)`$", re.DOTALL)
_MISSING: Final = re.compile(r"missing required field `([^`]+)`")


def encode(reply: msgspec.Struct) -> bytes:
    """One reply line, newline included."""
    return _encoder.encode(reply) + b"\n"


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _encoder.encode(ErrorReply(error=ErrorBody(code, message))) + b"\n"


def encode_changes(changes: tuple[Change, ...], new_map: DeviceMap) -> bytes:
    """The subscribe line for one generation (encoded once, shared by every subscriber)."""
    items = tuple(ChangeItem(change=c.change, name=c.name, path=c.path) for c in changes)
    reply = ChangeReply(generation=new_map.generation, changes=items, map=new_map)
    return _encoder.encode(reply) + b"\n"


def decode_request(line: bytes) -> Request | ErrorReply:
    """Decode one request line (without its newline); a refusal is a `bad-request` reply."""
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, RecursionError) as error:
        # RecursionError: msgspec refuses deeply nested input that way, even in a field that
        # is otherwise ignored; it is the client's fault like any other malformed line.
        return ErrorReply(error=ErrorBody("bad-request", _explain(line, error)))
    except UnicodeDecodeError:
        # msgspec raises this (not DecodeError) for bytes that are not UTF-8 in the value of
        # the tag field, e.g. {"op":"\x80"}: the connection died without a reply.
        why = "invalid JSON: a string in the request is not valid UTF-8"
        return ErrorReply(error=ErrorBody("bad-request", why))


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _explain(line: bytes, error: Exception) -> str:
    """Say what is wrong with a refused line in the terms of the protocol, not of msgspec."""
    if not line.strip():
        return 'empty request line; send one JSON object per line, e.g. {"op":"get"}'
    if isinstance(error, RecursionError):
        return "request nested too deeply"
    if not isinstance(error, msgspec.ValidationError):
        return _invalid_json(error)
    # The full decoder stops at the first problem it meets, which may be a field of an op
    # that does not exist; look at the op on its own first.
    try:
        envelope = _envelope_decoder.decode(line)
    except msgspec.ValidationError as envelope_error:
        text = str(envelope_error)
        if "missing required field `op`" in text:
            return f"missing 'op'; known ops: {_KNOWN}"
        if text.startswith("Expected `object`"):
            got = text.rpartition("got ")[2].strip("`") if "got" in text else "something else"
            return f"a request must be a JSON object, got {got}"
        if text.endswith("at `$.op`"):
            return f"'op' must be a string; known ops: {_KNOWN}"
        return _field_message(text)
    except (msgspec.DecodeError, RecursionError) as envelope_error:
        return _invalid_json(envelope_error)
    if envelope.op not in KNOWN_OPS:
        return f"unknown op {_shorten(envelope.op)!r}; known ops: {_KNOWN}"
    return f"op {envelope.op!r}: {_field_message(str(error))}"


def _invalid_json(error: Exception) -> str:
    text = str(error).removeprefix("JSON is malformed: ")
    return f"invalid JSON: {text[:1].lower()}{text[1:]}"


def _field_message(text: str) -> str:
    missing = _MISSING.search(text)
    if missing:
        return f"missing field {missing.group(1)!r}"
    located = _AT.match(text)
    if located:
        what = located.group("what").replace("`", "")
        what = what[0].lower() + what[1:] if what else what
        return f"field {located.group('where')!r}: {what}"
    return text
