"""The Python side of the `cuda-checkpoint` wrapper (`watcher/criu/wrapper.sh`).

The shell front execs the real binary itself whenever it finds one on `PATH` past itself and
no device map can be needed; this module runs for the rest: a restore of a checkpoint that
holds our record (`--action restore` with `CRTOOLS_IMAGE_DIR` set), and a host where the
real binary is not on `PATH` but in the map's `driver.cuda_checkpoint` (the driver
container's root on a GPU Operator node).

Transparency: the real binary replaces this process (`execv`), so its stdout, stderr and exit
status are the caller's. Nothing is printed on the way, except one line on stderr when no
binary exists at all (exit 127, as a shell says for a missing command: CRIU's plugin logs the
line and disables itself) or when the device map a moved restore needs cannot be had.

A binary under a driver root runs on that root's own dynamic loader (`PT_INTERP` of the
binary, looked up inside the root) with `--library-path` set to the root's library
directories: the binary then gets the libc, libcuda and the rest it was shipped with, as
inside the driver container, with nothing of the host's libc mixed in. `LD_LIBRARY_PATH`
with the host's loader would load the root's libc.so.6 beside the host's ld.so, a pair that
must come from the same glibc build; a chroot would hide the host's /proc and /dev that
cuda-checkpoint works on. Where the root has no loader the binary is static or uses the
host's: it runs with `LD_LIBRARY_PATH` naming the root's directories first.

Stdlib only (the CRIU action file packs it); started by `python -I` from the shell front.
"""

from __future__ import annotations

import os
import sys

from watcher.contract import RECORD_NAME
from watcher.criu.cudacheckpoint import find_real, host_path_in_root, is_wrapper
from watcher.criu.text import say, shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

EXIT_NOT_FOUND = 127
_ELF_HEAD = 4096
_PT_INTERP = 3
_MACHINE_TRIPLETS = {
    "x86_64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "ppc64le": "powerpc64le-linux-gnu",
}


# --------------------------------------------------------------------------------------------
# Running a binary of a driver root


def elf_interpreter(path: str) -> str | None:
    """The `PT_INTERP` of a 64-bit little-endian ELF file (its dynamic loader), or None."""
    import struct  # noqa: PLC0415 (a driver root's binary only: the restore path never pays)

    try:
        with open(path, "rb") as file:
            head = file.read(_ELF_HEAD)
            if head[:6] != b"\x7fELF\x02\x01":
                return None
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            for index in range(min(phnum, 64)):
                file.seek(phoff + index * phentsize)
                entry = file.read(56)
                if len(entry) < 56:
                    return None
                kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", entry)
                if kind == _PT_INTERP and 0 < size <= 4096:
                    file.seek(offset)
                    return file.read(size).split(b"\0", 1)[0].decode("ascii", "replace")
    except (OSError, struct.error):
        return None
    return None


def _ld_so_conf(root: str, name: str, depth: int = 0) -> list[str]:
    """Directories named by the root's ld.so.conf (includes followed, globs inside root)."""
    directories: list[str] = []
    path = host_path_in_root(name, root)
    if path is None or depth > 4:
        return directories
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read(65536).splitlines()
    except OSError:
        return directories
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "include":
            # glob pulls in re, enum and more: paid only by a driver root's binary.
            import glob  # noqa: PLC0415

            for pattern in words[1:]:
                absolute = pattern if pattern.startswith("/") else f"/etc/{pattern}"
                base = os.path.abspath(root)
                for found in sorted(glob.glob(base + absolute)):
                    directories += _ld_so_conf(root, found[len(base) :], depth + 1)
        elif words[0].startswith("/"):
            directories.append(words[0])
    return directories


def library_path(root: str) -> list[str]:
    """The root's library directories, as paths of this host, those that exist."""
    triplet = _MACHINE_TRIPLETS.get(os.uname().machine, "")
    wanted = _ld_so_conf(root, "/etc/ld.so.conf")
    if triplet:
        wanted += [f"/lib/{triplet}", f"/usr/lib/{triplet}"]
    wanted += ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    directories: list[str] = []
    for directory in wanted:
        resolved = host_path_in_root(directory, root)
        if resolved and os.path.isdir(resolved) and resolved not in directories:
            directories.append(resolved)
    return directories


def command_for(binary: str, arguments: Sequence[str], driver_root: str | None) -> list[str]:
    """The argv that runs `binary` (a host path): through the driver root's loader when the
    binary lies under that root, else as it is."""
    root = os.path.abspath(driver_root) if driver_root else "/"
    if root == "/" or not binary.startswith(root + "/"):
        return [binary, *arguments]
    directories = ":".join(library_path(root))
    interpreter = elf_interpreter(binary)
    loader = host_path_in_root(interpreter, root) if interpreter else None
    if loader and os.path.isfile(loader) and os.access(loader, os.X_OK):
        return [loader, "--library-path", directories, binary, *arguments]
    if directories:
        inherited = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = f"{directories}:{inherited}" if inherited else directories
    return [binary, *arguments]


