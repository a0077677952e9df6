"""The attacks of a compromised daemon, run in the simulated pod's daemon container with its
privileges (podsim.py starts it there): each step of the security review that made the pod
what it is, reported as `done` or the errno that refused it, one JSON line on stdout.

Standard library only: it runs inside the container, where nothing may be written (no
temporary directory for ctypes' library lookup, for one).
"""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

DRIVER_ROOT = "/run/nvidia/driver"
KUBELET_KEY = "/var/lib/kubelet/pki/kubelet-client-current.pem"
CORE_PATTERN = "/proc/sys/kernel/core_pattern"
# The victim's command line (a root process of the node with every capability), as
# /proc/PID/cmdline spells it.
VICTIM = ("sleep", "86399")


def _attempt(action: Callable[[], object]) -> str:
    """`done`, or the errno name that refused it."""
    try:
        action()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))
    return "done"


def _plant(path: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
    try:
        os.write(descriptor, b"#!/bin/sh\nexit 0\n")
    finally:
        os.close(descriptor)


def _victim_pid(proc: str) -> str | None:
    wanted = ("\0".join(VICTIM) + "\0").encode()
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            if Path(proc, name, "cmdline").read_bytes() == wanted:
                return name
        except OSError:
            continue
    return None


def _signal_victim(number: int) -> None:
    """By pid where it shares our PID namespace, else through its /proc directory (a pidfd:
    pidfd_send_signal takes an fd of /proc/PID too)."""
    for proc in ("/proc", "/host/proc"):
        if not os.path.isdir(proc) or (pid := _victim_pid(proc)) is None:
            continue
        if proc == "/proc":
            os.kill(int(pid), number)
            return
        descriptor = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            signal.pidfd_send_signal(descriptor, number)
        finally:
            os.close(descriptor)
        return
    raise ProcessLookupError(errno.ESRCH, "the victim is not visible")


def _rewrite_core_pattern() -> None:
    """Writes back what is there: write access is shown, the node's setting is unchanged."""
    path = "/host" + CORE_PATTERN
    current = Path(path).read_bytes()
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.write(descriptor, current)
    finally:
        os.close(descriptor)


def attack() -> dict[str, str]:
    return {
        "read-shadow": _attempt(lambda: Path("/host/etc/shadow").read_bytes()),
        "read-kubelet-key": _attempt(lambda: Path("/host" + KUBELET_KEY).read_bytes()),
        "write-host-run": _attempt(lambda: _plant("/host/run/planted")),
        "write-host-run-nvidia": _attempt(lambda: _plant("/host/run/nvidia/planted")),
        "plant-cuda-checkpoint": _attempt(
            lambda: _plant(f"/host{DRIVER_ROOT}/usr/bin/cuda-checkpoint")
        ),
        "stop-root-process": _attempt(lambda: _signal_victim(signal.SIGSTOP)),
        "kill-root-process": _attempt(lambda: _signal_victim(signal.SIGKILL)),
        "write-core-pattern": _attempt(_rewrite_core_pattern),
    }


if __name__ == "__main__":
    print(json.dumps(attack()), flush=True)
