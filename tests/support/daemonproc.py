"""The real daemon as a child process, driven the same way by every suite and the benchmarks.

`DaemonProcess` starts `gpu-device-watcher serve` (in a namespace, through a command prefix,
or as is), collects its log and sd_notify datagrams in a reader thread, and answers over its
socket: `wait_ready`, `wait_log`, `request`, `wait_map`, `subscribe`, `stop`. Every wait is
bounded and woken by the thing it waits for (a datagram, a log line, a reply, an exit).

Options for the suites that need them: the log in a file (`log_path`: it survives a SIGKILL
of the daemon or of the test, and a restart appends to it), the journal's stream identity
(`journal`: JOURNAL_STREAM names that file, as systemd names the stream it connects), no
notify socket of its own (`notify=False`: the test is the service manager), the exact
environment (`environment`), inherited fds (`pass_fds`), and death with its parent
(`die_with_parent`).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.support.maps import Map
from tests.support.processes import child_env
from tests.support.processes import die_with_parent as _die_with_parent
from watcher import client

__all__ = ["TIMEOUT", "DaemonProcess", "HarnessError", "Notifications", "Subscription"]

TIMEOUT = 10.0


class HarnessError(RuntimeError):
    pass


class Notifications(list[str]):
    """The sd_notify lines received so far, in order; `wait_for` takes them datagram by
    datagram."""

    def __init__(self, owner: DaemonProcess) -> None:
        super().__init__()
        self._owner = owner
        # (arrival time, lines) of each datagram; `_taken` of them were handed to `wait_for`.
        self.datagrams: list[tuple[float, list[str]]] = []
        self._taken = 0

    def wait_for(self, field: str, pid: int | None = None, timeout: float = TIMEOUT) -> float:
        """The arrival time of the next datagram (after the last one this returned) carrying
        `field=`. `pid` is accepted for the older callers; the daemon is this one's."""
        del pid
        owner = self._owner

        def arrived() -> bool:
            for index in range(self._taken, len(self.datagrams)):
                if any(line.split("=", 1)[0] == field for line in self.datagrams[index][1]):
                    self._taken = index + 1
                    return True
            self._taken = len(self.datagrams)
            return False

        owner._wait_for(arrived, f"{field}=", timeout)
        return self.datagrams[self._taken - 1][0]

    def close(self) -> None:
        self._owner.close_notify()


