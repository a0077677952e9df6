"""The record of a checkpoint as users hold it: an image directory, an unpacked archive, a tar.

`record_bytes(CHECKPOINT)` is the one question `restore-check` and `inspect` ask: the bytes of
`gpu-device-watcher.json`, None for a checkpoint taken without the action, `NotACheckpoint`
(a usage error: exit 2) for anything else, `RecordError` (`record-unreadable`) for a record
that is there but must not be read. What CHECKPOINT may be is the contract's "Checkpoint
archives": a CRIU image directory, a directory holding `checkpoint/`, or a tar file, plain or
compressed (gzip, zstd, xz, bzip2), told by its first bytes, never by its name.

An archive holds every memory page of a container, gigabytes, and may have been crafted.
So it is read as a stream of tar headers: nothing is extracted or written, the walk stops at
the record, member data is skipped (by seeking, in a plain tar on disk: the pages are never
read), and what is kept in memory is one header, one bounded extended header and the record.
Member names are only compared, never used as paths, so `../` in a name goes nowhere.

The tar format is walked here rather than by `tarfile`, which keeps every member it has seen
in a list (a tar bomb of millions of empty members would fill memory) and reads on into member
data it will not use. The CRIU action never imports this module: at pre-restore CRIU hands it
the image directory, which `recordfile` reads.
"""

from __future__ import annotations

import os
import stat

from watcher.contract import RECORD_NAME
from watcher.criu.recordfile import MAX_RECORD_BYTES, RecordError, read_bytes
from watcher.criu.text import shown
from watcher.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from io import BufferedIOBase, BufferedReader
    from typing import Any

__all__ = [
    "ARCHIVE_RECORD",
    "MAX_MEMBERS",
    "NotACheckpoint",
    "RecordSource",
    "compression_of",
    "record_bytes",
    "record_source",
]

ARCHIVE_RECORD = f"checkpoint/{RECORD_NAME}"
"""Where the engines (Podman, CRI-O, containerd, kubelet) carry the record in their archives."""
CHECKPOINT_DIR = "checkpoint"
MAX_MEMBERS = 1_000_000
"""Members walked before giving up: a container's checkpoint has thousands at most."""
MAX_EXTENDED_HEADER = 1024 * 1024
"""A pax or GNU long-name header larger than this is no engine's: refused, not read."""
_BLOCK = 512
_SKIP_CHUNK = 1024 * 1024
_INPUT_CHUNK = 128 * 1024
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)
# Tar type flags (POSIX and GNU) in words, for the message that refuses a record member.
_KINDS = {
    b"1": "a hard link",
    b"2": "a symlink",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"S": "a sparse file",
}
_REGULAR = (b"0", b"\x00", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


class NotACheckpoint(UsageError):
    """CHECKPOINT is no checkpoint this command can read: one line, exit 2."""


class DamagedArchive(NotACheckpoint):
    """The archive ends early or its compressed stream is corrupt."""


class RecordSource:
    """Where the record of one checkpoint is: `read()` its bytes (None: no record), `where`
    in words."""

    __slots__ = ("_read", "where")

    def __init__(self, read: Callable[[], bytes | None], where: str) -> None:
        self._read = read
        self.where = where

    def read(self) -> bytes | None:
        """The record's bytes, None when there is none. Raises NotACheckpoint, RecordError."""
        return self._read()


def record_source(checkpoint: str) -> RecordSource:
    """Where CHECKPOINT keeps its record. Raises NotACheckpoint (exit 2)."""
    try:
        info = os.stat(checkpoint)
    except OSError as error:
        raise NotACheckpoint(f"{_named(checkpoint)}: {error.strerror or error}") from None
    if stat.S_ISDIR(info.st_mode):
        image_dir = _image_dir(checkpoint)
        return RecordSource(lambda: read_bytes(image_dir), f"{shown(image_dir, 400)}/{RECORD_NAME}")
    if not stat.S_ISREG(info.st_mode):
        raise NotACheckpoint(
            f"{_named(checkpoint)}: not a directory nor a file; give a CRIU image directory, "
            "a directory that holds checkpoint/, or a checkpoint archive"
        )
    return RecordSource(
        lambda: _from_archive(checkpoint), f"{ARCHIVE_RECORD} in {shown(checkpoint, 400)}"
    )


def record_bytes(checkpoint: str) -> bytes | None:
    """The record's bytes in CHECKPOINT; None when it is a checkpoint without a record.

    Raises NotACheckpoint (exit 2) or RecordError (`record-unreadable`).
    """
    return record_source(checkpoint).read()


def _named(checkpoint: str) -> str:
    return f"CHECKPOINT {shown(checkpoint, 400)}"


def _image_dir(directory: str) -> str:
    """The image directory in `directory`: itself (CRIU's `inventory.img`, or our record
    alone, as a copy may hold), else the `checkpoint/` of an unpacked archive or a mounted
    checkpoint image."""
    if _exists(directory, "inventory.img") or _exists(directory, RECORD_NAME):
        return directory
    inner = os.path.join(directory, CHECKPOINT_DIR)
    try:
        inner_info = os.lstat(inner)
    except OSError:
        inner_info = None
    if inner_info is not None and stat.S_ISDIR(inner_info.st_mode):
        return inner
    raise NotACheckpoint(
        f"{_named(directory)}: neither a CRIU image directory (no inventory.img) nor a "
        "directory that holds checkpoint/"
    )


def _exists(directory: str, name: str) -> bool:
    try:
        os.lstat(os.path.join(directory, name))
    except OSError:
        return False
    return True


def compression_of(head: bytes) -> str | None:
    """ "gzip", "zstd", "xz" or "bzip2" by the first bytes; None for anything else."""
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return None


def _from_archive(path: str) -> bytes | None:
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below, whatever wraps it)
    except OSError as error:
        raise NotACheckpoint(f"{_named(path)}: {error.strerror or error}") from None
    with raw:
        try:
            head = raw.read(6)
            raw.seek(0)
        except OSError as error:
            raise NotACheckpoint(f"{_named(path)}: {error.strerror or error}") from None
        compression = compression_of(head)
        if compression is None:
            return _walk(_SeekableReader(raw), path, "tar")
        if compression == "zstd":
            return _walk(_ZstdStream(raw, _zstd(path)), path, "zstd tar")
        with _decompressing(raw, compression) as stream:
            return _walk(_StreamReader(stream), path, f"{compression} tar")


