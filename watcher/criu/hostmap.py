"""This host's map: from the daemon, or from a direct scan when the daemon cannot answer."""

from __future__ import annotations

from watcher.criu.text import say, shown, tell

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

    from watcher.core.devices import Family

# Long enough for a daemon busy rescanning a 10,000-mount table, short enough that a hung
# daemon delays a dump by seconds, not minutes (the direct scan then takes over).
DAEMON_TIMEOUT_S = 5.0


def current_map(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(generation, map) from the daemon; a direct scan (generation 0) when it cannot answer."""
    return MapRequest(environ).result()


class MapRequest:
    """The daemon's map, asked for at once and read when it is needed.

    The daemon takes 0.2-0.5 ms to answer a new connection (measured on a two-core machine;
    more when it was idle); a stage that has other work meanwhile (pre-dump: its imports, the
    tree's root) does it while the daemon answers, instead of waiting first (where the woken
    daemon takes this process's core, the two simply run in turn). `result()` reads the reply
    (once), falling back to a direct scan as `current_map` does.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        from watcher import client  # noqa: PLC0415 (only the stages that need it pay for it)

        self._environ = environ
        self._path = client.socket_path(environ.get(client.SOCKET_ENV))
        self._connection: client.Connection | None = None
        self._failure: Exception | None = None
        try:
            self._connection = client.Connection(self._path, timeout=DAEMON_TIMEOUT_S)
            self._connection.send({"op": "get"})
        except (client.Unreachable, client.ServerError) as error:
            self.close()
            self._failure = error

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def result(self) -> tuple[int, dict[str, Any]]:
        from watcher import client  # noqa: PLC0415 (loaded by __init__ already)

        connection, self._connection = self._connection, None
        if connection is None:
            say(f"{shown(self._failure, 400)}; scanning this host directly instead")
            return direct_scan(self._environ)
        try:
            reply = connection.receive()
            generation, device_map = reply["generation"], reply["map"]
            if not isinstance(generation, int) or not isinstance(device_map, dict):
                raise TypeError("the reply holds no map")  # noqa: TRY301 (same fallback as below)
        except (client.Unreachable, client.ServerError) as error:
            why = f"{shown(error, 400)}; scanning this host directly instead"
        except (ValueError, KeyError, TypeError) as error:
            why = (
                f"the daemon at {shown(self._path)} sent a reply that is not a map "
                f"({shown(error)}); scanning directly"
            )
        else:
            return generation, device_map
        finally:
            connection.close()  # before a scan that may take a while
        say(why)
        return direct_scan(self._environ)


def _load_site_packages() -> None:
    """Put every site-packages directory on `sys.path`, as `site` does at a normal start.

    The fronts start Python with `-S` and add this install's own packages only (shfront rule
    4): the scanner's dependencies may sit elsewhere (a venv that uses the system's packages).
    """
    import sys  # noqa: PLC0415

    if sys.flags.no_site and "site" not in sys.modules:
        import site  # noqa: PLC0415

        site.main()


def direct_scan(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    # The fallback is allowed to be heavy: it runs only when the daemon is down.
    device_map = scanned_map(environ)
    if device_map is None:
        # The file `install-action` writes holds the stdlib-only modules alone; an install
        # whose dependencies are gone does what it does.
        raise SystemExit(without_scanner(environ))
    return 0, device_map


def scanned_map(environ: Mapping[str, str], *, quiet: bool = False) -> dict[str, Any] | None:
    """This host's map from a scan of our own, in the shape the daemon sends; None when this
    install has no scanner (install-action's file) or cannot import its dependencies.
    `quiet`: a config that cannot be used is not reported (the scan then uses the default
    host view either way)."""
    from importlib.util import find_spec  # noqa: PLC0415

    if find_spec("watcher.probe") is None:
        # Not in the file: it is not given the host's site-packages either, whose .pth files
        # would run as root.
        return None
    _load_site_packages()
    try:
        import msgspec  # noqa: PLC0415

        from watcher.config import ConfigError, resolve_settings  # noqa: PLC0415
        from watcher.core.snapshot import HostView  # noqa: PLC0415
        from watcher.probe import scan  # noqa: PLC0415
    except ImportError:
        return None
    from watcher.criu.settings import config_path  # noqa: PLC0415 (only without the daemon)

    path, explicit = config_path(environ)
    try:
        view = resolve_settings({"config": path if explicit else None}, environ).view
    except ConfigError as error:
        if not quiet:
            say(f"{shown(error, 400)}; scanning with the default host view")
        view = HostView()
    # Through JSON, not to_builtins (which keeps tuples): the same shape the daemon sends.
    device_map: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(scan(view, generation=0)))
    return device_map


# --------------------------------------------------------------------------------------------
# The action file without the daemon (stdlib only: install-action packs this)


def without_scanner(environ: Mapping[str, str]) -> int:
    """The exit code of a stage that needs a map this action file cannot make.

    `pre-restore` of a record that lists used devices has nothing to check them against:
    refused. `pre-dump` still tells, from `/proc/devices`, sysfs and the tree's fds and maps
    alone, whether the tree holds a device of any family (`watcher.core.devices.FAMILIES`):
    with none there is nothing to record (a restore without a record goes anywhere, which is
    right for a tree without a GPU), and the dump goes on, so that a daemon restarting does
    not stop every checkpoint on the node; with some it is refused, since a GPU checkpoint
    without a record would be restored anywhere unchecked.
    """
    from watcher.criu import EXIT_OK, EXIT_REFUSE  # noqa: PLC0415 (the package imports this module)

    if environ.get("CRTOOLS_SCRIPT_ACTION") != "pre-dump":
        say("this action file has no scanner of its own: without the daemon it checks nothing")
        return EXIT_REFUSE
    # pre_dump checked it: digits, a running process.
    pid = int(environ["CRTOOLS_INIT_PID"])
    from watcher.criu import proctree  # noqa: PLC0415
    from watcher.criu.settings import proc_dir, sys_dir  # noqa: PLC0415

    devices = f"{proc_dir(environ)}/devices"
    majors = character_majors(devices)
    if isinstance(majors, str):
        say(
            f"cannot read {shown(devices)} ({shown(majors)}), so cannot tell whether the tree of "
            f"pid {pid} uses a GPU without the daemon; dump stopped"
        )
        return EXIT_REFUSE
    unreadable: list[int] = []
    held = proctree.open_char_devices(proctree.process_tree(pid), unreadable=unreadable)
    gpu = held_gpu_devices(held, majors, sys_dir(environ))
    if gpu:
        listed = "; ".join(
            f"{display} device(s) {', '.join(numbers)}" for display, numbers in gpu.items()
        )
        say(
            f"the tree of pid {pid} holds {listed}, and this action file cannot record them "
            "without the daemon (it has no scanner of its own); dump stopped: a GPU checkpoint "
            "without a record would be restored on any host unchecked. Start the daemon and "
            "dump again"
        )
        return EXIT_REFUSE
    if unreadable:
        say(
            f"could not read /proc of pids {unreadable}: cannot tell whether they use a GPU "
            "without the daemon; dump stopped"
        )
        return EXIT_REFUSE
    if not proctree.is_running(pid):
        # The walk raced the root's exit: "no device" would be a guess.
        say(f"CRTOOLS_INIT_PID {pid} exited while its tree was read; dump stopped")
        return EXIT_REFUSE
    tell(f"no GPU device in use by the tree of pid {pid}; no record written")
    return EXIT_OK


def held_gpu_devices(
    held: Iterable[tuple[int, int]], majors: Mapping[str, int], sys: str
) -> dict[str, list[str]]:
    """`major:minor` of each held device that belongs to a family, by the family's display
    name ("NVIDIA", "AMD"), from the family table as the scanner reads it.

    A major named with a family's `major_prefix` counts whatever spec knows it: a module
    newer than this table still stops a dump it cannot record. A node that several drivers
    make (the DRM render nodes, `NodeSpec.sys_driver`) counts when sysfs says that driver
    made it, or when it is a compute partition of the family's GPU that KFD's topology names.
    """
    from watcher.core.devices import FAMILIES  # noqa: PLC0415 (only without the daemon)

    names_of: dict[int, list[str]] = {}
    for name, number in majors.items():
        names_of.setdefault(number, []).append(name)
    kfd_minors: list[set[int]] = []  # read once, on the first partition met

    def owns(family: Family, names: list[str], minor: int) -> bool:
        prefix = family.major_prefix
        if prefix is not None and any(name.startswith(prefix) for name in names):
            return True
        for spec in family.specs:
            if not any(name in spec.majors for name in names):
                continue
            if spec.sys_driver is None:
                return True
            node = family.gpu_node_name(minor)
            matched = family.match(node)
            if matched is None or matched[0] is not spec:
                continue
            driver, device = _sys_driver(sys, node.rpartition("/")[2])
            if driver == spec.sys_driver:
                return True
            if driver is None and family.partition_of(device) is not None:
                if not kfd_minors:
                    kfd_minors.append(_kfd_render_minors(sys))
                if minor in kfd_minors[0]:
                    return True
        return False

    found: dict[str, list[str]] = {}
    for major, minor in sorted(held):
        names = names_of.get(major, [])
        family = next((family for family in FAMILIES if owns(family, names, minor)), None)
        if family is not None:
            found.setdefault(family.display, []).append(f"{major}:{minor}")
    return found


def _sys_driver(sys: str, name: str) -> tuple[str | None, str | None]:
    """(driver, device): the basenames of the directories `<sys>/class/drm/NAME/device/driver`
    and `.../device` lead to, None where there is no such link."""
    import os  # noqa: PLC0415

    device_link = f"{sys}/class/drm/{name}/device"
    try:
        device = os.path.basename(os.path.realpath(device_link, strict=True))
    except (OSError, ValueError):
        return None, None
    try:
        driver = os.path.basename(os.path.realpath(f"{device_link}/driver", strict=True))
    except (OSError, ValueError):
        return None, device
    return driver, device


def _kfd_render_minors(sys: str) -> set[int]:
    """The render minors KFD's topology names (`drm_render_minor` of each node)."""
    import os  # noqa: PLC0415
    import stat  # noqa: PLC0415

    from watcher.core.devices import KFD_TOPOLOGY_NODES, parse_kfd_properties  # noqa: PLC0415

    base = f"{sys}/{KFD_TOPOLOGY_NODES}"
    try:
        nodes = os.listdir(base)
    except OSError:
        return set()
    minors: set[int] = set()
    for node in nodes:
        try:
            # O_NONBLOCK: a FIFO planted where a properties file should be must not hang
            # CRIU's dump.
            fd = os.open(f"{base}/{node}/properties", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            text = os.read(fd, 1 << 16).decode("ascii", "replace")
        except OSError:
            continue
        finally:
            os.close(fd)
        minor = parse_kfd_properties(text).get("drm_render_minor", 0)
        if minor:
            minors.add(minor)
    return minors


def character_majors(path: str) -> dict[str, int] | str:
    """Character-device majors by name from `/proc/devices` (the first major of a name), or
    why the file could not be read. Lines of another shape are skipped: without the daemon a
    stray line must not hide the majors around it."""
    try:
        with open(path, "rb") as file:
            text = file.read(1 << 20)
    except OSError as error:
        return error.strerror or type(error).__name__
    majors: dict[str, int] = {}
    character = False
    for line in text.splitlines():
        fields = line.split()
        if line.endswith(b":"):
            character = line.strip().lower() == b"character devices:"
        elif character and len(fields) == 2 and fields[0].isdigit():
            majors.setdefault(fields[1].decode("ascii", "replace"), int(fields[0]))
    return majors
