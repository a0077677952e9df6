"""Server hardening (second review): refused clients read their refusal, idle connections
give their slot back, a reload closes connections no longer allowed, the socket file is
never set up through a name someone else can swap, and a bad socket_group is a config error.

Each test here failed before its fix (docs/reliability.md has the figures).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.server.test_requests import (
    NOBODY,
    TIMEOUT,
    _abstract_listener,
    error,
    make_settings,
    needs_root,
    serving,
)
from watcher import client
from watcher.config import ConfigError, load_config_file
from watcher.errors import SocketSetupError
from watcher.server import UnixServerSocket, bind_unix_socket

TRIES = 100


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- 16.7: a refused client gets its refusal line ------------------------------------------------


def _outcomes(path: str, tries: int) -> dict[str, int]:
    """What `client.request` (the CLI's `get`) reports, `tries` times."""
    seen: dict[str, int] = {}
    for _ in range(tries):
        try:
            client.request(path, {"op": "get"}, timeout=TIMEOUT)
            outcome = "ok"
        except client.ServerError as refused:
            outcome = refused.code
        except client.Unreachable:
            outcome = "unreachable"
        seen[outcome] = seen.get(outcome, 0) + 1
    return seen


@pytest.mark.anyio
async def test_a_busy_client_reads_busy_not_unreachable(tmp_path: Path) -> None:
    async with serving(tmp_path, max_clients=1) as harness:
        held = await harness.connect()
        assert (await held.ask({"op": "status"}))["ok"] is True
        seen = await anyio.to_thread.run_sync(_outcomes, harness.address, TRIES)
        assert seen == {"busy": TRIES}, f"{TRIES} tries against max_clients=1: {seen}"


# Everything is imported before the privileges go (nobody cannot read this Python).
_AS_NOBODY = f"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from watcher import client
os.setgid({NOBODY}); os.setuid({NOBODY})
seen = {{}}
for _ in range(int(sys.argv[3])):
    try:
        client.request("\\0" + sys.argv[2], {{"op": "get"}}, timeout=10)
        outcome = "ok"
    except client.ServerError as refused:
        outcome = refused.code
    except client.Unreachable:
        outcome = "unreachable"
    seen[outcome] = seen.get(outcome, 0) + 1
print(json.dumps(seen))
"""


@needs_root
@pytest.mark.anyio
async def test_a_forbidden_client_reads_forbidden_not_unreachable(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with serving(tmp_path, listener=listener, allowed_uids=frozenset({4242})):
        repo = str(Path(__file__).resolve().parents[2])
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [sys.executable, "-c", _AS_NOBODY, repo, name, str(TRIES)], check=False
            )
        assert done.returncode == 0, done.stderr.decode()
        seen = json.loads(done.stdout)
        assert seen == {"forbidden": TRIES}, f"{TRIES} tries as uid {NOBODY}: {seen}"


@pytest.mark.anyio
async def test_refused_connections_linger_for_a_bounded_time(tmp_path: Path) -> None:
    """A refused client that neither sends nor closes is closed after the linger time."""
    async with serving(tmp_path, max_clients=1, refusal_linger=0.2) as harness:
        held = await harness.connect()
        assert (await held.ask({"op": "status"}))["ok"] is True
        silent = await harness.connect()
        assert await silent.reply() == error(
            "busy", "too many clients (max_clients=1); try again later"
        )
        # End of input (the server shut down its side), then closed within the linger time.
        assert await silent.rest_until_eof() == b""


# --- 16.11c: idle connections give their slot back ------------------------------------------


@pytest.mark.anyio
async def test_an_idle_connection_is_closed_and_frees_its_slot(tmp_path: Path) -> None:
    async with serving(tmp_path, max_clients=1, idle_timeout=0.3) as harness:
        idle = await harness.connect()
        assert (await idle.ask({"op": "get"}))["ok"] is True
        # Quiet now: after the idle timeout the server says so and closes.
        assert await idle.reply() == error(
            "timeout", "no request for 0.3 s; closing the connection"
        )
        assert await idle.rest_until_eof() == b""
        await harness.server.wait_closed()
        assert harness.server.clients == 0
        again = await harness.connect()
        assert (await again.ask({"op": "get"}))["ok"] is True


@pytest.mark.anyio
async def test_waiting_and_subscribed_connections_are_not_idle(tmp_path: Path) -> None:
    async with serving(tmp_path, idle_timeout=0.2) as harness:
        waiting = await harness.connect()
        subscriber = await harness.connect()
        await waiting.send(b'{"op":"wait","timeout":1}\n')
        assert (await subscriber.ask({"op": "subscribe"}))["ok"] is True
        # The wait outlives the idle timeout and ends by its own timeout.
        reply = await waiting.reply()
        assert reply["error"]["code"] == "timeout"
        assert "within 1 s" in reply["error"]["message"]
        # The subscriber, quiet for five idle timeouts, is still there.
        assert harness.server.subscribers == 1
        assert harness.server.clients == 2


# --- 16.1: a reload closes connections whose peer is no longer allowed -------------------

_SUBSCRIBER = f"""
import os, socket, sys
os.setgid({NOBODY}); os.setuid({NOBODY})
s = socket.socket(socket.AF_UNIX)
s.connect("\\0" + sys.argv[1])
s.sendall(b'{{"op":"subscribe"}}\\n')
f = s.makefile("rb")
print(f.readline().decode()[:10], flush=True)
print(repr(f.read()), flush=True)
"""


@needs_root
@pytest.mark.anyio
async def test_a_reload_closes_open_connections_no_longer_allowed(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with serving(tmp_path, listener=listener) as harness:
        started = threading.Event()
        output: list[bytes] = []

        def subscribe_as_nobody() -> None:
            with subprocess.Popen(
                [sys.executable, "-c", _SUBSCRIBER, name], stdout=subprocess.PIPE
            ) as child:
                assert child.stdout is not None
                output.append(child.stdout.readline())
                started.set()
                output.append(child.stdout.read())
                child.wait(TIMEOUT)

        thread = threading.Thread(target=subscribe_as_nobody)
        thread.start()
        try:
            with anyio.fail_after(TIMEOUT):
                while not started.is_set() or harness.server.subscribers != 1:
                    await anyio.sleep(0.01)
            restricted = make_settings(harness.address, allowed_uids=frozenset({4242}))
            harness.server.configure(restricted)
            await harness.server.wait_closed()
        finally:
            await anyio.to_thread.run_sync(thread.join, TIMEOUT)
        assert output[0].startswith(b'{"ok":true')
        assert output[1].strip() == b"b''"  # closed, nothing more
        assert harness.server.clients == 0


# --- 16.6: the socket file is never set up through a swappable name ------------------------


def test_bind_never_follows_a_name_swapped_for_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user who can write the socket directory swaps every new name in it for a
    symlink to a file of root's, right after the bind: that file keeps its mode and group."""
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(0o777)
    victim = tmp_path / "shadow"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    before = os.stat(victim)
    real_bind = UnixServerSocket.bind

    def bind_then_swap(self: UnixServerSocket, address: Any) -> None:
        real_bind(self, address)
        for entry in os.listdir(directory):
            moved = directory / entry
            os.rename(moved, tmp_path / f"moved-{entry}")
            os.symlink(victim, moved)

    monkeypatch.setattr(UnixServerSocket, "bind", bind_then_swap)
    path = directory / "gdw.sock"
    try:
        sock: UnixServerSocket | None = bind_unix_socket(str(path), 0o666, NOBODY)
    except SocketSetupError:
        sock = None  # refusing is a fine answer too; following the symlink is not
    after = os.stat(victim)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o600, before.st_gid)
    if sock is not None:
        with sock:
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o666, NOBODY)