def _decompressing(raw: BufferedReader, compression: str) -> BufferedIOBase:
    # Each imported only for an archive that needs it: bz2 and lzma cost milliseconds.
    if compression == "gzip":
        import gzip  # noqa: PLC0415

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bzip2":
        import bz2  # noqa: PLC0415

        return bz2.BZ2File(raw, "rb")
    import lzma  # noqa: PLC0415

    return lzma.LZMAFile(raw, "rb")


def _zstd(path: str) -> Any:
    # A dependency of its own before Python 3.14, imported only for a zstd archive.
    try:
        from compression import zstd  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        try:
            from backports import zstd  # noqa: PLC0415
        except ImportError:
            raise NotACheckpoint(
                f"{_named(path)}: zstd-compressed, and neither compression.zstd (Python 3.14) "
                "nor backports.zstd is installed: pip install backports.zstd, or run "
                "`zstd -d` on it and give the plain tar"
            ) from None
    return zstd


def _stream_errors() -> tuple[type[BaseException], ...]:
    # What a damaged compressed stream raises, per module; a module not imported yet
    # cannot have raised.
    import sys  # noqa: PLC0415 (builtin)

    errors: list[type[BaseException]] = [OSError, EOFError]
    if (zlib := sys.modules.get("zlib")) is not None:
        errors.append(zlib.error)
    if (lzma := sys.modules.get("lzma")) is not None:
        errors.append(lzma.LZMAError)
    for name in ("compression.zstd", "backports.zstd"):
        if (zstd := sys.modules.get(name)) is not None:
            errors.append(zstd.ZstdError)
    return tuple(errors)


