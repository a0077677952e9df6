"""Hostile checkpoint archives: one line, the right exit, no hang, no traceback, nothing written.

`restore-check` and `inspect` read archives that came from elsewhere (a node, an image
registry, a user). Each archive here is crafted against the walk in `watcher.criu.archive`:
a record member that is not a regular file (a symlink, a hard link, a device, a FIFO, a
directory), one larger than the record limit (with its bytes, and by a pax `size` alone),
a repeated record, names that climb out (`../`, absolute), a truncated or corrupt compressed
stream, a damaged header, oversized extended headers, and a tar bomb of many empty members.
Every case runs as the real command, with a time limit, in the plain and the zstd form where
the compression is not the point; a few run under strace, which shows that nothing on disk
is created, opened for writing, renamed, linked or removed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.criu.test_archives import compress

pytestmark = pytest.mark.reliability

TIMEOUT = 60.0
RECORD = "checkpoint/gpu-device-watcher.json"
GOOD = json.dumps({"version": 2, "map": {}, "used": []}).encode()
MiB = 1024 * 1024


def build(*members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directory = tarfile.TarInfo("checkpoint")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for member in members:
            if isinstance(member, tuple):
                info, data = member
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(member)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 5
    return info


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return member(name), data


def run(
    command: str, path: Path, *, traced: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # An empty config: the machine's own must not change the answers.
    config = path.parent / "config.toml"
    config.touch()
    prefix: list[str] = []
    if traced is not None:
        prefix = ["strace", "-f", "-qq", "-o", str(traced), "-e", "trace=%file,%desc"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "watcher", command, str(path)],
        env=dict(
            os.environ,
            PYTHONDONTWRITEBYTECODE="1",
            GPU_DEVICE_WATCHER_SOCKET=str(path.parent / "nobody.sock"),
            GPU_DEVICE_WATCHER_CONFIG=str(config),
        ),
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line the command said (stdout or stderr), never a traceback."""
    said = (done.stdout + done.stderr).splitlines()
    assert "Traceback" not in done.stderr
    assert len(said) == 1, said
    assert said[0].startswith("gpu-device-watcher: ")
    return said[0]


