"""The daemon in process: scripted event sources, a real tree, the real scanner and server.

`running_daemon(tmp_path)` starts a `watcher.daemon.Daemon` in the test's event loop with a
`ScriptedTree` and `ScriptedMounts` in place of inotify and the mount table; a test fires
them by hand (`run.tree.fire()`), waits for the generation it expects
(`await run.next_generation(g)`) and asks over the real socket (`await run.ask(...)`).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec

from tests.support.host import FakeHost
from watcher.config import ConfigError, Settings
from watcher.core.snapshot import HostView
from watcher.daemon.lifecycle import Lifecycle
from watcher.daemon.service import Daemon, EventSource, Sources
from watcher.daemon.systemd import Notifier
from watcher.server import bind_unix_socket

__all__ = ["Host", "Running", "ScriptedMounts", "ScriptedTree", "running_daemon"]

TIMEOUT = 10.0


# --- scripted sources --------------------------------------------------------------------------


class _ScriptedSource:
    """An event source a test fires by hand: `run` takes the daemon's callback, `fire`
    calls it."""

    on_change: Callable[[str], None] | None
    closed: bool
    reason = "scripted change"

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self.on_change = on_change
        task_status.started()
        await anyio.sleep_forever()

    def close(self) -> None:
        self.closed = True

    def fire(self, reason: str | None = None) -> None:
        assert self.on_change is not None
        self.on_change(reason or self.reason)


@dataclass
class ScriptedTree(_ScriptedSource):
    """Stands in for the inotify TreeWatcher: records its targets, fires when told."""

    targets: list[tuple[str, ...]] = field(default_factory=list)
    on_change: Callable[[str], None] | None = None
    closed: bool = False

    def set_targets(self, paths: Iterable[str]) -> None:
        self.targets.append(tuple(paths))


@dataclass
class ScriptedMounts(_ScriptedSource):
    """Stands in for the MountTableWatcher of one table."""

    path: str
    pollable: bool = False
    on_change: Callable[[str], None] | None = None
    closed: bool = False
    reason = "scripted mount"


# --- a host --------------------------------------------------------------------------------------


class Host(FakeHost):
    """A host tree under `base` (`tests.support.host.FakeHost`): root/dev with nodes,
    proc/devices and the driver version, an empty fake sysfs, a mount table file."""

    def __init__(self, base: Path) -> None:
        super().__init__(base / "root", base / "proc", base / "sys")
        self.base = base
        self.mkdir(self.sys)  # a fake sysfs: the machine's own GPUs stay out
        self.mkdir("/dev")
        self.proc_devices({"nvidia": 195})
        self.driver_version()
        self.mountinfo = base / "mountinfo"
        self.write_mountinfo(self.mountinfo)

    def write_mountinfo(self, path: Path) -> None:
        path.write_text(f"1 0 0:1 / {self.base} rw - tmpfs tmpfs rw\n")

    def settings(self, sock: str, **changes: Any) -> Settings:
        view = HostView(
            root=str(self.root),
            proc=str(self.proc),
            sys=str(self.sys),
            mountinfo=str(self.mountinfo),
            driver_roots=("/",),
            driver_roots_configured=True,
        )
        return replace(Settings(view=view, socket=sock, debounce_ms=0), **changes)


@dataclass
class Running:
    daemon: Daemon
    tree: ScriptedTree
    mounts: list[ScriptedMounts]
    host: Host
    socket: str
    reload_to: list[Settings | ConfigError]

    async def next_generation(self, after: int) -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            device_map = await self.daemon.state.wait_after(after)
        return json.loads(json.dumps(_builtins(device_map)))

    async def reload(self, settings: Settings | ConfigError) -> str:
        self.reload_to.append(settings)
        with anyio.fail_after(TIMEOUT):
            return await self.daemon.reload()

    def names(self) -> list[str]:
        return [device.name for device in self.daemon.state.current.devices]

    async def ask(self, request: dict[str, Any]) -> Any:
        """One request on a fresh connection, from a thread (the loop serves it)."""
        return await anyio.to_thread.run_sync(self._ask, request)

    def _ask(self, request: dict[str, Any]) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.socket)
            sock.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(sock.makefile("rb").readline())


def _builtins(value: Any) -> Any:

    return msgspec.to_builtins(value)


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    *,
    listener: socket.socket | None = None,
    uevents: EventSource | None = None,
    **changes: Any,
) -> AsyncIterator[Running]:
    host = Host(tmp_path / "host")
    host.mknod("/dev/nvidiactl", 195, 255)
    sock = str(tmp_path / "gdw.sock")

    if listener is None:
        listener = bind_unix_socket(sock)
    tree = ScriptedTree()
    mounts: list[ScriptedMounts] = []

    def mount_table(path: str) -> ScriptedMounts:
        mounts.append(ScriptedMounts(path))
        return mounts[-1]

    reload_to: list[Settings | ConfigError] = []

    def reload_settings() -> Settings:
        fresh = reload_to.pop()
        if isinstance(fresh, ConfigError):
            raise fresh
        return fresh

    daemon = Daemon(
        host.settings(sock, **changes),
        Lifecycle(Notifier(None)),
        reload_settings,
        Sources(tree=tree, mount_table=mount_table, mount_events="mountinfo", uevents=uevents),
    )
    try:
        async with anyio.create_task_group() as group:
            with anyio.fail_after(TIMEOUT):
                await group.start(partial(daemon.serve, handle_signals=False), listener)
            yield Running(daemon, tree, mounts, host, sock, reload_to)
            group.cancel_scope.cancel()
    finally:
        listener.close()
