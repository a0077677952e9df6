"""What systemd does between fork and exec, for a daemon under test, without systemd.

    python sysexec.py [--listen-fd N] [--fdname NAME] [--watchdog-pid] [--confine] -- COMMAND...

--listen-fd N    move the listening socket N to fd 3 and set LISTEN_FDS=1, LISTEN_PID=<pid>
--fdname NAME    LISTEN_FDNAMES=NAME (with --listen-fd)
--watchdog-pid   WATCHDOG_PID=<pid> (WATCHDOG_USEC comes from the environment)
--confine        the unit's restrictions that need no namespace and no seccomp filter:
                 NoNewPrivileges=yes, CapabilityBoundingSet= (empty), and
                 MemoryDenyWriteExecute=yes through PR_SET_MDWE where the kernel has it (6.3+)

Then it execs COMMAND in this very process, so <pid> above is the daemon's own, as with
systemd. Standard library only: it runs before the daemon and must not import it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
from pathlib import Path

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _prctl(option: int, argument: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(argument), 0, 0, 0) == 0:
        return 0
    return ctypes.get_errno()


def confine() -> None:
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last_cap + 1):
        # EPERM without CAP_SETPCAP: then we hold no capability to lose anyway.
        if _prctl(PR_CAPBSET_DROP, capability) not in (0, errno.EPERM, errno.EINVAL):
            raise OSError(f"cannot drop capability {capability} from the bounding set")
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError("cannot set no_new_privs")
    # EINVAL: a kernel before 6.3, where systemd enforces the same with a seccomp filter.
    if _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) not in (0, errno.EINVAL):
        raise OSError("cannot set PR_SET_MDWE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--fdname")
    parser.add_argument("--watchdog-pid", action="store_true")
    parser.add_argument("--confine", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    arguments = parser.parse_args()
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    pid = str(os.getpid())
    if arguments.listen_fd is not None:
        if arguments.listen_fd != 3:
            os.dup2(arguments.listen_fd, 3)
            os.close(arguments.listen_fd)
        os.set_inheritable(3, True)
        os.environ.update(LISTEN_PID=pid, LISTEN_FDS="1")
        if arguments.fdname:
            os.environ["LISTEN_FDNAMES"] = arguments.fdname
    if arguments.watchdog_pid:
        os.environ["WATCHDOG_PID"] = pid
    if arguments.confine:
        confine()
    sys.stdout.flush()
    os.execvp(command[0], command)  # noqa: S606


if __name__ == "__main__":
    main()
