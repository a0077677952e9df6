"""The command line against the real daemon, run as the installed console script."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from watcher import client

from .harness import DEV_ROOT, DRIVER_ROOT, TIMEOUT, Daemon, Namespace, cli_command

pytestmark = pytest.mark.realfs


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != client.SOCKET_ENV}
    return subprocess.run(
        [*cli_command(), *arguments],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=environment,
    )


def test_get_as_json_env_and_table(daemon: Daemon, base: Path) -> None:
    as_json = run_cli("get", "--socket", daemon.socket, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == daemon.get()["map"]

    as_env = run_cli("get", "--socket", daemon.socket, "--format", "env")
    assert as_env.returncode == 0, as_env.stderr
    assert f"GDW_DEV_NVIDIA_UVM={DEV_ROOT}/nvidia-uvm" in as_env.stdout.splitlines()
    # Sourced by sh, it sets what it says.
    sourced = base / "gdw.env"
    sourced.write_text(as_env.stdout)
    shell = subprocess.run(
        [
            "sh",
            "-c",
            '. "$1" && printf "%s|%s|%s|%s" "$GDW_DRIVER_LOADED" "$GDW_DRIVER_VERSION"'
            ' "$GDW_DEV_ROOT" "$GDW_DEV_NVIDIACTL"',
            "sh",
            str(sourced),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert shell.stdout == f"1|580.95.05|{DEV_ROOT}|{DEV_ROOT}/nvidiactl"

    as_table = run_cli("get", "--socket", daemon.socket, "--format", "table")
    assert as_table.returncode == 0, as_table.stderr
    assert "580.95.05" in as_table.stdout
    assert f"dev root {DEV_ROOT}" in as_table.stdout
    rows = [line.split() for line in as_table.stdout.splitlines()]
    assert ["nvidiactl", f"{DEV_ROOT}/nvidiactl", "control", "195:255", "0666", "yes"] in [
        row[:6] for row in rows
    ]


def test_path_exits_0_with_the_path_and_1_when_absent(daemon: Daemon) -> None:
    found = run_cli("path", "nvidiactl", "--socket", daemon.socket)
    assert (found.returncode, found.stdout, found.stderr) == (0, f"{DEV_ROOT}/nvidiactl\n", "")

    absent = run_cli("path", "nvidia-modeset", "--socket", daemon.socket)
    assert absent.returncode == 1
    assert absent.stdout == ""
    assert len(absent.stderr.splitlines()) == 1
    assert absent.stderr.startswith("gpu-device-watcher: ")
    assert "nvidia-modeset" in absent.stderr


def test_the_socket_comes_from_the_environment(daemon: Daemon) -> None:
    found = subprocess.run(
        [*cli_command(), "path", "nvidia0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, client.SOCKET_ENV: daemon.socket},
    )
    assert (found.returncode, found.stdout) == (0, f"{DEV_ROOT}/nvidia0\n"), found.stderr


def test_status(daemon: Daemon) -> None:
    status = run_cli("status", "--socket", daemon.socket)
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert set(fields) >= {"version", "uptime_s", "generation", "clients", "scans", "events"}
    assert int(fields["generation"]) == daemon.get()["generation"]


def _readline(process: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"`watch` printed nothing within {timeout:g} s")
    return process.stdout.readline()


def test_watch_streams_json_lines_until_interrupted(daemon: Daemon, host: Namespace) -> None:
    process = subprocess.Popen(
        [*cli_command(), "watch", "--socket", daemon.socket, "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        first = json.loads(_readline(process))
        assert first["map"]["driver"]["root"] == DRIVER_ROOT
        host.mknod(f"{DEV_ROOT}/nvidia-modeset", 195, 254)
        second = json.loads(_readline(process))
        assert second["generation"] == first["generation"] + 1
        assert second["changes"] == [
            {"change": "added", "name": "nvidia-modeset", "path": f"{DEV_ROOT}/nvidia-modeset"}
        ]
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors


@pytest.mark.parametrize(
    "arguments",
    [("get",), ("get", "--format", "env"), ("path", "nvidiactl"), ("status",), ("watch",)],
)
def test_an_absent_socket_is_exit_3_with_a_one_line_hint(arguments: tuple[str, ...]) -> None:
    # Needs no daemon, no root: a socket path that does not exist.
    with tempfile.TemporaryDirectory(prefix="gdw-c-", dir="/tmp") as directory:
        missing = f"{directory}/absent.sock"
        result = run_cli(*arguments, "--socket", missing)
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gpu-device-watcher: cannot reach the daemon at {missing}")
    assert "gpu-device-watcher serve" in lines[0]


def test_usage_errors_are_exit_2_and_still_name_every_command() -> None:
    # Only the parser of the command being run is built; errors must not suffer from it.
    typo = run_cli("pth", "nvidiactl")
    assert typo.returncode == 2
    assert len(typo.stderr.splitlines()) == 1
    for command in ("serve", "scan", "get", "path", "watch", "status", "criu-action"):
        assert f"'{command}'" in typo.stderr
    missing = run_cli("path")
    assert missing.returncode == 2
    assert missing.stderr.startswith("gpu-device-watcher: ")
    assert "NAME" in missing.stderr
    assert "path" in run_cli("--help").stdout


def test_path_and_get_import_nothing_heavy() -> None:
    """`path` must start about as fast as a bare interpreter (the bench's goal: 1.5x)."""
    probe = (
        "import sys, watcher.cli as cli\n"
        "cli.build_parser('path').parse_args(['path', 'nvidiactl'])\n"
        "heavy = ('typing', 'datetime', 'shutil', 'asyncio', 'anyio', 'msgspec', 'pyinotify')\n"
        "print(' '.join(name for name in heavy if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert done.stdout.split() == []