# --------------------------------------------------------------------------------------------
# The device map at restore


def _option(arguments: Sequence[str], name: str) -> str | None:
    for index, argument in enumerate(arguments[:-1]):
        if argument == name:
            return arguments[index + 1]
    return None


def _quiet_map(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """This host's map from the daemon, else a direct scan; None when neither can be had.
    Quiet: whatever the real binary prints is all the caller sees."""
    from watcher import client  # noqa: PLC0415

    path = client.socket_path(environ.get(client.SOCKET_ENV))
    try:
        reply = client.request(path, {"op": "get"}, timeout=5.0)
        device_map = reply.get("map") if isinstance(reply, dict) else None
        if isinstance(device_map, dict):
            return device_map
    except (client.Unreachable, client.ServerError, ValueError, TypeError):
        pass
    from watcher.criu.hostmap import scanned_map  # noqa: PLC0415 (without the daemon only)

    return scanned_map(environ, quiet=True)  # None in install-action's file: no scanner


def restore_device_map(
    arguments: Sequence[str], environ: Mapping[str, str], here: dict[str, Any] | None
) -> str | None:
    """`OLD=NEW,...` for `--action restore --pid P` when our record's GPUs moved, else None.

    The GPUs of the process P restores (by the record's pids); all used GPUs when the record
    does not name P (a restore into a new pid namespace, an old record).
    """
    image_dir = environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir or _option(arguments, "--device-map") is not None:
        return None
    from watcher.criu.recordfile import RecordError, load  # noqa: PLC0415

    try:
        record = load(image_dir)
    except RecordError:
        return None  # pre-restore refused or reported it already; the binary decides
    if record is None or not record.used:
        return None
    if here is None:
        say(
            f"cuda-checkpoint --action restore: no map of this host (daemon unreachable and "
            f"no scanner), so no --device-map for the checkpoint in {shown(image_dir, 400)}"
        )
        return None
    from watcher.criu.restore import verdict_for  # noqa: PLC0415

    verdict = verdict_for(record, here, environ)
    if not verdict.device_map:
        return None
    pid_text = _option(arguments, "--pid") or ""
    pid = int(pid_text) if pid_text.isdigit() else None
    mine = {
        used.gpu.uuid
        for used in record.used
        if used.gpu is not None and used.gpu.uuid and pid is not None and pid in used.pids
    }
    chosen = {old: new for old, new in verdict.device_map.items() if old in mine} or dict(
        verdict.device_map
    )
    return ",".join(f"{old}={new}" for old, new in chosen.items())


# --------------------------------------------------------------------------------------------
# The entry point


def main(wrapper: str, found: str, arguments: list[str], environ: Mapping[str, str]) -> int:
    """Exec the real cuda-checkpoint for `arguments`; returns only when there is none.

    `found`: what the shell front found on PATH past the wrapper ("" for nothing); taken as
    it is unless it is another copy of the wrapper."""
    path_env = environ.get("PATH", os.defpath)
    if found and not is_wrapper(found):
        real: str | None = found
    else:
        real = find_real(path_env, skip=wrapper, map_cuda_checkpoint=None)
    restoring = _option(arguments, "--action") == "restore" and bool(
        environ.get("CRTOOLS_IMAGE_DIR")
        and os.path.isfile(environ["CRTOOLS_IMAGE_DIR"] + "/" + RECORD_NAME)
    )
    here = _quiet_map(environ) if real is None or restoring else None
    driver = here.get("driver") if here is not None else None
    driver = driver if isinstance(driver, dict) else {}
    if real is None:
        listed = driver.get("cuda_checkpoint")
        real = find_real(
            path_env, skip=wrapper, map_cuda_checkpoint=listed if isinstance(listed, str) else None
        )
    if real is None:
        install = "install it (it ships with the NVIDIA driver, 550 and later)"
        say(
            f"no cuda-checkpoint on this host (none on PATH past {shown(wrapper)}, "
            + (
                f"and the map of this host names none): {install}"
                if here is not None
                else f"and no map of this host: the daemon is unreachable): {install}, or "
                "start the daemon if the driver root holds one"
            )
        )
        return EXIT_NOT_FOUND
    if restoring:
        device_map = restore_device_map(arguments, environ, here)
        if device_map:
            arguments = [*arguments, "--device-map", device_map]
    root = driver.get("root")
    argv = command_for(real, arguments, root if isinstance(root, str) else None)
    sys.stdout.flush()
    try:
        os.execv(argv[0], argv)  # noqa: S606 (the real binary takes this process over)
    except OSError as error:
        say(f"cannot run {shown(argv[0])}: {shown(error.strerror or error)}")
        return 126
    return EXIT_NOT_FOUND  # not reached: execv returns only by raising


def console_main() -> int:
    """`python -I -c ... WRAPPER FOUND ARGS...` as the shell front starts it."""
    if len(sys.argv) < 3:
        say("the cuda-checkpoint wrapper's Python side is started by the wrapper itself")
        return 2
    return main(sys.argv[1], sys.argv[2], sys.argv[3:], os.environ)
