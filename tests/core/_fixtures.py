"""Access to the text fixtures in tests/fixtures (read byte-exact: no newline translation)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode("utf-8")
