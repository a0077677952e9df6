"""The daemon in process, with scripted event sources: the seams of watcher.daemon.

A real host tree (mknod'ed nodes in a temporary directory, a fake /proc, a mount table
file), the real scanner and server, but event sources the test fires by hand. Reload is
tested key by key here: every key of the config reaches the part it configures
(watcher.config.RELOAD_LIVE) or is kept until a restart and says so (RELOAD_ON_RESTART).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.server.test_requests import NOBODY, _abstract_listener, _as_user, needs_root
from tests.support.hostfiles import drm_render, proc_devices_text
from tests.support.inprocess import Host, running_daemon
from watcher.config import RELOAD_LIVE, RELOAD_ON_RESTART, ConfigError, ConfigFile

TIMEOUT = 10.0

needs_mknod = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of character devices needs root")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- events ------------------------------------------------------------------------------------


@needs_mknod
@pytest.mark.anyio
async def test_a_scripted_event_publishes_the_new_node(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        assert run.names() == ["nvidiactl"]
        generation = run.daemon.state.generation
        run.host.mknod("/dev/nvidia0", 195, 0)
        run.tree.fire()
        await run.next_generation(generation)
        assert run.names() == ["nvidia0", "nvidiactl"]
        assert (await run.ask({"op": "path", "name": "nvidia0"}))["path"] == "/dev/nvidia0"


@needs_mknod
@pytest.mark.anyio
async def test_a_mount_change_rearms_the_watches_before_the_rescan(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        armed = len(run.tree.targets)
        generation = run.daemon.state.generation
        run.host.mknod("/dev/nvidia0", 195, 0)
        run.mounts[-1].fire()
        await run.next_generation(generation)
        assert len(run.tree.targets) == armed + 1
        run.tree.fire()  # a directory event alone does not re-arm
        scans = run.daemon.counters.scans
        with anyio.fail_after(TIMEOUT):
            while run.daemon.counters.scans == scans:
                await anyio.sleep(0.01)
        assert len(run.tree.targets) == armed + 1


# --- reload, key by key ------------------------------------------------------------------------


def test_every_config_key_has_a_reload_rule() -> None:
    keys = set(ConfigFile.__struct_fields__)
    assert keys == set(RELOAD_LIVE) | set(RELOAD_ON_RESTART)
    assert not set(RELOAD_LIVE) & set(RELOAD_ON_RESTART)
    assert set(RELOAD_ON_RESTART) == {"socket", "socket_mode", "socket_group"}


@needs_root
@pytest.mark.anyio
async def test_reload_applies_allowed_uids_to_new_connections(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with running_daemon(tmp_path, listener=listener) as run:
        assert json.loads(await _as_user(name, NOBODY, NOBODY))["ok"] is True
        await run.reload(replace(run.daemon.settings, allowed_uids=frozenset({4242})))
        refused = json.loads(await _as_user(name, NOBODY, NOBODY))
        assert refused["error"]["code"] == "forbidden"
        await run.reload(replace(run.daemon.settings, allowed_gids=frozenset({NOBODY})))
        assert json.loads(await _as_user(name, NOBODY, NOBODY))["ok"] is True


@needs_root
@pytest.mark.anyio
async def test_reload_applies_allowed_gids(tmp_path: Path) -> None:
    listener, name = _abstract_listener()
    async with running_daemon(tmp_path, listener=listener, allowed_gids=frozenset({NOBODY})) as run:
        assert json.loads(await _as_user(name, NOBODY, NOBODY))["ok"] is True
        await run.reload(replace(run.daemon.settings, allowed_gids=frozenset({4242})))
        refused = json.loads(await _as_user(name, NOBODY, NOBODY))
        assert refused["error"]["code"] == "forbidden"


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_max_clients(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        with anyio.fail_after(TIMEOUT):
            held = await anyio.connect_unix(run.socket)
        async with held:
            await held.send(b'{"op":"status"}\n')
            with anyio.fail_after(TIMEOUT):
                assert b'"ok":true' in await held.receive()
            await run.reload(replace(run.daemon.settings, max_clients=1))
            reply = await run.ask({"op": "get"})
            assert reply["error"]["code"] == "busy"
            assert "max_clients=1" in reply["error"]["message"]


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_debounce_ms(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        assert run.daemon.scheduler.debounce_s == 0
        await run.reload(replace(run.daemon.settings, debounce_ms=250))
        assert run.daemon.scheduler.debounce_s == pytest.approx(0.25)
        # And the loop uses it: a change is published no sooner than 250 ms later.
        generation = run.daemon.state.generation
        run.host.mknod("/dev/nvidia0", 195, 0)
        started = anyio.current_time()
        run.tree.fire()
        await run.next_generation(generation)
        assert anyio.current_time() - started >= 0.25


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_log_level(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        await run.reload(replace(run.daemon.settings, log_level="debug"))
        assert logging.getLogger("watcher").level == logging.DEBUG
        await run.reload(replace(run.daemon.settings, log_level="warning"))
        assert logging.getLogger("watcher").level == logging.WARNING


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_driver_roots_and_watches_the_new_root(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        run.host.mknod("/run/nvidia/driver/dev/nvidiactl", 195, 255)
        view = replace(run.daemon.settings.view, driver_roots=("/run/nvidia/driver", "/"))
        await run.reload(replace(run.daemon.settings, view=view))
        assert run.daemon.state.current.driver.dev_root == "/run/nvidia/driver/dev"
        assert str(run.host.root / "run/nvidia/driver/dev") in run.tree.targets[-1]


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_root(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        other = Host(tmp_path / "other")
        other.mknod("/dev/nvidiactl", 195, 255)
        other.mknod("/dev/nvidia3", 195, 3)
        view = replace(run.daemon.settings.view, root=str(other.root))
        await run.reload(replace(run.daemon.settings, view=view))
        assert run.names() == ["nvidia3", "nvidiactl"]
        assert str(other.root / "dev") in run.tree.targets[-1]


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_proc(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        assert run.daemon.state.current.driver.loaded is True
        empty = tmp_path / "proc-unloaded"
        empty.mkdir()
        (empty / "devices").write_text("Character devices:\n1 mem\n")
        view = replace(run.daemon.settings.view, proc=str(empty))
        await run.reload(replace(run.daemon.settings, view=view))
        assert run.daemon.state.current.driver.loaded is False


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_sys(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        (run.host.proc / "devices").write_text(proc_devices_text({"nvidia": 195, "drm": 226}))
        run.host.mknod("/dev/dri/renderD128", 226, 128)
        await run.reload(run.daemon.settings)
        assert "dri/renderD128" not in run.names()  # the empty sysfs names no driver
        other = tmp_path / "sys-amd"
        drm_render(other, 128, "0000:83:00.0", unique_id="592c190172fd5d40")
        view = replace(run.daemon.settings.view, sys=str(other))
        await run.reload(replace(run.daemon.settings, view=view))
        assert "dri/renderD128" in run.names()
        [gpu] = [g for g in run.daemon.state.current.gpus if g.family == "amd"]
        assert (gpu.uuid, gpu.device) == ("592c190172fd5d40", "/dev/dri/renderD128")


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_validations_dir(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        validations = run.host.root / "alt/validations"
        validations.mkdir(parents=True)
        run.host.mknod("/op/driver/dev/nvidiactl", 195, 255)
        (validations / "driver-ready").write_text("NVIDIA_DRIVER_ROOT=/op/driver\n")
        view = replace(run.daemon.settings.view, validations_dir="/alt/validations")
        await run.reload(replace(run.daemon.settings, view=view))
        assert run.daemon.state.current.driver.source == "validations"
        assert run.daemon.state.current.driver.dev_root == "/op/driver/dev"
        assert str(validations) in run.tree.targets[-1]


@needs_mknod
@pytest.mark.anyio
async def test_reload_applies_mountinfo_with_a_new_watcher(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        first = run.mounts[-1]
        table = tmp_path / "other.mountinfo"
        # The same host, now seen as mounted nodev: the mount table is read from the new file.
        table.write_text(f"1 0 0:1 / {run.host.base} rw,nodev - tmpfs tmpfs rw\n")
        view = replace(run.daemon.settings.view, mountinfo=str(table))
        await run.reload(replace(run.daemon.settings, view=view))
        assert first.closed
        assert run.mounts[-1].path == str(table) and not run.mounts[-1].closed
        control = run.daemon.state.current.device("nvidiactl")
        assert control is not None and control.mount is not None and control.mount.nodev
        # The new table's watcher is the one that triggers rescans now.
        generation = run.daemon.state.generation
        run.host.write_mountinfo(table)
        run.mounts[-1].fire()
        await run.next_generation(generation)


@needs_mknod
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("key", "value"),
    [("socket", "/run/elsewhere.sock"), ("socket_mode", 0o600), ("socket_group", "nogroup")],
)
async def test_reload_keeps_the_socket_keys_until_a_restart_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, value: Any
) -> None:
    async with running_daemon(tmp_path) as run:
        before = run.daemon.settings
        with caplog.at_level(logging.WARNING, logger="watcher"):
            await run.reload(replace(before, **{key: value}, debounce_ms=5))
        assert getattr(run.daemon.settings, key) == getattr(before, key)
        assert run.daemon.settings.debounce_ms == 5  # the rest of the reload applied
        assert f"{key} changes only on restart" in caplog.text
        assert (await run.ask({"op": "get"}))["ok"] is True


@needs_mknod
@pytest.mark.anyio
async def test_a_refused_reload_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_daemon(tmp_path, max_clients=7) as run:
        before = run.daemon.settings
        with caplog.at_level(logging.ERROR, logger="watcher"):
            status = await run.reload(ConfigError("config x: key 'max_clients': bad"))
        assert run.daemon.settings == before
        assert "reload refused" in caplog.text
        assert status.startswith("driver 580.95.05, 1 devices in /dev")
