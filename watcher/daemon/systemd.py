"""sd_notify(3) and sd_listen_fds(3), written against the protocols (stdlib only, no libsystemd)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from types import TracebackType

__all__ = [
    "ActivatedSocket",
    "Notifier",
    "NotifyError",
    "listen_fds",
    "watchdog_interval",
]

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class NotifyError(OSError):
    """A notification could not be delivered to the service manager."""


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; every method is a no-op when it is unset."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address is None:
            return
        if not address.startswith(("/", "@")):
            raise ValueError(f"NOTIFY_SOCKET={address!r}: expected an absolute path or @abstract")
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Sends happen on the event loop: a manager that stops reading must cost us an
        # EAGAIN, never a stalled loop (a full datagram queue blocks a blocking sender).
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str | None = None, /, **fields: str | int) -> None:
        lines = [] if message is None else [message.rstrip("\n")]
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                # A newline would smuggle a second assignment into the datagram.
                raise ValueError(f"sd_notify {key}= value contains a newline: {text!r}")
            lines.append(f"{key}={text}")
        if self._sock is None:
            return
        payload = ("\n".join(lines) + "\n").encode()
        try:
            # sendto per datagram, not connect(): a re-executed manager rebinds the path.
            self._sock.sendto(payload, self._target)
        except OSError as exc:
            raise NotifyError(
                exc.errno, f"sd_notify to NOTIFY_SOCKET={self.address}: {exc.strerror}"
            ) from exc

    def ready(self) -> None:
        self.notify(READY=1)

    def status(self, text: str) -> None:
        self.notify(STATUS=" ".join(text.splitlines()))

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def reloading(self) -> None:
        # Type=notify-reload requires both in one datagram; the manager uses the timestamp
        # to tell this reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> None:
        self.notify(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _int_var(environ: Mapping[str, str], key: str) -> int:
    try:
        value = int(environ[key])
    except ValueError:
        raise ValueError(f"{key}={environ[key]!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{key}={value} is negative")
    return value


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of WATCHDOG_USEC), or None when not asked."""
    if "WATCHDOG_USEC" not in environ:
        return None
    if "WATCHDOG_PID" in environ and _int_var(environ, "WATCHDOG_PID") != os.getpid():
        # Meant for the process we were forked from, not for us.
        return None
    usec = _int_var(environ, "WATCHDOG_USEC")
    if usec == 0:
        raise ValueError("WATCHDOG_USEC=0: the watchdog timeout must be positive")
    return usec / 2_000_000


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    name: str
    socket: socket.socket


def _enum_name(value: int) -> str:
    # An unknown family or type comes back from the socket module as a bare int.
    return getattr(value, "name", str(value))


def _adopt(fd: int, name: str) -> ActivatedSocket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"LISTEN_FDS fd {fd} ({name}): not a socket: {exc.strerror}") from None
    kind = (sock.family, sock.type, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    if kind != (socket.AF_UNIX, socket.SOCK_STREAM, 1):
        # Leave the descriptor as we found it: the caller owns the decision to close it.
        sock.detach()
        raise ValueError(
            f"LISTEN_FDS fd {fd} ({name}): expected a listening AF_UNIX SOCK_STREAM socket, "
            f"got {_enum_name(kind[0])} {_enum_name(kind[1])} listening={bool(kind[2])}"
        )
    # Ours alone: a helper we spawn must not keep the listener alive after we exit.
    sock.set_inheritable(False)
    return ActivatedSocket(name, sock)


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, unset: bool = True
) -> list[ActivatedSocket]:
    """The sockets systemd passed us (sd_listen_fds_with_names), in fd order."""
    try:
        if "LISTEN_PID" not in environ or _int_var(environ, "LISTEN_PID") != os.getpid():
            return []
        count = _int_var(environ, "LISTEN_FDS") if "LISTEN_FDS" in environ else 0
        if count == 0:
            return []
        names = environ.get("LISTEN_FDNAMES")
        name_list = names.split(":") if names is not None else ["unknown"] * count
        if len(name_list) != count:
            raise ValueError(f"LISTEN_FDNAMES={names!r} names {len(name_list)} fds, not {count}")
    finally:
        # Like libsystemd, unset on every path: a child must never adopt our descriptors.
        if unset:
            for key in _LISTEN_VARS:
                environ.pop(key, None)
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    adopted: list[ActivatedSocket] = []
    try:
        for fd, name in zip(fds, name_list, strict=True):
            adopted.append(_adopt(fd, name))
    except ValueError:
        for item in adopted:
            item.socket.detach()
        raise
    return adopted
