"""Read one snapshot of the host for `watcher.core.scan.build_map`.

All filesystem access of a scan lives here. Nodes are examined with lstat through a
directory fd reached without following symlinks, so a planted symlink is reported as what
it is and never followed, and a listing and its lstat results refer to the same directory.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from watcher.contract import utc_timestamp
from watcher.core.devices import NVIDIA, Family
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import MountTable, PathFilter, parse_mountinfo
from watcher.core.procfs import GpuInformation, parse_gpu_information
from watcher.core.scan import (
    DevRootListing,
    FileType,
    HostSnapshot,
    HostView,
    NodeEntry,
    build_map,
    candidates_for,
    cuda_checkpoint_candidates,
)

__all__ = ["MountCache", "list_dev_root", "open_dir_nofollow", "read_host", "read_text", "scan"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "error")
    return f"{name}: {error.strerror}" if error.strerror else name


def read_text(path: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, why) — a missing or unreadable file is data, not a crash."""
    try:
        # newline="\n": no universal-newline translation, a "\r" in a mount point stays one.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as file:
            return file.read(), None
    except OSError as error:
        return None, _describe(error)


@contextmanager
def open_dir_nofollow(path: str, base: str = "/") -> Iterator[int]:
    """Open the directory `path` below `base`, refusing a symlink at any component of `path`.

    `base` (the view's own root) is opened normally (an operator may point --root through a
    link); everything under it is walked one component at a time with O_NOFOLLOW.
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for component in path.split("/"):
            if not component:
                continue
            next_fd = os.open(component, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _file_type(mode: int) -> FileType:
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _entries(dir_fd: int, prefix: str, family: Family) -> Iterator[NodeEntry]:
    with os.scandir(dir_fd) as listing:
        for item in listing:
            name = prefix + item.name
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed between listing and lstat: it simply is not there
            file_type = _file_type(info.st_mode)
            if file_type == "dir" and not prefix and item.name in family.subdirs:
                try:
                    sub_fd = os.open(item.name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError:
                    continue
                try:
                    yield from _entries(sub_fd, item.name + "/", family)
                finally:
                    os.close(sub_fd)
                continue
            if family.match(name) is None:
                continue
            target = None
            if file_type == "symlink":
                try:
                    target = os.readlink(item.name, dir_fd=dir_fd)
                except OSError:
                    target = "?"
            rdev = info.st_rdev if file_type in ("char", "block") else 0
            yield NodeEntry(
                name=name,
                file_type=file_type,
                major=os.major(rdev),
                minor=os.minor(rdev),
                mode=stat.S_IMODE(info.st_mode),
                link_target=target,
            )


def list_dev_root(view: HostView, dev_root: str, family: Family = NVIDIA) -> DevRootListing:
    try:
        with open_dir_nofollow(dev_root, base=view.root) as fd:
            entries = sorted(_entries(fd, "", family), key=lambda entry: entry.name)
    except FileNotFoundError:
        return DevRootListing(dev_root, exists=False)
    except OSError as error:
        # ELOOP/ENOTDIR: a symlink or file where a directory should be; EACCES: unreadable.
        return DevRootListing(dev_root, exists=False, error=_describe(error))
    return DevRootListing(dev_root, exists=True, entries=tuple(entries))


def _gpu_information(view: HostView, family: Family) -> list[GpuInformation]:
    gpus_dir = posixpath.join(view.proc, family.proc_gpus)
    try:
        bus_dirs = sorted(os.listdir(gpus_dir))
    except OSError:
        return []
    found = []
    for bus_dir in bus_dirs:
        text, _ = read_text(posixpath.join(gpus_dir, bus_dir, "information"))
        if text is not None:
            found.append(parse_gpu_information(text, bus_dir))
    return found


@dataclass(slots=True)
class MountCache:
    """The last filtered mount table, reused by rescans that no mount change can have moved.

    Reading /proc/self/mountinfo costs ~25 ms of kernel time at 10,000 mounts whatever the
    filter, and most rescans (a node appeared, driver-ready was written) follow no mount
    change at all. The daemon calls `invalidate()` for every mount change that may matter;
    a table is reused only if it was read under the current epoch and for the same paths,
    so a change that lands while a scan reads the table makes the next scan read it again.
    """

    epoch: int = 0
    # Reads only the mounts a scan needs (statmount: a few syscalls instead of the whole
    # table), set by the daemon where the kernel allows; None: the whole table is read.
    reader: Callable[[PathFilter], MountTable] | None = None
    _key: tuple[str, tuple[str, ...]] | None = None
    _table: MountTable | None = None
    _table_epoch: int = -1

    def invalidate(self) -> None:
        # Called on the event loop while a scan may run in a worker thread: an int bump is
        # atomic under the GIL, and the scan compares epochs only.
        self.epoch += 1

    def lookup(self, key: tuple[str, tuple[str, ...]]) -> MountTable | None:
        if self._table is not None and self._key == key and self._table_epoch == self.epoch:
            return self._table
        return None

    def store(self, key: tuple[str, tuple[str, ...]], table: MountTable, epoch: int) -> None:
        self._key, self._table, self._table_epoch = key, table, epoch


def read_host(
    view: HostView, family: Family = NVIDIA, *, mount_cache: MountCache | None = None
) -> HostSnapshot:
    proc_devices, proc_devices_error = read_text(posixpath.join(view.proc, "devices"))
    version_text, _ = read_text(posixpath.join(view.proc, family.proc_version))
    driver_ready, _ = read_text(view.fs_path(posixpath.join(view.validations_dir, "driver-ready")))
    candidates = candidates_for(view, driver_ready, family)
    dev_roots = [candidate.dev_root for candidate in candidates]
    if "/dev" not in dev_roots:
        dev_roots.append("/dev")  # always looked at: `not-in-dev` is about /dev
    relevant = PathFilter(view.table_path(dev_root) for dev_root in dev_roots)
    key = (view.mountinfo, relevant.paths)
    mounts = mount_cache.lookup(key) if mount_cache is not None else None
    mounts_error = None
    if mounts is None:
        # The epoch before the read: a change during the read makes this table stale.
        epoch = mount_cache.epoch if mount_cache is not None else 0
        mounts = _read_targeted(mount_cache.reader, relevant) if mount_cache is not None else None
        if mounts is None:
            mountinfo_text, mounts_error = read_text(view.mountinfo)
            mounts = (
                parse_mountinfo(mountinfo_text, relevant)
                if mountinfo_text is not None
                else MountTable([])
            )
        if mount_cache is not None and mounts_error is None:
            mount_cache.store(key, mounts, epoch)
    existing = {
        candidate.driver_root
        for candidate in candidates
        if os.path.isdir(view.fs_path(candidate.driver_root))
    }
    return HostSnapshot(
        proc_devices=proc_devices,
        proc_devices_error=proc_devices_error,
        driver_version_text=version_text,
        gpu_information=_gpu_information(view, family),
        mounts=mounts,
        mounts_error=mounts_error,
        driver_ready=driver_ready,
        candidates=candidates,
        listings={dev_root: list_dev_root(view, dev_root, family) for dev_root in dev_roots},
        driver_roots_existing=existing,
        cuda_checkpoints=frozenset(
            path
            for path in cuda_checkpoint_candidates(candidates)
            if _is_executable(view.fs_path(path))
        ),
    )


def _read_targeted(
    reader: Callable[[PathFilter], MountTable] | None, relevant: PathFilter
) -> MountTable | None:
    if reader is None:
        return None
    try:
        return reader(relevant)
    except OSError:
        # A mount went away mid-read, or the calls failed: the whole table answers.
        return None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def scan(view: HostView, *, generation: int = 0, family: Family = NVIDIA) -> DeviceMap:
    """One consistent scan of the host."""
    return build_map(
        view, read_host(view, family), generation=generation, updated=utc_timestamp(), family=family
    )
