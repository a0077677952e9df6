"""watcher.criu.cudacheckpoint: which cuda-checkpoint a PATH leads to, and which real one the
wrapper runs, on real files (links, FIFOs, a --root prefix)."""

from __future__ import annotations

import os
from pathlib import Path

from watcher.criu.cudacheckpoint import (
    MARKER_WINDOW,
    WRAPPER_MARKER,
    find_real,
    host_path_in_root,
    is_wrapper,
    resolve_on_path,
)

WRAPPER = f"#!/bin/sh\n# {WRAPPER_MARKER}\nexit 0\n"
REAL = "#!/bin/sh\necho real\n"


def _file(path: Path, text: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_is_wrapper_reads_the_marker_only_in_regular_files(tmp_path: Path) -> None:
    assert is_wrapper(_file(tmp_path / "w", WRAPPER))
    assert not is_wrapper(_file(tmp_path / "r", REAL))
    # The marker past the window is not looked for: a real binary is never read through.
    assert not is_wrapper(_file(tmp_path / "far", "#!/bin/sh\n" + "#" * MARKER_WINDOW + WRAPPER))
    # Not a script: the marker in data does not make a wrapper.
    assert not is_wrapper(_file(tmp_path / "data", f"\x7fELF {WRAPPER_MARKER}"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert not is_wrapper(fifo)  # and it returned: no open() blocked on the FIFO
    assert not is_wrapper(tmp_path)
    assert not is_wrapper(tmp_path / "absent")
    (tmp_path / "link").symlink_to(tmp_path / "w")
    assert is_wrapper(tmp_path / "link")


def test_resolve_on_path_is_execvp_order(tmp_path: Path) -> None:
    _file(tmp_path / "a" / "cuda-checkpoint", REAL, mode=0o644)  # not executable: skipped
    (tmp_path / "b" / "cuda-checkpoint").mkdir(parents=True)  # a directory: skipped
    _file(tmp_path / "c" / "cuda-checkpoint", REAL)
    _file(tmp_path / "d" / "cuda-checkpoint", REAL)
    path_env = ":".join(str(tmp_path / name) for name in "abcd")
    assert resolve_on_path(path_env) == str(tmp_path / "c" / "cuda-checkpoint")
    assert resolve_on_path(str(tmp_path / "a")) is None


def test_resolve_on_path_under_a_root_resolves_links_inside_it(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _file(root / "opt/cuda/bin/cuda-checkpoint", REAL)
    (root / "usr/local/bin").mkdir(parents=True)
    # An absolute link means the host's /opt, that is root/opt, never this machine's /opt.
    (root / "usr/local/bin/cuda-checkpoint").symlink_to("/opt/cuda/bin/cuda-checkpoint")
    assert resolve_on_path("/usr/local/bin", root=str(root)) == "/usr/local/bin/cuda-checkpoint"
    assert host_path_in_root("/usr/local/bin/cuda-checkpoint", str(root)) == str(
        root / "opt/cuda/bin/cuda-checkpoint"
    )
    # ".." stops at root, relative entries mean nothing under another root.
    assert host_path_in_root("/../../opt/cuda", str(root)) == str(root / "opt/cuda")
    assert resolve_on_path("relative:", root=str(root)) is None
    (root / "loop").symlink_to("/loop")
    assert host_path_in_root("/loop/x", str(root)) is None


def test_find_real_skips_itself_and_every_wrapper(tmp_path: Path) -> None:
    own = _file(tmp_path / "venv/bin/cuda-checkpoint", WRAPPER)
    copy = _file(tmp_path / "action/cuda-checkpoint", WRAPPER)
    real = _file(tmp_path / "usr/bin/cuda-checkpoint", REAL)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked/cuda-checkpoint").symlink_to(own)
    path_env = ":".join(
        str(directory) for directory in (tmp_path / "linked", own.parent, copy.parent, real.parent)
    )
    assert find_real(path_env, skip=str(own), map_cuda_checkpoint=None) == str(real)
    assert find_real(str(own.parent), skip=str(own), map_cuda_checkpoint=None) is None
    # Nothing on PATH: the map's binary, unless it is a wrapper or not executable.
    driver = _file(tmp_path / "driver/usr/bin/cuda-checkpoint", REAL)
    assert find_real(str(own.parent), skip=str(own), map_cuda_checkpoint=str(driver)) == str(driver)
    assert find_real(str(own.parent), skip=str(own), map_cuda_checkpoint=str(copy)) is None
    driver.chmod(0o644)
    assert find_real(str(own.parent), skip=str(own), map_cuda_checkpoint=str(driver)) is None
    assert find_real("", skip=None, map_cuda_checkpoint="relative/cuda-checkpoint") is None


def test_find_real_under_a_root(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _file(root / "usr/local/bin/cuda-checkpoint", WRAPPER)
    _file(root / "run/nvidia/driver/usr/bin/cuda-checkpoint", REAL)
    assert (
        find_real(
            "/usr/local/bin:/usr/bin",
            skip="/usr/local/bin/cuda-checkpoint",
            map_cuda_checkpoint="/run/nvidia/driver/usr/bin/cuda-checkpoint",
            root=str(root),
        )
        == "/run/nvidia/driver/usr/bin/cuda-checkpoint"
    )
    assert is_wrapper("/usr/local/bin/cuda-checkpoint", root=str(root))