class DaemonProcess:
    """One `gpu-device-watcher serve` process, started by `command` (with a prefix such as
    `nsenter -t PID -m --` or none): its log and sd_notify datagrams collected by a reader
    thread, its socket asked through the lean client."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        socket_path: str | Path | None = None,
        notify_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        notify: bool = True,
        log_path: Path | None = None,
        journal: bool = False,
        environment: Mapping[str, str] | None = None,
        drop: Sequence[str] = (client.SOCKET_ENV,),
        pass_fds: Sequence[int] = (),
        cwd: str | Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`env`: added to the test's environment (less the systemd variables and `drop`);
        `environment`: the child's whole environment instead. `notify_path`: where the notify
        socket is bound (default: an abstract address of its own)."""
        self.socket = str(socket_path) if socket_path is not None else ""
        self.log_path = log_path
        self.logs: list[str] = []
        self.notifications = Notifications(self)
        self.exited = False
        self._reader_error: BaseException | None = None
        self._changed = threading.Condition()
        base = child_env(env, drop=drop) if environment is None else dict(environment)
        self._notify: socket.socket | None = None
        if notify:
            address = str(notify_path or f"@gdw-daemon-{uuid.uuid4().hex}")
            self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify.bind("\0" + address[1:] if address.startswith("@") else address)
            base["NOTIFY_SOCKET"] = address
        self._log: IO[bytes] | None = None
        if log_path is not None:
            self._log = log_path.open("ab")
            if journal:
                # systemd names the stream it connected to stderr: "<st_dev>:<st_ino>".
                info = os.fstat(self._log.fileno())
                base["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        elif journal:
            raise ValueError("journal needs log_path: the stream is the log file")
        self.command = list(command)
        self.started = time.monotonic()
        # Under nsenter, which joins the namespace and execs: this pid is the daemon's own.
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log if self._log is not None else subprocess.PIPE,
            env=base,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
            preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509 (a prctl)
        )
        self.pid = self.process.pid
        self._pidfd = os.pidfd_open(self.pid)
        self._reader = threading.Thread(target=self._read, name=f"daemon-{self.pid}", daemon=True)
        self._reader.start()

    # -- the reader thread -----------------------------------------------------------------

    def _read(self) -> None:
        stderr = self.process.stderr
        partial = b""
        try:
            with selectors.DefaultSelector() as selector:
                if stderr is not None:
                    selector.register(stderr.fileno(), selectors.EVENT_READ, "log")
                else:
                    # The log goes to a file: the exit itself is the end.
                    selector.register(self._pidfd, selectors.EVENT_READ, "exit")
                if self._notify is not None:
                    selector.register(self._notify, selectors.EVENT_READ, "notify")
                while True:
                    for key, _ in selector.select():
                        if key.data == "notify":
                            self._received(key.fileobj)  # type: ignore[arg-type]
                            continue
                        if key.data == "exit":
                            self._drain()
                            return
                        assert stderr is not None
                        chunk = os.read(stderr.fileno(), 65536)
                        if not chunk:
                            self._drain()
                            return
                        partial += chunk
                        *complete, partial = partial.split(b"\n")
                        with self._changed:
                            self.logs.extend(line.decode(errors="replace") for line in complete)
                            self._changed.notify_all()
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            self._reader_error = error
        finally:
            with self._changed:
                if partial:
                    self.logs.append(partial.decode(errors="replace"))
                self.exited = True
                self._changed.notify_all()

    def _received(self, notify: socket.socket) -> None:
        datagram = notify.recv(65536).decode(errors="replace")
        lines = datagram.splitlines()
        with self._changed:
            self.notifications.datagrams.append((time.monotonic(), lines))
            self.notifications.extend(lines)
            self._changed.notify_all()

    def _drain(self) -> None:
        """The datagrams sent just before the exit, still queued."""
        if self._notify is None:
            return
        with selectors.DefaultSelector() as probe:
            probe.register(self._notify, selectors.EVENT_READ)
            while probe.select(0):
                self._received(self._notify)

    def _wait_for(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        met = False

        def done() -> bool:
            nonlocal met
            met = condition()  # asked once per wake-up: a condition may take what it found
            return met or self.exited

        with self._changed:
            if not self._changed.wait_for(done, timeout):
                raise AssertionError(f"no {what} within {timeout:g} s; log:\n{self.log_text}")
            if not met:
                if self._reader_error is not None:
                    raise HarnessError("the log reader failed") from self._reader_error
                raise AssertionError(
                    f"the daemon exited (rc {self.process.wait(TIMEOUT)}) before {what};"
                    f" log:\n{self.log_text}"
                )

    @property
    def log_text(self) -> str:
        if self.log_path is not None:
            try:
                return self.log_path.read_text(errors="replace")
            except OSError:
                return ""
        return "\n".join(self.logs)

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        self._wait_for(lambda: "READY=1" in self.notifications, "READY=1", timeout)

    def wait_log(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The first log line that `pattern` (a regex) matches, waiting for it if need be."""
        if self.log_path is not None:
            raise HarnessError("wait_log reads the log from a pipe; this one goes to a file")
        compiled = re.compile(pattern)
        self._wait_for(
            lambda: any(compiled.search(line) for line in self.logs),
            f"log line {pattern!r}",
            timeout,
        )
        return next(line for line in self.logs if compiled.search(line))

    # -- the socket ------------------------------------------------------------------------

    def request(self, payload: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        return client.request(self.socket, payload, timeout)

    def get(self) -> dict[str, Any]:
        return self.request({"op": "get"})

    def wait_map(self, predicate: Callable[[Map], bool], timeout: float = TIMEOUT) -> Map:
        """The first map (from now on) that satisfies `predicate`, woken by `wait` replies."""
        deadline = time.monotonic() + timeout
        reply = self.get()
        while not predicate(reply["map"]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such map within {timeout:g} s; last: {reply['map']}")
            try:
                reply = self.request(
                    {"op": "wait", "after": reply["generation"], "timeout": remaining},
                    timeout=remaining + TIMEOUT,
                )
            except client.ServerError as error:
                if error.code != "timeout":
                    raise
        result: Map = reply["map"]
        return result

    def subscribe(self) -> Subscription:
        return Subscription(self.socket)

    # -- stopping --------------------------------------------------------------------------

    def send_signal(self, number: int) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, number)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        return returncode

    def stop(self, number: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.send_signal(signal.SIGCONT)
        self.send_signal(number)
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.wait_exit(timeout)
            raise AssertionError(
                f"the daemon ignored signal {number}; log:\n{self.log_text}"
            ) from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would end it."""
        self.process.kill()
        self.wait_exit()

    def close_notify(self) -> None:
        if self._notify is None:
            return
        if self.process.poll() is not None:
            # The reader drains what the daemon sent before its exit: let it finish first.
            self._reader.join(TIMEOUT)
        self._notify.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.stop()
        self._reader.join(TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self._log is not None:
            self._log.close()
        self.close_notify()
        os.close(self._pidfd)
        if self._reader_error is not None:
            raise HarnessError("the log reader failed") from self._reader_error


class Subscription:
    """A `subscribe` stream; each line is checked to be the next generation, none skipped."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.connection = client.Connection(socket_path, timeout=timeout)
        self.connection.send({"op": "subscribe"})
        self.first = self.connection.receive()
        self.generation: int = self.first["generation"]
        self.map: Map = self.first["map"]

    def next(self) -> dict[str, Any]:
        """The next change line (bounded by the connection's timeout)."""
        try:
            reply = self.connection.receive()
        except client.Unreachable as error:
            raise AssertionError(
                f"no change line after generation {self.generation}: {error}"
            ) from None
        assert reply["generation"] == self.generation + 1, (self.generation, reply)
        self.generation = reply["generation"]
        self.map = reply["map"]
        return reply

    def until(
        self, predicate: Callable[[Map], bool], timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """Change lines up to the first whose map satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not seen or not predicate(seen[-1]["map"]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no such map within {timeout:g} s; got {seen}")
            seen.append(self.next())
        return seen

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
