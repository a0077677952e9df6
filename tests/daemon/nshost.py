"""The namespace host: a small process that owns a private mount namespace and changes it.

Started by `harness.Namespace` as `unshare --mount --propagation private python nshost.py W`.
It mounts a tmpfs on the work directory W (so nothing it writes outlives it), then executes
one JSON command per line from stdin and answers one JSON line per command on stdout, after
the change is done. The daemon under test runs in the same namespace (`nsenter -t PID -m`),
so it sees exactly these mounts in its own /proc/self/mountinfo.

Standard library only (it is run by path, before anything else is imported); every path it
receives is a path as this process sees it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import sys
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def umount(target: str, lazy: bool) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH if lazy else 0), f"umount {target}")


def _write(path: str, text: str, atomic: bool) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not atomic:
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.rename(temporary, path)


def _storm(directory: str, pairs: int) -> None:
    """Two inotify events per pair (IN_CREATE, IN_DELETE), as fast as the kernel takes them."""
    for index in range(pairs):
        path = os.path.join(directory, f"s{index}")
        os.symlink("x", path)
        os.unlink(path)


def execute(command: dict[str, Any]) -> Any:
    op = command["op"]
    path = command.get("path", "")
    if op == "tmpfs":
        os.makedirs(path, exist_ok=True)
        mount(command.get("source", "tmpfs"), path, "tmpfs", 0, command.get("options", ""))
    elif op == "bind":
        mount(command["source"], path, None, MS_BIND)
    elif op == "move":
        mount(command["source"], path, None, MS_MOVE)
    elif op == "umount":
        umount(path, command.get("lazy", True))
    elif op == "mkdir":
        os.makedirs(path, exist_ok=True)
    elif op == "mknod":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = command.get("mode", 0o666)
        kind = stat.S_IFBLK if command.get("block") else stat.S_IFCHR
        # The umask is 0 here: the node appears with its final mode in one step, so a rescan
        # never sees it half made.
        os.mknod(path, kind | mode, os.makedev(command["major"], command["minor"]))
    elif op == "chmod":
        os.chmod(path, command["mode"])
    elif op == "rename":
        os.rename(command["source"], path)
    elif op == "unlink":
        os.unlink(path)
    elif op == "symlink":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(command["target"], path)
    elif op == "write":
        _write(path, command["text"], command.get("atomic", False))
    elif op == "storm":
        _storm(path, command["pairs"])
    else:
        raise ValueError(f"unknown op {op!r}")
    return None


def main() -> int:
    workdir = sys.argv[1]
    os.umask(0)
    # unshare(1) made every mount private already; a tmpfs of our own holds all we write.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("gdw-test", workdir, "tmpfs", 0, "mode=755")
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            result = execute(json.loads(line))
        except Exception as error:  # noqa: BLE001 (reported to the test, which raises)
            print(
                json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True
            )
        else:
            print(json.dumps({"ok": True, "result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
