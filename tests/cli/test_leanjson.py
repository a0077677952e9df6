"""watcher.leanjson gives what json gives, without importing it (the CRIU action's budget)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher import leanjson

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_values)
def test_encodings_equal_json(value: object) -> None:
    assert leanjson.dumps(value) == json.dumps(value, separators=(",", ":"))
    assert leanjson.dumps(value, compact=False) == json.dumps(value)
    assert leanjson.dumps_indented(value) == json.dumps(value, indent=2, ensure_ascii=False)
    text = json.dumps(value)
    assert leanjson.loads(text) == json.loads(text)
    assert leanjson.loads(f" \n{text}\t".encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text", ["", "x", "{not json", "[1,", '"abc', "[1] [2]", "{} x", "1" * 5000]
)
def test_invalid_text_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        leanjson.loads(text)


def test_a_value_json_cannot_write_is_refused() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        leanjson.dumps({"a": object()})


def test_importing_it_imports_neither_json_nor_re() -> None:
    code = (
        "import sys; import watcher.leanjson as j; j.loads('[1, {\"a\": null}]'); j.dumps([1]); "
        "j.dumps_indented({'a': [1]}); "
        "print(sorted(m for m in ('json', 're', 'enum', 'socket') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"
