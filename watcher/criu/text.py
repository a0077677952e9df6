"""Lines for CRIU's log, with every value from a record or a process escaped.

The action runs as root and its output lands in CRIU's log, which people and tools read to
decide whether a restore may go on. A record comes from an image directory that may have been
crafted, and a process names its own files and environment, so no value from either may
start a line of its own: `shown()` makes any value one run of printable ASCII (a control
character, a line break, a backslash, anything outside ASCII becomes a `\\xNN` / `\\uNNNN`
escape) and cuts it to a length. Every message that carries such a value is built with it.
"""

from __future__ import annotations

import os
import sys

from watcher.contract import PREFIX, escape_char

# Long enough for a path or a UUID, short enough that a crafted value cannot flood the log.
DEFAULT_LIMIT = 160


def shown(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as one run of printable ASCII at most about `limit` characters long."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    # The common case (host names, device names, versions) costs one pass in C.
    if not (text.isascii() and text.isprintable() and "\\" not in text):
        text = "".join(
            char if " " <= char <= "~" and char != "\\" else escape_char(char) for char in text
        )
    return text + "..." if cut else text


def one_line(message: str) -> str:
    """`message` with anything that is not printable escaped: a guard behind `shown()`."""
    if message.isascii() and message.isprintable():
        return message
    return "".join(char if " " <= char <= "~" else escape_char(char) for char in message)


def say(message: str) -> None:
    """One line for CRIU's log (stderr: it is unbuffered there, and ordered with CRIU's)."""
    print(f"{PREFIX} {one_line(message)}", file=sys.stderr, flush=True)


def tell(message: str) -> None:
    """One line of good news for CRIU's log."""
    print(f"{PREFIX} {one_line(message)}", flush=True)


def image_dir_name(image_dir: str) -> str:
    """The image directory as a person knows it, not as CRIU's /proc/<pid>/fd/<n> link."""
    try:
        return os.readlink(image_dir) if image_dir.startswith("/proc/") else image_dir
    except OSError:
        return image_dir
