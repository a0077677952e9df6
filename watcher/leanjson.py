"""JSON for the lean entry points without the `json` package's import cost.

`import json` costs ~5 ms at every start because `json.decoder` and `json.encoder` import
`re` (and `re` imports `enum`); CRIU starts the action at every stage of a dump and a
restore, and `pre-dump` has only a few milliseconds beyond the interpreter's start to do its
work. The C accelerator `_json` that `json` itself uses needs none of that: its scanner and
encoder are driven here directly, with the same settings `json.loads` and `json.dumps` use,
so the results are the same. Where `_json` is missing (another Python implementation), the
`json` package answers.

Standard library only; no `re`, `enum` or `typing` at import.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover (CPython always has it)
    _json = None  # type: ignore[assignment]

__all__ = ["dumps", "dumps_indented", "loads"]

_WHITESPACE = " \t\n\r"


def _constant(name: str) -> float:
    # json.loads accepts NaN, Infinity and -Infinity by default.
    return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


class _Settings:
    """What `_json.make_scanner` reads from a json.JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: dict[str, str] = {}  # noqa: RUF012 (read by the C scanner, which keeps its own)


_settings: Any = _Settings()
_scan = _json.make_scanner(_settings) if _json is not None else None


def loads(text: str | bytes) -> Any:
    """As `json.loads`; invalid text raises ValueError (json.JSONDecodeError where the C
    scanner reports it)."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    if _scan is None:
        import json  # noqa: PLC0415

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"Expecting value: char {stop.value}") from None
    except SystemError:
        # The scanner raises json.JSONDecodeError for malformed text, which it looks up in
        # sys.modules only: before `json.decoder` is imported it fails this way instead.
        # Invalid text is rare here; json itself then says what is wrong.
        import json  # noqa: PLC0415

        return json.loads(text)
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encoder(key_separator: str, item_separator: str, ascii_only: bool) -> Any:
    if _json is None:
        return None
    encode = _json.encode_basestring_ascii if ascii_only else _json.encode_basestring
    return _json.make_encoder(
        {}, _refuse, encode, None, key_separator, item_separator, False, False, True
    )


_COMPACT = _encoder(":", ",", True)
_SPACED = _encoder(": ", ", ", True)


def dumps(value: object, *, compact: bool = True) -> str:
    """`json.dumps(value, separators=(",", ":"))`, or with the default separators when not
    `compact`; ASCII only."""
    encoder = _COMPACT if compact else _SPACED
    if encoder is None:
        import json  # noqa: PLC0415

        return json.dumps(value, separators=(",", ":") if compact else None)
    return "".join(encoder(value, 0))


def dumps_indented(value: object, indent: int = 2) -> str:
    """`json.dumps(value, indent=indent, ensure_ascii=False)`, for files people read."""
    if _json is None:
        import json  # noqa: PLC0415

        return json.dumps(value, indent=indent, ensure_ascii=False)
    scalar = _encoder(": ", ", ", False)
    out: list[str] = []
    _indented(value, 0, indent, scalar, out)
    return "".join(out)


def _indented(value: object, level: int, indent: int, scalar: Any, out: list[str]) -> None:
    if isinstance(value, dict) and value:
        inner = "\n" + " " * (indent * (level + 1))
        separator = "{" + inner
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps writes other keys as strings; the records never have them.
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            out.append(separator)
            out.append(_json.encode_basestring(key) + ": ")
            _indented(item, level + 1, indent, scalar, out)
            separator = "," + inner
        out.append("\n" + " " * (indent * level) + "}")
    elif isinstance(value, list | tuple) and value:
        inner = "\n" + " " * (indent * (level + 1))
        separator = "[" + inner
        for item in value:
            out.append(separator)
            _indented(item, level + 1, indent, scalar, out)
            separator = "," + inner
        out.append("\n" + " " * (indent * level) + "]")
    else:
        out.extend(scalar(value, 0))
