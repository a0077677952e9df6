"""What `doctor` reads of a host, and the few tools it runs there: the gathering side.

Everything the checks decide on is gathered here, through one `HostTree`, so that the checks
themselves are pure. Nothing here writes: files are opened read-only, directories listed,
links resolved inside the root (as for a process chrooted into it).

Running the host's tools (`criu --version`, `runc --version`, `cuda-checkpoint -h`, ...):
with `--root /` they are this host's own tools, run as an operator would run them. Under
another root the tree may be anything (a node's `/` mounted into the DaemonSet's pod, or a
tree someone else wrote), and running a file of it is running its owner's code as us. So a
tool under another root is run only when it and every directory from the root down to it are
owned by root and writable by nobody else (the rule `config_file_problem` applies to the
config): then only root could have put it there, and root on that host can run anything
anyway. A dynamically linked tool of another root is started through that root's own
program interpreter (its ELF `PT_INTERP`, e.g. `/host/lib64/ld-linux-x86-64.so.2`) with that
root's library directories, so it runs with the node's libraries, not the pod's (held to the
same rule). Every run: no shell, the argument list fixed here, a clean environment (a fixed
`PATH`, `LC_ALL=C`), stdin from /dev/null, a timeout, the output cut at 64 KiB. A tool that
is not run, or fails to run (a binary for the node's libraries will not start with the pod's),
leaves its facts unknown, and the check that needs them says `skip` and why.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from dataclasses import dataclass

from watcher.probe import resolve_in

__all__ = ["DEFAULT_PATH", "SERVICE_PATH", "HostTree", "ToolOutput", "elf_interpreter"]

# root's PATH on a Debian, Ubuntu or RHEL host, for `criu` typed at a root shell.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# systemd's PATH for a service that sets none (systemd.exec(5), "Environment variables in
# spawned processes"): what containerd and CRI-O, and the CRIU they start, search.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
TOOL_TIMEOUT_S = 5.0
_OUTPUT_LIMIT = 64 * 1024
_READ_LIMIT = 1024 * 1024
# Where a root's shared libraries are (Debian's multiarch, then RHEL's, then the plain ones).
_LIBRARY_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
_PT_INTERP = 3


def elf_interpreter(head: bytes) -> str | None:
    """The program interpreter a 64-bit little-endian ELF names (PT_INTERP), or None."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for index in range(phnum):
        start = phoff + index * phentsize
        if start + 0x28 > len(head):
            return None
        (kind,) = struct.unpack_from("<I", head, start)
        if kind == _PT_INTERP:
            (offset,) = struct.unpack_from("<Q", head, start + 8)
            (size,) = struct.unpack_from("<Q", head, start + 0x20)
            if offset + size > len(head) or size > 4096:
                return None
            return head[offset : offset + size].split(b"\0", 1)[0].decode("utf-8", "replace")
    return None


@dataclass(frozen=True)
class ToolOutput:
    """stdout and stderr of one run, or why there is none (`text` None)."""

    text: str | None
    why: str | None = None
    returncode: int | None = None


