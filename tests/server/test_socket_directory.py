"""The default socket lives in a directory of its own, which `serve` creates when missing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from watcher import client, config
from watcher.server import SocketSetupError, bind_unix_socket, unlink_socket

CONTRACT_SOCKET = "/run/gpu-device-watcher/gpu-device-watcher.sock"


def test_the_default_socket_is_in_its_own_directory() -> None:
    assert client.DEFAULT_SOCKET == CONTRACT_SOCKET
    assert config.DEFAULT_SOCKET == CONTRACT_SOCKET
    assert client.socket_path(None) == CONTRACT_SOCKET


def test_a_missing_directory_is_created_0755(tmp_path: Path) -> None:
    directory = tmp_path / "gpu-device-watcher"
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        sock = bind_unix_socket(str(directory / "s.sock"))
    finally:
        os.umask(old_umask)
    try:
        info = os.lstat(directory)
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o755
        assert info.st_uid == os.geteuid()
        assert stat.S_ISSOCK(os.lstat(directory / "s.sock").st_mode)
    finally:
        sock.close()
        assert unlink_socket(sock.path, sock.inode)


def test_an_existing_directory_is_used_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o750)
    directory.chmod(0o750)
    sock = bind_unix_socket(str(directory / "s.sock"))
    sock.close()
    assert unlink_socket(sock.path, sock.inode)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o750


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_anything_but_a_directory_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    directory = tmp_path / "gpu-device-watcher"
    if kind == "symlink":
        directory.symlink_to(target)
    else:
        directory.write_text("")
    with pytest.raises(SocketSetupError, match="must be a real directory"):
        bind_unix_socket(str(directory / "s.sock"))
    assert list(target.iterdir()) == []


def test_only_the_last_component_is_created(tmp_path: Path) -> None:
    with pytest.raises(SocketSetupError, match="cannot create the socket directory"):
        bind_unix_socket(str(tmp_path / "a" / "b" / "s.sock"))
    assert not (tmp_path / "a").exists()
