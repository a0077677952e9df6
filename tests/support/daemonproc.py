"""The real daemon as a child process, driven the same way by the suites and the benchmarks.

`DaemonProcess` starts `gpu-device-watcher serve` (in a namespace, through a command prefix,
or as is), collects its log and sd_notify datagrams in a reader thread, and answers over its
socket: `wait_ready`, `wait_log`, `request`, `wait_map`, `subscribe`, `stop`. Every wait is
bounded and woken by the thing it waits for (a datagram, a log line, a reply, an exit).
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.maps import Map
from tests.support.processes import child_env
from watcher import client

__all__ = ["TIMEOUT", "DaemonProcess", "HarnessError", "Subscription"]

TIMEOUT = 10.0


class HarnessError(RuntimeError):
    pass


class DaemonProcess:
    """One `gpu-device-watcher serve` process, started by `command` (with a prefix such as
    `nsenter -t PID -m --` or none): its log (stderr) and sd_notify datagrams collected by a
    reader thread, its socket asked through the lean client."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        socket_path: str | Path,
        notify_path: Path,
        env: Mapping[str, str] | None = None,
        notify_mode: int | None = None,
    ) -> None:
        """`notify_mode`: the notify socket's mode, for a daemon run as another user."""
        self.socket = str(socket_path)
        self.logs: list[str] = []
        self.notifications: list[str] = []
        self.exited = False
        self._reader_error: BaseException | None = None
        self._changed = threading.Condition()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        if notify_mode is not None:
            notify_path.chmod(notify_mode)
        environment = child_env(env, drop=(client.SOCKET_ENV,))
        environment["NOTIFY_SOCKET"] = str(notify_path)
        self.command = list(command)
        # Under nsenter, which joins the namespace and execs: this pid is the daemon's own.
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=environment,
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name=f"daemon-{self.pid}", daemon=True)
        self._reader.start()

    # -- the reader thread -----------------------------------------------------------------

    def _read(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        partial = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(stderr.fileno(), selectors.EVENT_READ, "log")
                selector.register(self._notify, selectors.EVENT_READ, "notify")
                while True:
                    for key, _ in selector.select():
                        if key.data == "notify":
                            datagram = self._notify.recv(4096).decode(errors="replace")
                            with self._changed:
                                self.notifications.extend(datagram.splitlines())
                                self._changed.notify_all()
                            continue
                        chunk = os.read(stderr.fileno(), 65536)
                        if not chunk:
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

    def _wait_for(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: condition() or self.exited, timeout):
                raise AssertionError(f"no {what} within {timeout:g} s; log:\n{self.log_text}")
            if not condition():
                raise AssertionError(
                    f"the daemon exited (rc {self.process.wait(TIMEOUT)}) before {what};"
                    f" log:\n{self.log_text}"
                )

    @property
    def log_text(self) -> str:
        return "\n".join(self.logs)

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        self._wait_for(lambda: "READY=1" in self.notifications, "READY=1", timeout)

    def wait_log(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """The first log line that `pattern` (a regex) matches, waiting for it if need be."""
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

    def close(self) -> None:
        if self.process.poll() is None:
            self.stop()
        self._reader.join(TIMEOUT)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self._notify.close()
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
