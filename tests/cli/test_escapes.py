"""Terminal escapes from host data never reach a person's terminal or the daemon's log raw.

A driver-ready file names the driver root, so anyone who can write it (the GPU Operator's
validations directory) chooses a path that every table, `watch` line, log line and STATUS=
repeats. Here it names a directory whose name holds ESC sequences (a real directory with a
real `nvidiactl` node, so the map uses it), and the outputs are read back as bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemonproc import DaemonProcess
from watcher.cli import render
from watcher.contract import printable
from watcher.daemon import logs

TIMEOUT = 30.0
HOSTILE = "/evil\x1b[31mRED\x1b[0m\x1b]0;title\x07"
SHOWN = "/evil\\x1b[31mRED\\x1b[0m\\x1b]0;title\\x07"
# C0 (but the line feed that ends each line), DEL, C1 (CSI), line and paragraph separators,
# a bidi override.
RAW = ("\x1b", "\x07", "\r", "\x7f", "\x9b", "\u2028", "\u2029", "\u202e")


def raw_in(text: str) -> list[str]:
    return [char for char in RAW if char in text]


def fail_reading(path: str) -> None:
    raise OSError(f"cannot read {path}")


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", *arguments],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def hostile_host(tmp_path: Path) -> tuple[Path, Path]:
    """(root, proc): driver-ready names HOSTILE, which holds dev/nvidiactl."""
    root, proc = tmp_path / "root", tmp_path / "proc"
    dev = root / HOSTILE.lstrip("/") / "dev"
    dev.mkdir(parents=True)
    os.mknod(dev / "nvidiactl", 0o20666, os.makedev(195, 255))
    validations = root / "run/nvidia/validations"
    validations.mkdir(parents=True)
    (validations / "driver-ready").write_text(f"NVIDIA_DRIVER_ROOT={HOSTILE}\n")
    proc.mkdir()
    (proc / "devices").write_text("Character devices:\n195 nvidia\n\nBlock devices:\n")
    return root, proc


def test_host_paths_with_escapes_reach_no_terminal_and_no_log(
    hostile_host: tuple[Path, Path], tmp_path: Path
) -> None:
    root, proc = hostile_host
    view = ["--root", str(root), "--proc", str(proc), "--mountinfo", "/proc/self/mountinfo"]

    scanned = cli("scan", *view, "--format", "table")
    assert scanned.returncode == 0, scanned.stderr
    assert raw_in(scanned.stdout) == []
    assert f"dev root {SHOWN}/dev" in scanned.stdout
    assert f"{SHOWN}/dev/nvidiactl" in scanned.stdout

    socket = tmp_path / "daemon.sock"
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(
        [sys.executable, "-m", "watcher", "serve", *view, "--socket", str(socket)],
        socket_path=socket,
        log_path=log,
    )
    try:
        daemon.wait_ready()
        daemon.notifications.wait_for("STATUS")
        status = [text for text in daemon.notifications if text.startswith("STATUS=")]
        table = cli("get", "--socket", str(socket), "--format", "table")
        as_json = cli("get", "--socket", str(socket), "--format", "json")
        as_env = cli("get", "--socket", str(socket), "--format", "env")
        state = cli("status", "--socket", str(socket))
    finally:
        daemon.stop()
        daemon.close()

    assert table.returncode == 0, table.stderr
    assert raw_in(table.stdout) == []
    assert f"dev root {SHOWN}/dev" in table.stdout
    assert state.returncode == 0, state.stderr
    assert raw_in(state.stdout) == []

    log_text = log.read_bytes().decode()
    assert raw_in(log_text) == [], log_text
    assert f"in {SHOWN}/dev" in log_text
    assert status, "no STATUS= notification"
    assert all(raw_in(text) == [] for text in status), status
    assert any(f"in {SHOWN}/dev" in text for text in status), status

    # JSON escapes in its own way and keeps the value; env keeps it exact for sh.
    assert "\x1b" not in as_json.stdout
    assert json.loads(as_json.stdout)["driver"]["root"] == HOSTILE
    sourced = subprocess.run(
        ["sh", "-c", 'eval "$1"; printf %s "$GDW_DRIVER_ROOT"', "sh", as_env.stdout],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert sourced.stdout == HOSTILE


def hostile_map() -> dict[str, Any]:
    path = "/dev/nvidia0\x9b2J"
    return {
        "generation": 3,
        "driver": {"loaded": True, "version": "580\u202e", "root": "/", "dev_root": "/dev"},
        "devices": [
            {
                "name": "nvidia0\x7f",
                "path": path,
                "kind": "gpu",
                "major": 195,
                "minor": 0,
                "mode": "0666",
                "valid": True,
                "mount": {"fstype": "tmpfs", "mount_point": "/dev\u2028x", "nodev": False},
            }
        ],
        "gpus": [{"minor": 0, "bus_id": "0000:3b:00.0", "model": "H200\r\x1b[2K", "device": path}],
        "problems": [
            {"code": "missing-node", "severity": "error", "message": "gone\nforged: line"}
        ],
    }


def test_every_text_format_escapes_what_a_terminal_acts_on() -> None:
    device_map = hostile_map()
    table = render.as_table(device_map)
    assert raw_in(table) == []
    assert "/dev/nvidia0\\x9b2J" in table
    assert "H200\\x0d\\x1b[2K" in table
    assert "gone\\x0aforged: line" in table
    assert not any(line.startswith("forged") for line in table.splitlines())

    first = render.describe_update(None, {"generation": 3, "map": device_map})
    changed = render.describe_update(
        {"driver": {}, "problems": []},
        {
            "generation": 4,
            "map": device_map,
            "changes": [{"change": "added", "name": "nvidia0\x7f", "path": "/dev/nvidia0\x9b2J"}],
        },
    )
    for line in (*first, *changed):
        assert raw_in(line) == [], line

    for text in (render.as_json(device_map), render.as_json_line(device_map)):
        assert raw_in(text) == []
        assert json.loads(text) == device_map


def test_printable_keeps_printable_text_and_escapes_the_rest() -> None:
    assert printable("/run/nvidia/driver/dev") == "/run/nvidia/driver/dev"
    assert printable("Ünïcödé ™ a\\b") == "Ünïcödé ™ a\\b"
    assert printable("a\x1b[2Jb\nc\x9bd\u202ee\U000e0001") == (
        "a\\x1b[2Jb\\x0ac\\x9bd\\u202ee\\U000e0001"
    )
    # Escaping twice changes nothing: the log repeats lines the summary already escaped.
    once = printable(HOSTILE)
    assert printable(once) == once == SHOWN


def test_daemon_log_lines_are_escaped_one_line_each() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logs.log.level, sys.excepthook)
    logs.setup("info", environ={}, stream=stream)
    try:
        logs.log.info("serving %s", "/evil\x1b[2J\nCRITICAL forged")
        try:
            fail_reading(HOSTILE)
        except OSError:
            logs.log.exception("scan failed")
    finally:
        root.handlers[:], level, ours, sys.excepthook = saved
        root.setLevel(level)
        logs.log.setLevel(ours)
        logging.captureWarnings(False)
    text = stream.getvalue()
    assert raw_in(text) == [], text
    lines = text.splitlines()
    assert lines[0].endswith("serving /evil\\x1b[2J\\x0aCRITICAL forged")
    assert f"OSError: cannot read {SHOWN}" in text
    assert lines[1].endswith("scan failed")

    journal = logs.JournalFormatter("%(message)s")
    record = logging.LogRecord("watcher", logging.WARNING, __file__, 1, "at %s", (HOSTILE,), None)
    assert journal.format(record) == f"<4>at {SHOWN}"