class _ZstdStream:
    """A zstd stream, read and skipped with bounded memory.

    `ZstdFile` feeds its decompressor 8 KiB at a time, which made reading every page of an
    archive four times slower than `zstd -dc`. Here input goes in 128 KiB at a time (larger
    reads cost more: each is a fresh buffer the allocator maps and unmaps), output is bounded
    per call by `max_length`, and skipped data is dropped as it comes, never buffered.
    Frames follow one another (`zstd -T0` writes several): a new decompressor takes each.
    """

    compression = "zstd"

    def __init__(self, raw: BufferedReader, zstd: Any) -> None:
        self._raw = raw
        self._zstd = zstd
        self._decompressor = zstd.ZstdDecompressor()
        self._output = bytearray()

    def _next(self, most: int) -> bytes | None:
        """Up to `most` more bytes (maybe none yet); None at the clean end of the stream."""
        if self._decompressor.eof:
            data = self._decompressor.unused_data or self._raw.read(_INPUT_CHUNK)
            if not data:
                return None
            self._decompressor = self._zstd.ZstdDecompressor()
        elif self._decompressor.needs_input:
            data = self._raw.read(_INPUT_CHUNK)
            if not data:
                raise EOFError("the zstd stream ends before its end mark")
        else:
            data = b""
        output: bytes = self._decompressor.decompress(data, max_length=most)
        return output

    def read(self, count: int) -> bytes:
        while len(self._output) < count:
            output = self._next(max(count - len(self._output), _INPUT_CHUNK))
            if output is None:
                break
            self._output += output
        data = bytes(self._output[:count])
        del self._output[:count]
        return data

    def skip(self, count: int) -> bool:
        buffered = min(count, len(self._output))
        del self._output[:buffered]
        count -= buffered
        while count > 0:
            output = self._next(min(count, _SKIP_CHUNK))
            if output is None:
                return False
            count -= len(output)
        return True


class _SeekableReader:
    """A plain tar on disk: headers read, member data skipped with a seek."""

    def __init__(self, file: BufferedReader) -> None:
        self._file = file
        self.size = os.fstat(file.fileno()).st_size

    def read(self, count: int) -> bytes:
        return self._file.read(count)

    def skip(self, count: int) -> bool:
        """False when the archive ends before `count` more bytes."""
        position = self._file.seek(count, os.SEEK_CUR)
        return position <= self.size


class _StreamReader:
    """A compressed tar: member data read and dropped, a chunk at a time."""

    def __init__(self, stream: BufferedIOBase) -> None:
        self._stream = stream

    def read(self, count: int) -> bytes:
        return self._stream.read(count)

    def skip(self, count: int) -> bool:
        while count > 0:
            chunk = self._stream.read(min(count, _SKIP_CHUNK))
            if not chunk:
                return False
            count -= len(chunk)
        return True


_Reader = _SeekableReader | _StreamReader | _ZstdStream


class _Header:
    __slots__ = ("name", "size", "type")

    def __init__(self, name: str, size: int, kind: bytes) -> None:
        self.name = name
        self.size = size
        self.type = kind


def _walk(reader: _Reader, path: str, what: str) -> bytes | None:
    try:
        return _walk_members(reader, path, what)
    except NotACheckpoint:
        raise
    except _stream_errors() as error:
        raise DamagedArchive(
            f"{_named(path)}: the {what} archive is damaged or truncated ({shown(error, 200)})"
        ) from None


def _walk_members(reader: _Reader, path: str, what: str) -> bytes | None:
    seen_checkpoint = False
    # Extended headers (pax `x`, GNU `L`) name the member that follows them.
    long_name: str | None = None
    pax_size: int | None = None
    for index in range(MAX_MEMBERS + 1):
        block = reader.read(_BLOCK)
        if len(block) < _BLOCK or block == bytes(_BLOCK):
            if index == 0:
                raise NotACheckpoint(_not_a_tar(path, what))
            if len(block) < _BLOCK:
                raise DamagedArchive(f"{_named(path)}: the {what} archive ends in mid-member")
            break
        if index == MAX_MEMBERS:
            raise NotACheckpoint(
                f"{_named(path)}: more than {MAX_MEMBERS} members before the end or the record; "
                "no container checkpoint has that many"
            )
        header = _parse(block)
        if header is None:
            if index == 0:
                raise NotACheckpoint(_not_a_tar(path, what))
            raise DamagedArchive(
                f"{_named(path)}: the {what} archive is damaged (a header's checksum is wrong)"
            )
        if header.type in (b"x", b"L"):
            data = _extended(reader, header, path, what)
            if header.type == b"L":
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "replace")
            else:
                long_name, pax_size = _pax(data, long_name, pax_size)
            continue
        if header.type in (b"g", b"K"):
            # A global pax header or a GNU long link name: nothing the walk needs.
            if not reader.skip(_padded(header.size)):
                raise DamagedArchive(f"{_named(path)}: the {what} archive ends in mid-member")
            continue
        name = long_name if long_name is not None else header.name
        size = pax_size if pax_size is not None else header.size
        long_name, pax_size = None, None
        member = _normalised(name)
        if member == CHECKPOINT_DIR or member.startswith(CHECKPOINT_DIR + "/"):
            seen_checkpoint = True
        if member == ARCHIVE_RECORD:
            return _record(reader, header.type, size, path, what)
        # Links, devices, directories and FIFOs carry no data whatever their size field says.
        if header.type not in _NO_DATA and not reader.skip(_padded(size)):
            raise DamagedArchive(f"{_named(path)}: the {what} archive ends in mid-member")
    if not seen_checkpoint:
        raise NotACheckpoint(
            f"{_named(path)}: a {what} archive without checkpoint/: not a container checkpoint"
        )
    return None