# --- 16.9: socket_group out of range is a config error ---------------------------------------


@pytest.mark.parametrize("value", ["-2", "99999999999", '"99999999999"', '""', '"a/b"'])
def test_a_bad_socket_group_is_a_config_error_naming_the_key(tmp_path: Path, value: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"socket_group = {value}\n")
    config.chmod(0o644)
    with pytest.raises(ConfigError, match="key 'socket_group': must be a group name or id"):
        load_config_file(str(config), required=True)


@pytest.mark.parametrize("value", ["-2", "99999999999"])
def test_serve_with_a_bad_socket_group_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"socket_group = {value}\n")
    config.chmod(0o644)
    sock = str(tmp_path / "gdw.sock")
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "serve", "--config", str(config), "--socket", sock],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("gpu-device-watcher: "), done.stderr
    assert "socket_group" in lines[0]
    assert not (tmp_path / "gdw.sock").exists()


def test_an_unknown_group_name_fails_at_bind_with_one_line(tmp_path: Path) -> None:
    settings = replace(make_settings(str(tmp_path / "s.sock")), socket_group="no-such-gdw")
    with pytest.raises(SocketSetupError, match="socket_group 'no-such-gdw': no such group"):
        bind_unix_socket(settings.socket, settings.socket_mode, settings.socket_group)