def refused_as_unreadable(path: Path) -> str:
    done = run("restore-check", path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("gpu-device-watcher: record-unreadable: ")
    assert "Traceback" not in done.stderr
    inspected = run("inspect", path)
    assert inspected.returncode == 1
    return one_line(inspected)


NOT_REGULAR = {
    "symlink": (member(RECORD, tarfile.SYMTYPE, "/dev/zero"), "a symlink"),
    "hard link": (member(RECORD, tarfile.LNKTYPE, "checkpoint/pages-1.img"), "a hard link"),
    "character device": (member(RECORD, tarfile.CHRTYPE), "a character device"),
    "block device": (member(RECORD, tarfile.BLKTYPE), "a block device"),
    "FIFO": (member(RECORD, tarfile.FIFOTYPE), "a FIFO"),
    "directory": (member(RECORD, tarfile.DIRTYPE), "a directory"),
}


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("kind", sorted(NOT_REGULAR))
def test_a_record_that_is_not_a_regular_file(
    kind: str, compression: str, tmp_path: Path, record: Callable[..., None]
) -> None:
    info, words = NOT_REGULAR[kind]
    path = tmp_path / "checkpoint.tar"
    path.write_bytes(
        compress(build(regular("checkpoint/pages-1.img", b"x" * 100), info), compression)
    )
    line = refused_as_unreadable(path)
    assert f"is {words}, not a regular file" in line
    record(f"archive record member is a {kind} ({compression})", 1, 0)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_record_over_the_limit(
    compression: str, tmp_path: Path, record: Callable[..., None]
) -> None:
    path = tmp_path / "checkpoint.tar"
    path.write_bytes(compress(build(regular(RECORD, b" " * (16 * MiB + 1))), compression))
    assert "more than the 16777216 a record may have" in refused_as_unreadable(path)
    record(f"archive record member of 16 MiB + 1 ({compression})", 1, 0)


def test_a_record_whose_pax_size_says_a_terabyte(tmp_path: Path) -> None:
    # The pax `size` wins over the header's; the member's bytes are never there.
    info = member(RECORD)
    info.pax_headers = {"size": str(1 << 40)}
    data = build((info, b"{}"))
    path = tmp_path / "checkpoint.tar"
    path.write_bytes(data)
    assert f"holds {1 << 40} bytes" in refused_as_unreadable(path)


def test_a_repeated_record_the_first_decides(tmp_path: Path) -> None:
    # Engines write the record once; the walk stops at the first, whatever follows it.
    first_bad = tmp_path / "bad-first.tar"
    first_bad.write_bytes(
        build(member(RECORD, tarfile.SYMTYPE, "/etc/shadow"), regular(RECORD, GOOD))
    )
    assert "is a symlink" in refused_as_unreadable(first_bad)
    first_good = tmp_path / "good-first.tar"
    first_good.write_bytes(build(regular(RECORD, GOOD), member(RECORD, tarfile.SYMTYPE, "/x")))
    done = run("restore-check", first_good)
    assert done.returncode == 0
    assert "an empty 'used' in its record" in one_line(done)


TRAVERSAL = [
    "../checkpoint/gpu-device-watcher.json",
    "/checkpoint/gpu-device-watcher.json",
    "checkpoint/../gpu-device-watcher.json",
    "checkpoint/../../../../tmp/gpu-device-watcher.json",
    "./../gpu-device-watcher.json",
]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_names_that_climb_out_are_not_the_record_and_nothing_is_written(
    compression: str, tmp_path: Path, record: Callable[..., None]
) -> None:
    archive_dir = tmp_path / "in"
    archive_dir.mkdir()
    path = archive_dir / "checkpoint.tar"
    path.write_bytes(compress(build(*(regular(name, GOOD) for name in TRAVERSAL)), compression))
    (archive_dir / "config.toml").touch()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    log = tmp_path / "strace.log"
    done = run("restore-check", path, traced=log)
    assert done.returncode == 0
    assert "no GPU record in" in one_line(done)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == sorted([*before, str(log)])
    assert not Path("/tmp/gpu-device-watcher.json").exists()
    assert writes(log) == []
    record(f"archive member names climbing out ({compression})", len(TRAVERSAL), 0)


def writes(log: Path) -> list[str]:
    """System calls in an strace log that would change something on disk."""
    changing = []
    for line in log.read_text().splitlines():
        call = line.split(" ", 1)[1] if " " in line else line
        opens_to_write = call.startswith(("open", "creat")) and any(
            flag in call for flag in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
        )
        changes_a_name = call.startswith(
            ("mkdir", "rename", "unlink", "rmdir", "link", "symlink", "mknod", "truncate")
        )
        writes_a_file = call.startswith(("write(", "pwrite", "ftruncate")) and not call.startswith(
            ("write(1,", "write(2,")
        )
        if opens_to_write or changes_a_name or writes_a_file:
            changing.append(call)
    return changing


def _damaged(compression: str, how: str) -> bytes:
    # Compressible pages: the flipped bytes fall in coded data, not in a stored block whose
    # damage only the stream's final checksum (which the walk, stopping at the record, does
    # not reach) could tell.
    pages = b"".join(b"page %08d of a container's memory\n" % index for index in range(20_000))
    data = compress(
        build(regular("checkpoint/pages-1.img", pages), regular(RECORD, GOOD)), compression
    )
    if how == "truncated":
        return data[: len(data) // 2]
    # Flip bytes just after the magic, in the first block's coding: the walk cannot reach the
    # record. (Damage inside page data that still decodes goes unseen until the stream's
    # final checksum, which a walk that stops at an intact record never reads; its answer is
    # then the intact record's.)
    return data[:12] + bytes(b ^ 0x5A for b in data[12:76]) + data[76:]


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz", "bzip2"])
def test_a_damaged_compressed_stream(
    compression: str, how: str, tmp_path: Path, record: Callable[..., None]
) -> None:
    path = tmp_path / "checkpoint.tar"
    path.write_bytes(_damaged(compression, how))
    for command in ("restore-check", "inspect"):
        done = run(command, path)
        assert done.returncode == 2, done.stdout + done.stderr
        line = one_line(done)
        assert line.startswith(f"gpu-device-watcher: CHECKPOINT {path}: ")
        assert "damaged" in line or "truncated" in line or "ends" in line
    record(f"{how} {compression} stream", 1, 0)


def test_a_plain_tar_cut_short_or_with_a_bad_header(tmp_path: Path) -> None:
    data = build(regular("checkpoint/pages-1.img", b"p" * 100_000), regular(RECORD, GOOD))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:50_000])
    assert "ends in mid-member" in one_line(run("restore-check", cut))
    bad = bytearray(data)
    # The record's header: after the directory, the pax header pair is absent (short names),
    # so it follows the pages' header and data.
    offset = 512 + 512 + 100_352
    bad[offset : offset + 8] = b"XXXXXXXX"
    damaged = tmp_path / "bad.tar"
    damaged.write_bytes(bytes(bad))
    done = run("restore-check", damaged)
    assert done.returncode == 2
    assert "a header's checksum is wrong" in one_line(done)


def test_oversized_extended_headers(tmp_path: Path) -> None:
    info = member("checkpoint/" + "n" * (2 * MiB))
    path = tmp_path / "long.tar"
    path.write_bytes(build((info, b"x")))
    done = run("restore-check", path)
    assert done.returncode == 2
    assert "an extended header of" in one_line(done)


def peak_rss_kib(command: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `command` from a fresh interpreter that reports its child's peak RSS alone."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(done.returncode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    *said, peak = done.stderr.splitlines()
    done.stderr = "\n".join(said) + ("\n" if said else "")
    return done, int(peak)


def test_a_tar_bomb_of_many_empty_members(tmp_path: Path, record: Callable[..., None]) -> None:
    count = 200_000
    header = tarfile.TarInfo
    blocks = io.BytesIO()
    for index in range(count):
        info = header(f"checkpoint/{index:07d}.img")
        blocks.write(info.tobuf(tarfile.USTAR_FORMAT))
    blocks.write(bytes(1024))
    path = tmp_path / "bomb.tar.zst"
    path.write_bytes(compress(blocks.getvalue(), "zstd"))
    done, peak = peak_rss_kib(
        [sys.executable, "-m", "watcher", "restore-check", str(path), "--socket", "/nonexistent"]
    )
    assert done.returncode == 0, done.stderr
    assert "no GPU record in" in one_line(done)
    assert peak < 64 * 1024, f"peak RSS {peak} KiB"
    record("tar bomb: empty members before the end (zstd)", count, 0, peak_rss_kib=peak)