def _not_a_tar(path: str, what: str) -> str:
    found = (
        "neither a directory nor a tar archive"
        if what == "tar"
        else f"a {what.removesuffix(' tar')} stream that holds no tar archive"
    )
    return (
        f"{_named(path)}: not a checkpoint: {found} "
        "(give a CRIU image directory, a directory that holds checkpoint/, or the tar that "
        "kubelet, CRI-O, containerd or Podman wrote: plain, gzip, zstd, xz or bzip2)"
    )


def _normalised(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _octal(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:
        # GNU base-256, for sizes of 8 GiB and more: big-endian after the marker bit.
        if field[0] & 0x40:
            return None  # negative
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _parse(block: bytes) -> _Header | None:
    """The header in one 512-byte block; None when its checksum is wrong (not a header)."""
    checksum = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if checksum is None or checksum != unsigned:
        return None
    size = _octal(block[124:136])
    if size is None:
        return None
    name = block[:100].split(b"\x00", 1)[0]
    # The POSIX prefix field; GNU's own magic (`ustar  `) keeps other data there.
    if block[257:263] == b"ustar\x00" and (prefix := block[345:500].split(b"\x00", 1)[0]):
        name = prefix + b"/" + name
    return _Header(name.decode("utf-8", "replace"), size, block[156:157])


def _extended(reader: _Reader, header: _Header, path: str, what: str) -> bytes:
    if header.size > MAX_EXTENDED_HEADER:
        raise DamagedArchive(
            f"{_named(path)}: the {what} archive has an extended header of {header.size} bytes, "
            f"more than the {MAX_EXTENDED_HEADER} any engine writes"
        )
    data = reader.read(header.size)
    if len(data) < header.size or not reader.skip(_padded(header.size) - header.size):
        raise DamagedArchive(f"{_named(path)}: the {what} archive ends in mid-member")
    return data


def _pax(data: bytes, name: str | None, size: int | None) -> tuple[str | None, int | None]:
    """`path` and `size` of a pax extended header: `LENGTH KEY=VALUE\\n` records."""
    while data:
        length_text = data.partition(b" ")[0]
        try:
            length = int(length_text)
        except ValueError:
            return name, size
        if length <= len(length_text) or length > len(data):
            return name, size
        key, _, value = data[len(length_text) + 1 : length - 1].partition(b"=")
        if key == b"path":
            name = value.decode("utf-8", "replace")
        elif key == b"size":
            try:
                size = int(value)
            except ValueError:
                size = None
        data = data[length:]
    return name, size


def _record(reader: _Reader, kind: bytes, size: int, path: str, what: str) -> bytes:
    where = f"{ARCHIVE_RECORD} in the {what} archive"
    if kind not in _REGULAR:
        raise RecordError(
            "record-unreadable",
            f"{where} is {_KINDS.get(kind, 'not a regular file')}, not a regular file",
        )
    if size > MAX_RECORD_BYTES:
        raise RecordError(
            "record-unreadable",
            f"{where} holds {size} bytes, more than the {MAX_RECORD_BYTES} a record may have",
        )
    data = reader.read(size)
    if len(data) < size:
        raise DamagedArchive(f"{_named(path)}: the {what} archive ends inside {ARCHIVE_RECORD}")
    return data
