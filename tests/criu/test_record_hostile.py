"""Hostile image directories: no record can make the gate pass, hang, eat memory or crash.

Checkpoint images are copied between hosts and can be crafted; the action reading them runs
as root. Each case here was a finding of a review of the first version (a record symlinked to
/dev/zero grew the action past 1.4 GB; a FIFO hung the restore; a symlink to a root-only file
printed a line of it into CRIU's log; a crafted record forged a whole "restore may go on"
line and terminal escapes into the log). Each must now be a `record-unreadable` refusal in
well under a second, or a refusal whose lines carry the crafted values escaped.

The fuzz target at the end runs the record reader and the gate on generated input with fixed
settings (derandomized, a fixed number of examples): a few seconds in every CI run.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.criu import RECORD_NAME, gate, recordfile

from .harness import ACTION
from .simhost import SimHost
from .test_gate import H200, U, host, record

FAST_S = 1.0  # "well under a second" for every refusal, on a loaded 2-core machine
TIMEOUT = 30.0


def refused(images: Path) -> recordfile.RecordError:
    started = time.perf_counter()
    with pytest.raises(recordfile.RecordError) as caught:
        recordfile.load(str(images))
    elapsed = time.perf_counter() - started
    assert elapsed < FAST_S, f"refusal took {elapsed:.2f} s"
    assert caught.value.code == "record-unreadable"
    return caught.value


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def run_pre_restore(images: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in env.items() if not k.startswith("CRTOOLS_")}
    env.update(CRTOOLS_SCRIPT_ACTION="pre-restore", CRTOOLS_IMAGE_DIR=str(images))
    return subprocess.run(
        [str(ACTION)], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


# ------------------------------------------------------------------------------ the file


def test_a_symlink_to_dev_zero_is_not_followed(images: Path) -> None:
    (images / RECORD_NAME).symlink_to("/dev/zero")
    assert "a symlink (not followed)" in refused(images).message


def test_a_symlink_to_a_root_only_file_prints_nothing_of_it(images: Path, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    (images / RECORD_NAME).symlink_to(secret)
    done = run_pre_restore(images, dict(os.environ))
    assert done.returncode == 1
    assert "SECRET" not in done.stdout + done.stderr
    assert "record-unreadable" in done.stderr


def test_a_fifo_cannot_hang_the_restore(images: Path) -> None:
    os.mkfifo(images / RECORD_NAME)
    started = time.perf_counter()
    done = run_pre_restore(images, dict(os.environ))  # bounded: TIMEOUT would raise
    assert time.perf_counter() - started < 5.0
    assert done.returncode == 1
    assert "gpu-device-watcher.json is a FIFO, not a regular file" in done.stderr
    refused(images)


def test_a_device_node_is_not_opened(images: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(images / RECORD_NAME, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers
    assert "a device node" in refused(images).message


def test_a_directory_is_not_a_record(images: Path) -> None:
    (images / RECORD_NAME).mkdir()
    assert "a directory" in refused(images).message


def test_a_100_mb_record_is_refused_unread(images: Path) -> None:
    with (images / RECORD_NAME).open("wb") as file:
        file.truncate(100 * 1024 * 1024)  # sparse: no disk, same st_size
    assert "holds 104857600 bytes" in refused(images).message


def test_the_size_limit_is_exact(images: Path) -> None:
    limit = recordfile.MAX_RECORD_BYTES
    path = images / RECORD_NAME
    with path.open("wb") as file:
        file.write(b" " * (limit - 2) + b"{}")
    # 16 MiB exactly: read, decoded, and refused only for its shape (no version).
    assert '"version" is not an integer' in refused(images).message
    with path.open("ab") as file:
        file.write(b" ")
    assert "holds 16777217 bytes, more than the 16777216" in refused(images).message


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"[" * 400_000 + b"]" * 400_000, "far more values"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"[" + b"{}," * 400_000 + b"{}]", "far more values"),
        (b"[" + b"0," * 2_000_000 + b"0]", "far more values"),
        (b"1" * 10_000, "not JSON"),  # more digits than int() takes
        (b"\xff\xfe{\x00", "not JSON"),
        (b"", "not JSON"),
        (b"null", "not a JSON object"),
    ],
    ids=["brackets", "nesting", "objects", "dicts", "commas", "digits", "bytes", "empty", "null"],
)
def test_decoding_is_bounded(images: Path, content: bytes, says: str) -> None:
    (images / RECORD_NAME).write_bytes(content)
    assert says in refused(images).message


def test_the_worst_record_the_limits_let_through_stays_small() -> None:
    # A child measures its own peak (VmHWM: ru_maxrss would carry pytest's over fork and
    # exec): the most values the limits allow, as strings, the costliest per byte.
    probe = (
        "from watcher.criu import recordfile\n"
        "data = b'[' + b'\"ab\",' * recordfile.MAX_COMMAS + b'\"ab\"]'\n"
        "try:\n"
        "    recordfile.validate(recordfile.decode(data))\n"
        "except recordfile.RecordError:\n"
        "    pass\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    peak_mib = int(done.stdout) / 1024
    assert peak_mib < 150, f"decoding the worst record peaked at {peak_mib:.0f} MiB"


# ------------------------------------------------------------------------------ forged lines


FORGED = (
    "x\ngpu-device-watcher: the GPU devices of the checkpoint (nvidia5) match this host: "
    "restore may go on\r\n\x1b]0;owned\x07\x1b[2J\u2028\u0085"
)


def test_a_record_cannot_forge_lines_or_escapes_into_criu_log(host: SimHost, images: Path) -> None:
    here = host.get()["map"]
    rec = record([(5, H200, "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f")], at=here, others=())
    rec["hostname"] = FORGED
    rec["map"]["driver"]["version"] = "580.95.05" + FORGED  # another version: refused
    rec["used"].append(
        {
            "name": "nvidia-caps/" + FORGED,
            "path": "/dev/" + FORGED,
            "kind": "cap",
            "major": 1,
            "minor": 9,
            "valid": True,
            "pids": [1],
            "via": ["fd"],
        }
    )
    rec["libraries"] = ["libcuda.so.1" + FORGED]
    (images / RECORD_NAME).write_text(json.dumps(rec))
    done = run_pre_restore(images, host.env())
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) >= 3
    # Every line is ours, and none is the forged one: the values are escapes on the line
    # that names them, never a line of their own, and no byte of them reaches a terminal.
    for line in lines:
        assert line.startswith("gpu-device-watcher: ")
        assert line.isascii() and line.isprintable(), line
        assert not line.startswith("gpu-device-watcher: the GPU devices of the checkpoint")
    assert "\x1b" not in done.stderr and "\r" not in done.stderr
    assert any("\\x0agpu-device-watcher: the GPU devices" in line for line in lines)
    assert {line.split(":")[1].strip() for line in lines[:-1]} <= set(gate.REASON_CODES)


# ------------------------------------------------------------------------------ fuzzing

HERE = host([(0, H200, U[0]), (1, H200, U[1])])
FITTING = record([(0, H200, U[0])], at=HERE, others=("nvidiactl",))  # used[0]: nvidia0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
scalars = st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
containers = st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars)

# (path into FITTING, values of a type the reader must refuse there)
MUTABLE: list[tuple[tuple[str | int, ...], st.SearchStrategy[Any]]] = [
    (("version",), st.text() | containers | st.booleans() | st.floats()),
    (("used",), scalars | st.dictionaries(st.text(max_size=4), scalars)),
    (("used", 0), scalars | st.lists(scalars)),
    (("used", 0, "name"), st.integers() | st.booleans() | containers | st.just("")),
    (("used", 0, "path"), st.integers() | containers),
    (("used", 0, "kind"), st.integers() | containers),
    (("used", 0, "pids"), st.text(min_size=1) | st.dictionaries(st.text(), scalars, min_size=1)),
    (("used", 0, "gpu"), scalars.filter(lambda v: v is not None) | st.lists(scalars)),
    (("used", 0, "gpu", "uuid"), st.integers() | containers | st.just("GPU-1,GPU-2=x")),
    (("used", 0, "gpu", "model"), st.integers() | containers),
    (("used", 0, "gpu", "minor"), st.text() | containers | st.booleans()),
    (("map",), scalars | st.lists(scalars)),
    (("map", "driver"), st.text() | st.integers() | st.lists(scalars)),
    (("map", "driver", "version"), st.integers() | containers),
    (("libraries",), st.text(min_size=1) | st.integers() | st.lists(st.integers(), min_size=1)),
    (("checks",), st.text(min_size=1) | st.lists(st.integers(), min_size=1)),
    (("environment",), st.text(min_size=1) | st.lists(scalars, min_size=1)),
    (("hostname",), st.integers() | containers),
]


def _set(rec: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    broken = json.loads(json.dumps(rec))
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return broken


def _judge(data: bytes, here: dict[str, Any]) -> gate.Verdict:
    """What pre-restore decides for a record file holding `data` (read, checked, gated)."""
    started = time.perf_counter()
    try:
        rec = recordfile.validate(recordfile.decode(data))
    except recordfile.RecordError as error:
        assert error.code in ("record-unreadable", "record-version")
        verdict = gate.Verdict()
        verdict.refuse(error.code, error.message)
    else:
        verdict = gate.check(rec, here, "exact")
    assert time.perf_counter() - started < FAST_S
    for _, message in verdict.reasons:
        assert message.isascii() and message.isprintable(), message
    return verdict


FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_fitting_record_does_fit() -> None:
    # The control for the mutations below: unbroken, it passes.
    assert _judge(json.dumps(FITTING).encode(), HERE).fits


@FUZZ
@given(data=st.binary(max_size=2000))
def test_fuzz_bytes_never_pass(data: bytes) -> None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        value = None
    verdict = _judge(data, HERE)
    if verdict.fits:  # only a real record with nothing used may pass, whatever the bytes
        assert isinstance(value, dict) and value.get("used") == []


@FUZZ
@given(value=json_values)
def test_fuzz_json_values_never_pass(value: object) -> None:
    verdict = _judge(json.dumps(value).encode(), HERE)
    if verdict.fits:
        assert isinstance(value, dict) and value.get("used") == []


@FUZZ
@given(mutation=st.sampled_from(MUTABLE).flatmap(lambda m: st.tuples(st.just(m[0]), m[1])))
def test_fuzz_a_field_of_the_wrong_type_never_passes(
    mutation: tuple[tuple[str | int, ...], object],
) -> None:
    path, value = mutation
    verdict = _judge(json.dumps(_set(FITTING, path, value)).encode(), HERE)
    assert not verdict.fits, (path, value)
    assert verdict.reasons[0][0] in ("record-unreadable", "record-version")


@FUZZ
@given(here=json_values, extra=st.lists(json_values, max_size=3))
def test_fuzz_any_host_map_is_judged_without_crashing(here: object, extra: list[Any]) -> None:
    # The map comes from the daemon (or a scan): trusted, but the gate must not trust its shape.
    mangled = (
        {"driver": here, "devices": extra, "gpus": here} if not isinstance(here, dict) else here
    )
    verdict = _judge(json.dumps(FITTING).encode(), mangled)
    assert not verdict.fits
