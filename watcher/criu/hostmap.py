"""This host's map: from the daemon, or from a direct scan when the daemon cannot answer."""

from __future__ import annotations

from watcher.criu.settings import config_path
from watcher.criu.text import say, shown, tell

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# Long enough for a daemon busy rescanning a 10,000-mount table, short enough that a hung
# daemon delays a dump by seconds, not minutes (the direct scan then takes over).
DAEMON_TIMEOUT_S = 5.0


def current_map(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(generation, map) from the daemon; a direct scan (generation 0) when it cannot answer."""
    from watcher import client  # noqa: PLC0415 (only the stages that need it pay for it)

    path = client.socket_path(environ.get(client.SOCKET_ENV))
    try:
        reply = client.request(path, {"op": "get"}, timeout=DAEMON_TIMEOUT_S)
        generation, device_map = reply["generation"], reply["map"]
        if not isinstance(generation, int) or not isinstance(device_map, dict):
            raise TypeError("the reply holds no map")  # noqa: TRY301 (same fallback as below)
    except (client.Unreachable, client.ServerError) as error:
        say(f"{shown(error, 400)}; scanning this host directly instead")
        return direct_scan(environ)
    except (ValueError, KeyError, TypeError) as error:
        say(
            f"the daemon at {shown(path)} sent a reply that is not a map ({shown(error)}); "
            "scanning directly"
        )
        return direct_scan(environ)
    return generation, device_map


def direct_scan(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    # The fallback is allowed to be heavy: it runs only when the daemon is down.
    try:
        import msgspec  # noqa: PLC0415
    except ImportError:
        # The file `install-action` writes holds the stdlib-only modules alone.
        raise SystemExit(without_scanner(environ)) from None

    from watcher.config import ConfigError, resolve_settings  # noqa: PLC0415
    from watcher.core.scan import HostView  # noqa: PLC0415
    from watcher.probe import scan  # noqa: PLC0415

    path, explicit = config_path(environ)
    try:
        view = resolve_settings({"config": path if explicit else None}, environ).view
    except ConfigError as error:
        say(f"{shown(error, 400)}; scanning with the default host view")
        view = HostView()
    # Through JSON, not to_builtins (which keeps tuples): the same shape the daemon sends.
    device_map: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(scan(view, generation=0)))
    return 0, device_map


# --------------------------------------------------------------------------------------------
# The action file without the daemon (stdlib only: install-action packs this)


def without_scanner(environ: Mapping[str, str]) -> int:
    """The exit code of a stage that needs a map this action file cannot make.

    `pre-restore` of a record that lists used devices has nothing to check them against:
    refused. `pre-dump` still tells, from `/proc/devices` and the tree's fds and maps alone,
    whether the tree holds any NVIDIA device: with none there is nothing to record (a restore
    without a record goes anywhere, which is right for a tree without a GPU), and the dump goes
    on, so that a daemon restarting does not stop every checkpoint on the node; with some it
    is refused, since a GPU checkpoint without a record would be restored anywhere unchecked.
    """
    from watcher.criu import EXIT_OK, EXIT_REFUSE  # noqa: PLC0415 (the package imports this module)

    if environ.get("CRTOOLS_SCRIPT_ACTION") != "pre-dump":
        say("this action file has no scanner of its own: without the daemon it checks nothing")
        return EXIT_REFUSE
    # pre_dump checked it: digits, a running process.
    pid = int(environ["CRTOOLS_INIT_PID"])
    from watcher import proctree  # noqa: PLC0415
    from watcher.criu.settings import proc_dir  # noqa: PLC0415

    devices = f"{proc_dir(environ)}/devices"
    majors = nvidia_majors(devices)
    if isinstance(majors, str):
        say(
            f"cannot read {shown(devices)} ({shown(majors)}), so cannot tell whether the tree of "
            f"pid {pid} uses a GPU without the daemon; dump stopped"
        )
        return EXIT_REFUSE
    unreadable: list[int] = []
    held = proctree.open_char_devices(proctree.process_tree(pid), unreadable=unreadable)
    gpu = [f"{major}:{minor}" for major, minor in held if major in majors]
    if gpu:
        say(
            f"the tree of pid {pid} holds NVIDIA device(s) {', '.join(gpu)}, and this action "
            "file cannot record them without the daemon (it has no scanner of its own); dump "
            "stopped: a GPU checkpoint without a record would be restored on any host "
            "unchecked. Start the daemon and dump again"
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


def nvidia_majors(path: str) -> set[int] | str:
    """The character-device majors of `/proc/devices` whose name starts with `nvidia`
    (`nvidia`, `nvidia-frontend`, `nvidia-uvm`, `nvidia-caps`, `nvidia-nvswitch`, ...), or
    why the file could not be read. Wider than the scanner's table on purpose: a major named
    for NVIDIA that no table knows yet still stops a dump it cannot record."""
    try:
        with open(path, "rb") as file:
            text = file.read(1 << 20)
    except OSError as error:
        return error.strerror or type(error).__name__
    majors: set[int] = set()
    character = False
    for line in text.splitlines():
        fields = line.split()
        if line.endswith(b":"):
            character = line.strip().lower() == b"character devices:"
        elif (
            character
            and len(fields) == 2
            and fields[0].isdigit()
            and fields[1].startswith(b"nvidia")
        ):
            majors.add(int(fields[0]))
    return majors
