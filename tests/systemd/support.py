"""Helpers for the systemd tests: a small simulated host, the daemon as a process, and the
service manager's end of NOTIFY_SOCKET.

Every wait is bounded and woken by what it waits for (a datagram, a reply line, an exit).
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import hostfiles, processes
from tests.support.daemonproc import DaemonProcess
from tests.support.host import FakeHost
from tests.support.hostfiles import proc_devices_text  # noqa: F401 (re-exported)
from tests.support.processes import REPO
from watcher.contract import SOCKET_ENV

UNITS = REPO / "systemd"
HERE = Path(__file__).resolve().parent
SYSEXEC = HERE / "sysexec.py"
TIMEOUT = 10.0

VERSION = "580.95.05"
BUS_ID = "0000:3b:00.0"
NODES = {"nvidiactl": (195, 255), "nvidia0": (195, 0)}


def daemon_command() -> list[str]:
    """The installed console script, as systemd runs it (or `python -m watcher`)."""
    script = Path(sys.executable).with_name("gpu-device-watcher")
    return [str(script)] if script.exists() else [sys.executable, "-m", "watcher"]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything systemd-ish that would leak into the child."""
    return processes.child_env(extra, drop=(SOCKET_ENV,))


# --- a simulated host (tests.support.host) ----------------------------------------------


def write_proc(proc: Path) -> None:
    """A fake <proc>: the driver loaded, one H200 at minor 0."""
    FakeHost(proc.parent / "root", proc).nvidia_proc({"nvidia": 195}, ((BUS_ID, 0),), VERSION)


def mknod(path: Path, major: int, minor: int) -> None:
    # 0600: nothing but root could open these even if a driver answered on the numbers.
    hostfiles.mknod(path, major, minor, 0o600)


@dataclass(frozen=True)
class Host:
    root: Path
    proc: Path

    def view_args(self) -> list[str]:
        return ["--root", str(self.root), "--proc", str(self.proc)]


def build_host(base: Path, dev_roots: Iterable[str] = ("/dev", "/alt/dev")) -> Host:
    """A host tree under `base` (no mounts): NVIDIA nodes in each of `dev_roots`."""
    host = FakeHost.under(base)
    for dev_root in dev_roots:
        try:
            host.nodes(dev_root, NODES, 0o600)
        except PermissionError:
            pytest.skip("mknod needs root (CAP_MKNOD) to build a simulated host")
    host.mkdir("/run/nvidia/validations")
    write_proc(host.proc)
    return Host(host.root, host.proc)


# --- the manager's end of NOTIFY_SOCKET -------------------------------------------------

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]
    pid: int
    at: float

    def __repr__(self) -> str:
        return f"<{self.pid} +{self.at:.3f} {self.fields}>"


@dataclass
class NotifyListener:
    """A datagram socket on an abstract address (NOTIFY_SOCKET=@...), like systemd's.

    SO_PASSCRED attaches the sender's pid to every datagram, as systemd reads it to apply
    NotifyAccess=main.
    """

    address: str = field(default_factory=lambda: f"@gdw-test-{uuid.uuid4().hex}")
    received: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind("\0" + self.address[1:])
        self._started = time.monotonic()

    def close(self) -> None:
        self._sock.close()

    def now(self) -> float:
        """The clock of `Message.at`."""
        return time.monotonic() - self._started

    def next(self, timeout: float = TIMEOUT) -> Message | None:
        ready, _, _ = select.select([self._sock], [], [], max(timeout, 0))
        if not ready:
            return None
        data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = -1
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        text = data.decode()
        assert text.endswith("\n"), f"a datagram ends with a newline: {text!r}"
        lines = text.splitlines()
        fields = dict(line.split("=", 1) for line in lines)
        assert len(fields) == len(lines), f"one assignment per line: {text!r}"
        message = Message(fields, pid, self.now())
        self.received.append(message)
        return message

    def until(
        self, predicate: Callable[[Message], bool], what: str, timeout: float = TIMEOUT
    ) -> Message:
        """The next datagram satisfying `predicate`; the ones before it are kept in `received`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(deadline - time.monotonic())
            if message is None:
                raise AssertionError(f"no {what} within {timeout:g} s; got {self.received}")
            if predicate(message):
                return message

    def until_field(self, key: str, what: str | None = None, timeout: float = TIMEOUT) -> Message:
        return self.until(lambda message: key in message.fields, what or key, timeout)

    def quiet_for(self, key: str, seconds: float) -> list[Message]:
        """Everything received during `seconds`; asserts that none of it carries `key`."""
        deadline = time.monotonic() + seconds
        seen = []
        while (message := self.next(deadline - time.monotonic())) is not None:
            seen.append(message)
        assert not [m for m in seen if key in m.fields], f"{key} during {seconds:g} s: {seen}"
        return seen

    def events(self, keys: Sequence[str] = ("READY", "RELOADING", "STOPPING")) -> list[str]:
        """The state changes received so far, in order, e.g. ["READY", "RELOADING", ...]."""
        return [key for message in self.received for key in keys if key in message.fields]


# --- the daemon as a process -----------------------------------------------------------


class Daemon(DaemonProcess):
    """`gpu-device-watcher serve` (`tests.support.daemonproc.DaemonProcess`), its stderr in a
    file (the journal stream when asked); the test is the service manager, NOTIFY_SOCKET is
    its own."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        journal: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> None:
        super().__init__(
            argv,
            notify=False,
            log_path=log_path,
            journal=journal,
            environment=child_env() if env is None else env,
            pass_fds=pass_fds,
        )
        self.argv = self.command

    def log(self) -> str:
        return self.log_text

    def signal(self, number: int) -> None:
        assert self.process.poll() is None, f"the daemon exited; log:\n{self.log()}"
        os.kill(self.pid, number)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not exit; log:\n{self.log()}") from None

    def stop(self, timeout: float = TIMEOUT) -> int:  # type: ignore[override]
        return super().stop(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        super().close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def without_traceback(text: str) -> None:
    assert "Traceback" not in text, text


JOURNAL_LINE = re.compile(r"<[0-7]>\S")


def passes_fd(sock: socket.socket) -> list[str]:
    """sysexec arguments that hand `sock` to the daemon as LISTEN_FDS does."""
    return ["--listen-fd", str(sock.fileno()), "--fdname", "gpu-device-watcher"]
