"""`doctor`'s output: a compact table for people (colour only on a terminal), JSON for
automation."""

from __future__ import annotations

import json
import textwrap

from watcher.doctor.model import Check, summary

__all__ = ["as_json", "as_text"]

_COLOURS = {"ok": "32", "warn": "33", "fail": "31", "skip": "2"}


def as_json(checks: list[Check]) -> str:
    return json.dumps(
        {"checks": [check.as_dict() for check in checks], "summary": summary(checks)}, indent=2
    )


def as_text(checks: list[Check], *, colour: bool, width: int = 100, header: str = "") -> str:
    id_width = max(len(check.id) for check in checks)
    indent = " " * (id_width + 8)
    body = max(width - len(indent), 40)
    lines = [header] if header else []
    for check in checks:
        status = f"{check.status:<4}"
        if colour:
            status = f"\033[{_COLOURS[check.status]}m{status}\033[0m"
        found = textwrap.wrap(
            check.found, body, break_on_hyphens=False, break_long_words=False
        ) or [""]
        lines.append(f"{check.id:<{id_width}}  {status}  {found[0]}")
        lines.extend(indent + more for more in found[1:])
        if check.fix is not None:
            # One line, never wrapped: it is meant to be copied whole.
            lines.append(f"{indent}fix: {check.fix}")
    counts = summary(checks)
    lines.append(
        ", ".join(f"{counts[status]} {status}" for status in ("ok", "warn", "fail", "skip"))
    )
    return "\n".join(lines)
