"""Read one snapshot of the host for `watcher.core.scan.build_map`.

All filesystem access of a scan lives here. Nodes are examined with lstat through a
directory fd reached without following symlinks, so a planted symlink is reported as what
it is and never followed, and a listing and its lstat results refer to the same directory.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from watcher.contract import file_kind, utc_timestamp
from watcher.core.devices import FAMILIES, KFD_TOPOLOGY_NODES, Family, parse_kfd_properties
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import MountTable, PathFilter, parse_mountinfo
from watcher.core.procfs import GpuInformation, parse_gpu_information
from watcher.core.scan import build_map
from watcher.core.snapshot import (
    Candidate,
    DevRootListing,
    DrmNode,
    FileType,
    HostSnapshot,
    HostView,
    KfdNode,
    NodeEntry,
    candidates_for,
    cuda_checkpoint_candidates,
    dev_root_of,
    scan_paths,
)

__all__ = [
    "HOST_FILE_LIMIT",
    "MOUNT_TABLE_LIMIT",
    "MountCache",
    "UnreadableFile",
    "list_dev_root",
    "open_dir_nofollow",
    "read_file",
    "read_host",
    "read_kfd_topology",
    "read_sys_drm",
    "read_text",
    "resolve_in",
    "scan",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# Files a scan reads from the host are untrusted (driver-ready is written by a driver
# container; --proc and --sys may be stand-ins): a FIFO must not block the scan, a link to
# /dev/zero or a file of hundreds of MB must not exhaust memory. Kernel-made /proc and /sys
# files are regular files, so the same rules cost them nothing.
HOST_FILE_LIMIT = 4 * 1024 * 1024
# The mount table of 100,000 mounts is ~10 MB; more than this is not a mount table.
MOUNT_TABLE_LIMIT = 64 * 1024 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1024 * 1024


class UnreadableFile(OSError):
    """A host file refused before or while reading it: not a regular file, or too large."""


def read_file(path: str, *, limit: int = HOST_FILE_LIMIT, follow: bool = False) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them.

    The last component is not followed unless `follow` (an operator-named path, such as
    --mountinfo, may be a link): a link there is ELOOP. O_NONBLOCK makes opening a FIFO
    return at once (and a file under a lease answer EWOULDBLOCK rather than wait for the
    lease to break); what was opened must be a regular file. Raises OSError (FileNotFoundError
    when absent, UnreadableFile when refused).
    """
    fd = os.open(path, _FILE_FLAGS if follow else _FILE_FLAGS | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(errno.EINVAL, f"{file_kind(mode)}, not a regular file")
        chunks: list[bytes] = []
        total = 0
        # One byte past the limit tells "exactly the limit" from "more"; /proc files report
        # size 0, so the size is only ever known by reading.
        while chunk := os.read(fd, min(_CHUNK, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UnreadableFile(errno.EFBIG, f"larger than {limit} bytes")
    finally:
        os.close(fd)
    return b"".join(chunks)


def _describe(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "error")
    return f"{name}: {error.strerror}" if error.strerror else name


def read_text(
    path: str, *, limit: int = HOST_FILE_LIMIT, follow: bool = False
) -> tuple[str | None, str | None]:
    """(text, None) or (None, why): a missing or refused file is data, not a crash."""
    try:
        data = read_file(path, limit=limit, follow=follow)
    except UnreadableFile as error:
        return None, str(error.strerror)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow:
            return None, "a symlink (not followed)"
        return None, _describe(error)
    # Bytes kept as they are (surrogateescape), and no newline translation: a "\r" in a
    # mount point stays one.
    return data.decode("utf-8", "surrogateescape"), None


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


def _entries(dir_fd: int, prefix: str, families: tuple[Family, ...]) -> Iterator[NodeEntry]:
    with os.scandir(dir_fd) as listing:
        for item in listing:
            name = prefix + item.name
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed between listing and lstat: it simply is not there
            file_type = _file_type(info.st_mode)
            if (
                file_type == "dir"
                and not prefix
                and any(item.name in family.subdirs for family in families)
            ):
                try:
                    sub_fd = os.open(item.name, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError:
                    continue
                try:
                    yield from _entries(sub_fd, item.name + "/", families)
                finally:
                    os.close(sub_fd)
                continue
            if all(family.match(name) is None for family in families):
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


def list_dev_root(
    view: HostView, dev_root: str, families: tuple[Family, ...] = FAMILIES
) -> DevRootListing:
    """Every entry of a dev root (and of the families' subdirectories) that one of the
    families can own; the scanner sorts them out by family."""
    try:
        with open_dir_nofollow(dev_root, base=view.root) as fd:
            entries = sorted(_entries(fd, "", families), key=lambda entry: entry.name)
    except FileNotFoundError:
        return DevRootListing(dev_root, exists=False)
    except OSError as error:
        # ELOOP/ENOTDIR: a symlink or file where a directory should be; EACCES: unreadable.
        return DevRootListing(dev_root, exists=False, error=_describe(error))
    return DevRootListing(dev_root, exists=True, entries=tuple(entries))


def _gpu_information(view: HostView, families: tuple[Family, ...]) -> list[GpuInformation]:
    family = next((family for family in families if family.gpus_from == "proc"), None)
    if family is None:
        return []
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
    view: HostView,
    families: tuple[Family, ...] = FAMILIES,
    *,
    mount_cache: MountCache | None = None,
) -> HostSnapshot:
    # The driver roots, driver-ready and version are those of the family whose dev root
    # is chosen among driver roots (NVIDIA); the others have a fixed one (AMD: /dev).
    rooted = next((family for family in families if family.fixed_dev_root is None), families[0])
    proc_devices, proc_devices_error = read_text(posixpath.join(view.proc, "devices"))
    version_text = (
        read_text(posixpath.join(view.proc, rooted.proc_version))[0]
        if rooted.proc_version is not None
        else None
    )
    driver_ready, driver_ready_error = read_text(
        view.fs_path(posixpath.join(view.validations_dir, "driver-ready"))
    )
    if driver_ready_error is not None and driver_ready_error.startswith(("ENOENT", "ENOTDIR")):
        driver_ready_error = None  # no GPU Operator here: nothing to say
    candidates = _with_real_parents(view, candidates_for(view, driver_ready, rooted))
    paths = scan_paths(view, candidates, families)
    relevant = paths.listed_mounts(view)
    key = (view.mountinfo, relevant.paths)
    mounts = mount_cache.lookup(key) if mount_cache is not None else None
    mounts_error = None
    if mounts is None:
        # The epoch before the read: a change during the read makes this table stale.
        epoch = mount_cache.epoch if mount_cache is not None else 0
        mounts = _read_targeted(mount_cache.reader, relevant) if mount_cache is not None else None
        if mounts is None:
            mountinfo_text, mounts_error = read_text(
                view.mountinfo, limit=MOUNT_TABLE_LIMIT, follow=True
            )
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
    sys_drm = read_sys_drm(view.sys) if any(f.gpus_from == "sys" for f in families) else ()
    return HostSnapshot(
        proc_devices=proc_devices,
        proc_devices_error=proc_devices_error,
        driver_version_text=version_text,
        gpu_information=_gpu_information(view, families),
        mounts=mounts,
        mounts_error=mounts_error,
        driver_ready=driver_ready,
        driver_ready_error=driver_ready_error,
        candidates=candidates,
        listings={
            dev_root: list_dev_root(view, dev_root, families) for dev_root in paths.dev_roots
        },
        paths=paths,
        driver_roots_existing=existing,
        cuda_checkpoints=frozenset(
            path for path in cuda_checkpoint_candidates(candidates) if _is_executable(view, path)
        ),
        sys_drm=sys_drm,
        kfd_nodes=read_kfd_topology(view.sys) if _partitions_listed(sys_drm, families) else (),
    )


def _with_real_parents(view: HostView, candidates: list[Candidate]) -> list[Candidate]:
    """The candidates with the links among their roots' ancestors resolved, duplicates of
    an earlier candidate dropped.

    `/var/run` -> `/run` is how many hosts spell /run: a driver root configured as
    `/var/run/<vendor>/driver` must find the nodes under `/run/<vendor>/driver/dev`, and
    attribute them to the mounts the table lists there (mount points are real paths). The
    driver root and its `dev` themselves are still never followed (`list_dev_root` refuses a
    link there, and says so).
    """
    found: list[Candidate] = []
    for candidate in candidates:
        dev_base = posixpath.dirname(candidate.dev_root)
        real = replace(
            candidate,
            driver_root=_real_parents(view, candidate.driver_root),
            dev_root=dev_root_of(_real_parents(view, dev_base)),
        )
        if all(other.dev_root != real.dev_root for other in found):
            found.append(real)
    return found


def _real_parents(view: HostView, host_path: str) -> str:
    """`host_path` with its parent directories' symlinks resolved inside the host view, its
    last component kept; unchanged when a parent cannot be resolved (missing, a loop)."""
    parent, name = posixpath.split(host_path)
    if not name:
        return host_path
    resolved = _resolve_host_path(view, parent)
    return posixpath.join(resolved, name) if resolved is not None else host_path


def _resolve_host_path(view: HostView, host_path: str) -> str | None:
    """The real host path of `host_path`, every symlink resolved inside the host view (an
    absolute link from the host's root: under `--root /host`, `/var/run -> /run` means the
    host's /run); None when a component is missing or links loop."""
    real = resolve_in(view.root, host_path, rooted=True)
    return None if real is None else "/" + real


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


# As the kernel's own limit on symlinks followed in one lookup.
_MAX_LINKS = 40


def _is_executable(view: HostView, host_path: str) -> bool:
    """A regular file with an execute bit, symlinks followed inside the host view: under
    `--root /host` an absolute link such as `/usr/bin/cuda-checkpoint ->
    /opt/cuda/bin/cuda-checkpoint` means the host's /opt, not this container's (which
    os.path.isfile would look at)."""
    real = _resolve_host_path(view, host_path)
    if real is None:
        return False
    try:
        info = os.lstat(view.fs_path(real))
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def scan(
    view: HostView, *, generation: int = 0, families: tuple[Family, ...] = FAMILIES
) -> DeviceMap:
    """One consistent scan of the host."""
    return build_map(
        view,
        read_host(view, families),
        generation=generation,
        updated=utc_timestamp(),
        families=families,
    )


# --------------------------------------------------------------------------------------------
# <sys>/class/drm: which driver owns each render node (the AMD family)

_RENDER = re.compile(r"renderD(?P<n>[1-9][0-9]{0,5})")
_UNIQUE_ID = re.compile(r"[A-Za-z0-9-]{1,128}")
_SYS_TEXT_LIMIT = 256


def resolve_in(base: str, relative: str, known: str = "", *, rooted: bool = False) -> str | None:
    """The real path (relative to `base`) that `relative` names, its symlinks resolved one
    component at a time, or None when it does not exist or loops: nothing outside `base` is
    ever looked at.

    `rooted=False` (a subtree such as the sysfs view): a link that leads above `base` (through
    `..` or an absolute path outside it) is None; sysfs links are relative
    (`class/drm/renderD128 -> ../../devices/pci.../drm/renderD128`). `rooted=True` (`base` is
    a root, as the host view's is): an absolute link starts again at `base`, and `..` stops
    there, as they do for a process chrooted into it. `known` is a path below `base` that
    this function already returned (no link in it): `relative` is then taken from there, and
    the components of `known` are not looked at again.
    """
    base = base.rstrip("/") or "/"
    pending = [part for part in reversed(relative.split("/")) if part not in ("", ".")]
    done: list[str] = [part for part in known.split("/") if part]
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if done:
                done.pop()
            elif not rooted:
                return None  # above base
            continue
        current = posixpath.join(base, *done, part)
        try:
            info = os.lstat(current)
        except (OSError, ValueError):
            return None
        if not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        try:
            target = os.readlink(current)
        except OSError:
            return None
        if target.startswith("/"):
            done = []
            if not rooted:
                inside = "/" if base == "/" else base + "/"
                if not (target + "/").startswith(inside):
                    return None
                target = target[len(inside) :]
        pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
    return "/".join(done)


def _sys_value(base: str, directory: str, name: str) -> str | None:
    """A one-line sysfs attribute, stripped; None when absent, empty or unreadable."""
    try:
        data = read_file(posixpath.join(base, directory, name), limit=_SYS_TEXT_LIMIT)
    except OSError:
        return None
    text = data.decode("utf-8", "replace").strip()
    return text if text and text.isprintable() else None


def read_sys_drm(sys: str) -> tuple[DrmNode, ...]:
    """Every render node `<sys>/class/drm` lists, with its driver and device identity."""
    try:
        names = sorted(os.listdir(posixpath.join(sys, "class/drm")))
    except OSError:
        return ()
    found: list[DrmNode] = []
    for name in names:
        number = _RENDER.fullmatch(name)
        node = resolve_in(sys, f"class/drm/{name}") if number else None
        if number is None or node is None:
            continue
        device = resolve_in(sys, "device", known=node)
        driver = resolve_in(sys, "driver", known=device) if device is not None else None
        unique_id = _sys_value(sys, device, "unique_id") if device is not None else None
        found.append(
            DrmNode(
                name=name,
                minor=int(number.group("n")),
                driver=(
                    posixpath.basename(driver)
                    if driver and os.path.isdir(posixpath.join(sys, driver))
                    else None
                ),
                bus_id=posixpath.basename(device) if device else None,
                product_name=_sys_value(sys, device, "product_name") if device else None,
                unique_id=unique_id if unique_id and _UNIQUE_ID.fullmatch(unique_id) else None,
            )
        )
    return tuple(found)


def _partitions_listed(sys_drm: tuple[DrmNode, ...], families: tuple[Family, ...]) -> bool:
    """Whether a render node sits on a compute partition's device: only then is KFD's
    topology read (a host whose GPUs are not split reads nothing more than before)."""
    return any(
        node.driver is None and family.partition_of(node.bus_id) is not None
        for node in sys_drm
        for family in families
    )


# A topology node's properties file is about 1.5 KiB; a bound keeps a planted file cheap.
_KFD_PROPERTIES_LIMIT = 16 << 10


def read_kfd_topology(sys: str) -> tuple[KfdNode, ...]:
    """The GPU nodes of KFD's topology (<sys>/class/kfd/kfd/topology/nodes/*/properties):
    the render minor each names, with its GPU's PCI domain, location and unique id. CPU
    nodes (`drm_render_minor 0`) and unreadable nodes are left out."""
    resolved = resolve_in(sys, KFD_TOPOLOGY_NODES)
    if resolved is None:
        return ()
    base = posixpath.join(sys, resolved)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return ()
    found: list[KfdNode] = []
    for name in names:
        try:
            fd = os.open(
                posixpath.join(base, name, "properties"),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            )
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            data = os.read(fd, _KFD_PROPERTIES_LIMIT)
        except OSError:
            continue
        finally:
            os.close(fd)
        properties = parse_kfd_properties(data.decode("ascii", "replace"))
        minor = properties.get("drm_render_minor", 0)
        if minor <= 0 or "location_id" not in properties:
            continue
        found.append(
            KfdNode(
                render_minor=minor,
                domain=properties.get("domain", 0),
                location_id=properties["location_id"],
                unique_id=properties.get("unique_id", 0),
            )
        )
    return tuple(found)
