"""The feature file on a real file system."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from tests.nsrun import run_scenario_module
from watcher.publish.nfd import remove_if_ours, write_atomically

# --- the atomic writer ---------------------------------------------------------------------


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "gpu-device-watcher"
    first = write_atomically(str(path), b"a=1\n")
    assert path.read_bytes() == b"a=1\n"
    second = write_atomically(str(path), b"a=2\nb=3\n")
    assert path.read_bytes() == b"a=2\nb=3\n"
    assert first != second
    assert os.listdir(tmp_path) == ["gpu-device-watcher"]
    # NFD's worker runs as another user: the file is readable by all, whatever the umask.
    assert (path.stat().st_mode & 0o777) == 0o644


def test_write_is_readable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomically(str(tmp_path / "f"), b"x=y\n")
    finally:
        os.umask(old)
    assert ((tmp_path / "f").stat().st_mode & 0o777) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomically(str(path), b"old=1\n")
    # A directory where the file should be: the rename fails (EISDIR) after the temporary
    # file was written in full.
    blocked = tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError, match="directory") as raised:
        write_atomically(str(blocked), b"new=1\n")
    assert raised.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert sorted(os.listdir(tmp_path)) == ["blocked", "f"]
    assert path.read_bytes() == b"old=1\n"
    with pytest.raises(FileNotFoundError):
        write_atomically(str(tmp_path / "missing" / "f"), b"x=1\n")
    assert sorted(os.listdir(tmp_path)) == ["blocked", "f"]


def test_a_reader_racing_the_writer_sees_a_whole_old_or_new_file(tmp_path: Path) -> None:
    """NFD reads the file whenever it likes: every read is one complete version."""
    path = tmp_path / "gpu-device-watcher"
    versions = [
        b"".join(b"gpu-device-watcher.label-%d=%s\n" % (n, b"v" * 50) for n in range(40)),
        b"gpu-device-watcher.checkpoint-ready=false\n",
    ]
    write_atomically(str(path), versions[0])
    done = threading.Event()
    seen: dict[bytes, int] = {}
    bad: list[bytes] = []

    def read() -> None:
        while not done.is_set():
            data = path.read_bytes()
            if data in versions:
                seen[data] = seen.get(data, 0) + 1
            else:
                bad.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(400):
            write_atomically(str(path), versions[n % 2])
    finally:
        done.set()
        reader.join(30)
    assert not bad, f"{len(bad)} torn reads, first: {bad[0][:120]!r}"
    # The race really happened: the reader saw both versions.
    assert len(seen) == 2, seen
    assert os.listdir(tmp_path) == ["gpu-device-watcher"]


def test_remove_only_our_own_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    inode = write_atomically(str(path), b"a=1\n")
    # A successor wrote its own file meanwhile: it stays.
    successor = write_atomically(str(path), b"a=2\n")
    assert not remove_if_ours(str(path), inode)
    assert path.read_bytes() == b"a=2\n"
    assert remove_if_ours(str(path), successor)
    assert not path.exists()
    assert not remove_if_ours(str(path), successor)


@pytest.mark.realfs
def test_a_full_file_system_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a tiny tmpfs in a private mount namespace")
    result = run_scenario_module("tests.publish.test_files", "full", tmp_path, timeout=60)
    assert result.returncode == 0, f"scenario failed:\n{result.stdout}{result.stderr}"
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text(), "a mount leaked"


def _scenario_full(scratch: Path) -> None:
    directory = scratch / "features.d"
    directory.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(directory).encode(), b"tmpfs", 0, b"size=16k") != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")
    path = directory / "gpu-device-watcher"
    write_atomically(str(path), b"old=1\n")
    try:
        write_atomically(str(path), b"x" * (1 << 20))
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    else:
        raise AssertionError("a 1 MiB write into a 16 KiB tmpfs succeeded")
    assert os.listdir(directory) == ["gpu-device-watcher"], os.listdir(directory)
    assert path.read_bytes() == b"old=1\n"


if __name__ == "__main__":
    _scenario, _scratch = sys.argv[1:]
    {"full": _scenario_full}[_scenario](Path(_scratch))