class HostTree:
    """The host as seen under `root`; every path given or returned is a host path."""

    def __init__(self, root: str = "/") -> None:
        self.root = os.path.realpath(root)

    @property
    def is_own_root(self) -> bool:
        return self.root == "/"

    def fs(self, host_path: str) -> str:
        """Where a host path is visible to this process."""
        if self.is_own_root:
            return host_path
        return self.root + host_path if host_path != "/" else self.root

    def resolve(self, host_path: str) -> str | None:
        """The real host path of `host_path` (links resolved inside the root), or None."""
        relative = resolve_in(self.root, host_path, rooted=True)
        return None if relative is None else "/" + relative

    def exists(self, host_path: str) -> bool:
        return self.resolve(host_path) is not None

    def is_file(self, host_path: str) -> bool:
        real = self.resolve(host_path)
        try:
            return real is not None and stat.S_ISREG(os.stat(self.fs(real)).st_mode)
        except OSError:
            return False

    def is_executable(self, host_path: str) -> bool:
        real = self.resolve(host_path)
        if real is None:
            return False
        try:
            info = os.stat(self.fs(real))
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)

    def read_text(self, host_path: str, limit: int = _READ_LIMIT) -> tuple[str | None, str | None]:
        """(text, None) or (None, why): a missing file, a directory, no permission."""
        real = self.resolve(host_path)
        if real is None:
            return None, "no such file"
        try:
            fd = os.open(self.fs(real), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            return None, error.strerror or str(error)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, "not a regular file"
            chunks = []
            left = limit
            while left > 0 and (chunk := os.read(fd, min(left, 1024 * 1024))):
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
        except OSError as error:
            return None, error.strerror or str(error)
        finally:
            os.close(fd)
        return data.decode("utf-8", "replace"), None

    def read_bytes(self, host_path: str, limit: int = 64 * 1024 * 1024) -> bytes | None:
        """The first `limit` bytes of a regular file (links resolved inside the root), or
        None; never blocks (a FIFO in the file's place is refused, not opened for reading)."""
        real = self.resolve(host_path)
        if real is None:
            return None
        try:
            fd = os.open(self.fs(real), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks = []
            while limit > 0 and (chunk := os.read(fd, min(limit, 1024 * 1024))):
                chunks.append(chunk)
                limit -= len(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def listdir(self, host_path: str) -> list[str]:
        real = self.resolve(host_path)
        if real is None:
            return []
        try:
            return sorted(os.listdir(self.fs(real)))
        except OSError:
            return []

    def which(self, name: str, path_env: str) -> str | None:
        """The first executable `name` on `path_env` (execvp's search), as a host path."""
        for directory in path_env.split(":"):
            if not directory.startswith("/"):
                continue  # a relative entry depends on the caller's directory: not a host path
            candidate = directory.rstrip("/") + "/" + name
            if self.is_executable(candidate):
                return candidate
        return None

    def untrusted(self, host_path: str) -> str | None:
        """Why a file under another root must not be run, or None (see the module's doc)."""
        if self.is_own_root:
            return None
        real = self.resolve(host_path)
        if real is None:
            return "not found"
        parts = [part for part in real.split("/") if part]
        for depth in range(len(parts) + 1):
            where = "/" + "/".join(parts[:depth])
            try:
                info = os.lstat(self.fs(where))
            except OSError as error:
                return f"{where}: {error.strerror or error}"
            mode = stat.S_IMODE(info.st_mode)
            if info.st_uid != 0:
                return f"{where} is owned by uid {info.st_uid}, not root"
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                return f"{where} is writable by others (mode {mode:04o})"
        return None

    def run(self, host_path: str, *arguments: str) -> ToolOutput:
        """Run a tool of the host (see the module's doc for when and how)."""
        real = self.resolve(host_path)
        if real is None:
            return ToolOutput(None, f"{host_path}: not found")
        refused = self.untrusted(real)
        if refused is not None:
            return ToolOutput(None, f"not run under --root {self.root}: {refused}")
        command = [self.fs(real), *arguments]
        if not self.is_own_root:
            interpreter = elf_interpreter(self.read_bytes(real, 64 * 1024) or b"")
            if interpreter is not None:
                loader = self.resolve(interpreter)
                refused = "not found" if loader is None else self.untrusted(loader)
                if loader is None or refused is not None:
                    why = f"its interpreter {interpreter}: {refused}"
                    return ToolOutput(None, f"not run under --root {self.root}: {why}")
                libraries = ":".join(self.fs(d) for d in _LIBRARY_DIRS if self.resolve(d) == d)
                command = [self.fs(loader), "--library-path", libraries, *command]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env={"PATH": DEFAULT_PATH, "LC_ALL": "C"},
                timeout=TOOL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return ToolOutput(None, f"{host_path} {' '.join(arguments)}: no answer in 5 s")
        except OSError as error:
            return ToolOutput(None, f"cannot run {host_path}: {error.strerror or error}")
        output = (done.stdout + done.stderr)[:_OUTPUT_LIMIT].decode("utf-8", "replace")
        return ToolOutput(output, None, done.returncode)
