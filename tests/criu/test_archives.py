"""`restore-check CHECKPOINT` on the checkpoints users hold: archives and unpacked ones.

One record (dumped by the real action on a simulated host, see test_restore_check.py) carried
in every form of the contract's "Checkpoint archives": the image directory, a directory that
holds `checkpoint/` (an unpacked archive), and a tar of the engines' layout, plain, gzip,
zstd, xz and bzip2, with the record first (the engines' lexical order) and last, named
`./checkpoint/...` or `checkpoint/...`, under a name that says nothing of its compression.
Every form gives the same verdict from the same target daemon. Then what is not a checkpoint
(exit 2) and a checkpoint without a record (exit 0, the contract's line).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from watcher.criu.archive import compression_of

from .simhost import SimHost
from .test_restore_check import UUID_A, UUID_C, dumped, other_minor_spec, restore_check

__all__ = ["dumped"]  # the fixture, used here by name

COMPRESSIONS = ("none", "gzip", "zstd", "xz", "bzip2")


def compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        import gzip

        return gzip.compress(data)
    if compression == "xz":
        import lzma

        return lzma.compress(data)
    if compression == "bzip2":
        import bz2

        return bz2.compress(data)
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd
    return zstd.compress(data)  # type: ignore[no-any-return]


def engine_tar(
    images: Path | None,
    *,
    record_last: bool = False,
    dot: bool = False,
    pages: int = 64 * 1024,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """A checkpoint archive as Podman and CRI-O write it: `checkpoint/` with CRIU's images
    (the record among them unless `images` is None), then the engine's own files."""
    prefix = "./" if dot else ""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(prefix + name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
                return
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        record = None if images is None else (images / "gpu-device-watcher.json").read_bytes()
        add("checkpoint", None)
        if record is not None and not record_last:
            add("checkpoint/gpu-device-watcher.json", record)
        add("checkpoint/inventory.img", b"\x00" * 40)
        add("checkpoint/pages-1.img", os.urandom(pages))
        for name, data in (extra or {}).items():
            add(name, data)
        add("config.dump", b"{}")
        add("spec.dump", b"{}")
        if record is not None and record_last:
            add("checkpoint/gpu-device-watcher.json", record)
    return buffer.getvalue()


@pytest.fixture
def target(make_host: Callable[..., SimHost]) -> SimHost:
    return make_host(other_minor_spec(), name="target")


def verdict(checkpoint: Path, target: SimHost) -> dict[str, object]:
    done = restore_check(checkpoint, "--socket", str(target.socket), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_every_form_gives_the_same_verdict(dumped: Path, target: SimHost, tmp_path: Path) -> None:
    expected = verdict(dumped, target)
    assert expected["device_map"] == {UUID_A: UUID_C}

    unpacked = tmp_path / "unpacked"
    (unpacked / "checkpoint").mkdir(parents=True)
    shutil.copy(dumped / "gpu-device-watcher.json", unpacked / "checkpoint")
    (unpacked / "config.dump").write_text("{}")
    assert verdict(unpacked, target) == expected

    for compression in COMPRESSIONS:
        for record_last in (False, True):
            for dot in (False, True):
                archive = tmp_path / f"checkpoint-{compression}-{record_last}-{dot}"
                archive.write_bytes(
                    compress(engine_tar(dumped, record_last=record_last, dot=dot), compression)
                )
                assert verdict(archive, target) == expected, archive.name

    text = restore_check(archive, "--socket", str(target.socket))
    assert text.returncode == 0
    assert text.stdout.splitlines()[0] == f"gpu-device-watcher: device map {UUID_A}={UUID_C}"


def test_a_refusal_names_the_record_in_the_archive(
    dumped: Path, make_host: Callable[..., SimHost], tmp_path: Path
) -> None:
    other_model = make_host(other_minor_spec("NVIDIA A100-SXM4-80GB"), name="a100")
    archive = tmp_path / "ck.tar.zst"
    archive.write_bytes(compress(engine_tar(dumped), "zstd"))
    done = restore_check(archive, "--socket", str(other_model.socket))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gpu-device-watcher: gpu-model: nvidia5 used")
    assert lines[-1].startswith(
        f"gpu-device-watcher: restore stopped: this host cannot take back the GPU devices "
        f"recorded in checkpoint/gpu-device-watcher.json in {archive} "
    )


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_checkpoint_without_a_record(compression: str, tmp_path: Path) -> None:
    archive = tmp_path / "checkpoint.tar"
    archive.write_bytes(compress(engine_tar(None), compression))
    done = restore_check(archive, "--socket", str(tmp_path / "nobody.sock"))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        f"gpu-device-watcher: no GPU record in {archive}: it was taken without the "
        "gpu-device-watcher action, so nothing can be checked\n"
    )
    as_json = restore_check(archive, "--format", "json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["record"] is None


def _not_a_checkpoint(tmp_path: Path) -> dict[str, bytes]:
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as archive:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"node\n"))
    return {
        "text": b"hello, this is no archive\n" * 40,
        "empty": b"",
        "short": b"\x1f",
        "gzip of text": compress(b"hello\n" * 1000, "gzip"),
        "tar without checkpoint/": other.getvalue(),
        "zstd tar without checkpoint/": compress(other.getvalue(), "zstd"),
        "zeros": bytes(10240),
    }


@pytest.mark.parametrize(
    "case",
    [
        "text",
        "empty",
        "short",
        "gzip of text",
        "tar without checkpoint/",
        "zstd tar without checkpoint/",
        "zeros",
    ],
)
def test_what_is_not_a_checkpoint_is_a_usage_error(case: str, tmp_path: Path) -> None:
    path = tmp_path / "thing"
    path.write_bytes(_not_a_checkpoint(tmp_path)[case])
    done = restore_check(path, "--socket", str(tmp_path / "nobody.sock"))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpu-device-watcher: CHECKPOINT {path}: ")


def test_compression_is_told_by_magic_bytes() -> None:
    tar = engine_tar(None)
    for compression in COMPRESSIONS:
        expected = None if compression == "none" else compression
        assert compression_of(compress(tar, compression)[:6]) == expected


def test_zstd_without_a_zstd_library_says_what_to_install(tmp_path: Path) -> None:
    archive = tmp_path / "checkpoint.tar.zst"
    archive.write_bytes(compress(engine_tar(None), "zstd"))
    # None in sys.modules makes the import fail, as on a host without the library.
    code = (
        "import sys\n"
        "sys.modules['compression'] = None; sys.modules['backports.zstd'] = None\n"
        "from watcher.cli import main\n"
        f"sys.exit(main(['restore-check', {str(archive)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout) == (2, "")
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpu-device-watcher: CHECKPOINT {archive}: zstd-compressed, and ")
    assert "pip install backports.zstd" in line
