"""Logging for the journal and for a terminal.

Under systemd each line carries a `<N>` syslog priority prefix, which journald turns into the
entry's priority (and strips); the journal adds its own timestamps. On a terminal, lines get a
timestamp instead. Never tracebacks for expected conditions: those are logged as one line by
the code that expects them.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Mapping
from typing import TextIO

from watcher.contract import PREFIX, printable

_ExcInfo = (
    tuple[type[BaseException], BaseException, types.TracebackType | None] | tuple[None, None, None]
)

__all__ = ["JournalFormatter", "OneLineFormatter", "fatal", "on_journal", "setup"]

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# Ours among the root logger's handlers, so a second setup() replaces it and nothing else.
_HANDLER_NAME = "gpu-device-watcher"

log = logging.getLogger("watcher")


class OneLineFormatter(logging.Formatter):
    """Every message one line with nothing a terminal acts on: messages carry host data (a
    dev root named by driver-ready, a mount point), which may hold ESC sequences or line
    breaks. A traceback keeps its lines, each escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        # The traceback's lines too; another handler may have cached them unescaped on the
        # record (exc_text), so they are escaped here, on the way out.
        return "\n".join(printable(line) for line in super().format(record).splitlines())


class JournalFormatter(OneLineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # journald reads one entry per line; a multi-line message keeps its priority on each.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def on_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal stream systemd connected us to (systemd.exec(5)).

    JOURNAL_STREAM is inherited by every child of a service, also by one whose stderr was
    redirected to a file or a terminal, so it names the stream ("<st_dev>:<st_ino>") and the
    prefixes are used only when stderr is still that very stream.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # Malformed, a closed stream, or one with no descriptor (a test's capture buffer).
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: types.TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    # A bug, not an expected condition: the traceback goes to the log at "crit", every line
    # prefixed, instead of as unprefixed lines the journal would file as "info".
    log.critical("unexpected error, exiting", exc_info=(kind, error, trace))


def setup(
    level: str, environ: Mapping[str, str] = os.environ, stream: TextIO | None = None
) -> None:
    """Log `watcher.*` at `level` and everything else (asyncio, anyio, warnings) at WARNING."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    if on_journal(stream, environ):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            OneLineFormatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    # On the root logger, so that what asyncio, anyio or the warnings module report is
    # formatted (and prioritised) like our own lines; the root's own level keeps their debug
    # chatter out while `watcher` follows --log-level (SIGHUP may change it).
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())
    log.propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


def fatal(
    message: str, environ: Mapping[str, str] = os.environ, stream: TextIO | None = None
) -> None:
    """Why `serve` cannot start, as every command reports an error: one line on stderr
    starting `gpu-device-watcher: ` (on the journal with the "err" priority in front, which
    journald strips). Not a log line: nothing was served, and a person reads this one."""
    stream = sys.stderr if stream is None else stream
    line = f"{PREFIX} {printable(' '.join(message.splitlines()))}"
    if on_journal(stream, environ):
        line = f"<{_SYSLOG_PRIORITY[logging.ERROR]}>{line}"
    print(line, file=stream, flush=True)
