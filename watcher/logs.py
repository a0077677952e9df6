"""Logging for the journal and for a terminal.

Under systemd (JOURNAL_STREAM set) each line carries a `<N>` syslog priority prefix, which
journald turns into the entry's priority; the journal adds its own timestamps. On a
terminal, lines get a timestamp instead. Never tracebacks for expected conditions: those
are logged as one line by the code that expects them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # journald reads one entry per line; a multi-line message keeps its priority on each.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup(level: str, environ: Mapping[str, str] = os.environ) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger("watcher")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
