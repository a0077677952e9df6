"""The `gpu-device-watcher` command line: `main(argv) -> exit code`.

Only argparse and the lean client are imported at start-up; the scanner (msgspec) and the
daemon (anyio) are imported by the commands that need them, so `path`, `get` and the CRIU
action start as fast as a bare interpreter allows.
"""

from __future__ import annotations

import argparse
import os
import sys

from watcher import __version__, client
from watcher.cli import render
from watcher.contract import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    PREFIX,
    SOCKET_ENV,
    printable,
    utc_timestamp,
)
from watcher.errors import UsageError

__all__ = [
    "COMMANDS",
    "PROG",
    "build_parser",
    "command_criu_action",
    "command_doctor",
    "command_get",
    "command_path",
    "command_scan",
    "command_serve",
    "command_status",
    "command_watch",
    "fail",
    "main",
]

# Not `from typing import TYPE_CHECKING`: typing (and datetime, and the shutil that argparse
# imports for the terminal width) cost milliseconds at every start of `path` and `get`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NoReturn

PROG = "gpu-device-watcher"
EXIT_OK, EXIT_ABSENT, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# `status`: the daemon answers, but a scan is stuck (its map is stale).
EXIT_STUCK = 1


def fail(message: str) -> None:
    # A message may carry what the daemon or the host said: one line, no terminal escapes.
    print(f"{PREFIX} {printable(message)}", file=sys.stderr)


def _terminal_columns() -> int:
    """`shutil.get_terminal_size().columns` without importing shutil (bz2, lzma, fnmatch)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the width so that it does not import shutil to find it.

    argparse makes one for every `add_argument` (to check metavars), not only for --help.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # argparse's own wrapping breaks at hyphens, which cuts paths such as
        # /etc/gpu-device-watcher/config.toml in two; only --help gets here.
        import textwrap  # noqa: PLC0415

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2, as every command of ours reports errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Subcommand parsers are made by argparse with our class but not our formatter.
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _host_view_options() -> _Parser:
    shared = _Parser(add_help=False)
    # The options' own defaults stay None ("not given"), so that the config file can set
    # them; the help names the real defaults instead of argparse's None.
    group = shared.add_argument_group(
        "host view", "command-line options win over the config file's keys of the same name"
    )
    group.add_argument(
        "--root", metavar="DIR", help="where the host filesystem is visible (default /)"
    )
    group.add_argument(
        "--proc", metavar="DIR", help="where devices and driver/nvidia are read (default /proc)"
    )
    group.add_argument(
        "--sys", metavar="DIR", help="where class/drm is read (default /sys; AMD GPUs)"
    )
    group.add_argument(
        "--mountinfo",
        metavar="FILE",
        help="mount table to parse and watch (default /proc/self/mountinfo)",
    )
    group.add_argument(
        "--config", metavar="FILE", help=f"TOML config (default {DEFAULT_CONFIG}, if present)"
    )
    return shared


def _format_option(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    parser.add_argument(
        "--format", choices=choices, default=choices[0], help="output format (default %(default)s)"
    )


def _checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a CRIU image directory, a directory that holds checkpoint/, or a checkpoint "
        "archive (tar: plain, gzip, zstd, xz or bzip2)",
    )


def _socket_option(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    sources = f"${SOCKET_ENV}, the config's socket," if server else f"${SOCKET_ENV}"
    parser.add_argument(
        "--socket", metavar="PATH", help=f"daemon socket (default {sources} or {DEFAULT_SOCKET})"
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only` the one subcommand that is being run."""

    def wanted(name: str) -> bool:
        return only is None or only == name

    parser = _Parser(
        prog=PROG,
        description="Keeps a live, validated map of GPU device nodes (NVIDIA, AMD) for CRIU "
        "checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    if wanted("serve") or wanted("scan") or wanted("doctor"):
        host_view = _host_view_options()
    if wanted("serve"):
        serve = commands.add_parser("serve", parents=[host_view], help="run the daemon")
        _socket_option(serve, server=True)
        serve.add_argument(
            "--log-level",
            choices=("debug", "info", "warning", "error"),
            help="log verbosity (default info, or the config's log_level)",
        )

    if wanted("scan"):
        scan = commands.add_parser("scan", parents=[host_view], help="one scan, no daemon")
        _format_option(scan, ("json", "env", "table"))

    if wanted("get"):
        get = commands.add_parser("get", help="the live map from the daemon")
        _socket_option(get)
        _format_option(get, ("json", "env", "table"))

    if wanted("path"):
        path = commands.add_parser("path", help="the host path of one valid device")
        path.add_argument("name", metavar="NAME", help="device name, e.g. nvidiactl or nvidia-uvm")
        _socket_option(path)

    if wanted("watch"):
        watch = commands.add_parser("watch", help="stream changes until interrupted")
        _socket_option(watch)
        _format_option(watch, ("text", "json"))

    if wanted("status"):
        status = commands.add_parser("status", help="daemon health and counters")
        _socket_option(status)

    if wanted("criu-action"):
        commands.add_parser("criu-action", help="the CRIU action script (run by CRIU)")

    if wanted("restore-check"):
        check = commands.add_parser(
            "restore-check", help="can this host take a checkpoint back, with which device map"
        )
        _checkpoint_argument(check)
        _socket_option(check)
        check.add_argument(
            "--config",
            metavar="FILE",
            help=f"TOML config for restore_version_match (default ${CONFIG_ENV} or "
            f"{DEFAULT_CONFIG}, if present)",
        )
        _format_option(check, ("text", "json"))
    if wanted("inspect"):
        inspect = commands.add_parser(
            "inspect",
            help="what a checkpoint needs, from its record (no daemon, nothing of this host)",
        )
        _checkpoint_argument(inspect)
        _format_option(inspect, ("text", "json", "affinity", "selector"))
        inspect.add_argument(
            "--version-match",
            choices=("exact", "major"),
            help="affinity and selector: the driver-version label, or driver-major (default the "
            "config's restore_version_match, else exact)",
        )
    if wanted("doctor"):
        doctor = commands.add_parser(
            "doctor",
            parents=[host_view],
            help="is this node ready for GPU checkpoints, end to end; what to fix",
        )
        _socket_option(doctor)
        _format_option(doctor, ("text", "json"))
    if wanted("install-action"):
        install = commands.add_parser(
            "install-action",
            help="write the CRIU action as one file for the host's python3, and the "
            "cuda-checkpoint wrapper, into DIR",
        )
        install.add_argument("directory", metavar="DIR", help="where to write it (must exist)")
    return parser


def _option_values(arguments: argparse.Namespace) -> dict[str, Any]:
    keys = ("root", "proc", "sys", "mountinfo", "config", "socket", "log_level")
    return {key: getattr(arguments, key, None) for key in keys}


def _settings(arguments: argparse.Namespace) -> Any:
    from watcher.config import resolve_settings  # noqa: PLC0415 (heavy: msgspec)

    return resolve_settings(_option_values(arguments))


def _check_host_view(arguments: argparse.Namespace) -> None:
    for key in ("root", "proc", "sys"):
        value = getattr(arguments, key, None)
        if value is not None and not os.path.isdir(value):
            raise UsageError(f"--{key} {value}: not a directory")
    mountinfo = getattr(arguments, "mountinfo", None)
    if mountinfo is not None and not os.path.isfile(mountinfo):
        raise UsageError(f"--mountinfo {mountinfo}: no such file")


def command_scan(arguments: argparse.Namespace) -> int:
    import msgspec  # noqa: PLC0415

    from watcher.probe import scan  # noqa: PLC0415

    _check_host_view(arguments)
    settings = _settings(arguments)
    device_map = msgspec.to_builtins(scan(settings.view, generation=0))
    print(render.render(device_map, arguments.format))
    return EXIT_OK


def command_serve(arguments: argparse.Namespace) -> int:
    from watcher.daemon.compose import run  # noqa: PLC0415

    _check_host_view(arguments)
    return run(_settings(arguments), lambda: _settings(arguments))


def command_get(arguments: argparse.Namespace) -> int:
    reply = client.request(client.socket_path(arguments.socket), {"op": "get"})
    print(render.render(reply["map"], arguments.format))
    return EXIT_OK


def command_path(arguments: argparse.Namespace) -> int:
    try:
        reply = client.request(
            client.socket_path(arguments.socket), {"op": "path", "name": arguments.name}
        )
    except client.ServerError as error:
        if error.code != "not-found":
            raise
        fail(str(error))
        return EXIT_ABSENT
    print(reply["path"])
    return EXIT_OK


def command_status(arguments: argparse.Namespace) -> int:
    reply = client.request(client.socket_path(arguments.socket), {"op": "status"})
    status = reply["status"]
    width = max(len(key) for key in status)
    for key, value in status.items():
        print(f"{printable(key):<{width}}  {printable(str(value))}")
    if status.get("scan_stuck") is True:
        # Exit 1 makes a liveness probe that runs `status` restart the daemon.
        fail(
            f"a scan has been running for {status.get('scan_running_s')} s and is stuck: the "
            "map is stale; restart the daemon and look at its log for what blocked"
        )
        return EXIT_STUCK
    return EXIT_OK


def _stamp() -> str:
    # The contract's UTC format, to the millisecond: a person reads these.
    return utc_timestamp()[:-4] + "Z"


def command_watch(arguments: argparse.Namespace) -> int:
    path = client.socket_path(arguments.socket)
    with client.Connection(path, timeout=None) as connection:
        connection.send({"op": "subscribe"})
        previous: dict[str, Any] | None = None
        for reply in connection.replies():
            if arguments.format == "json":
                print(render.as_json_line(reply), flush=True)
                continue
            for line in render.describe_update(previous, reply):
                print(f"{_stamp()}  {line}", flush=True)
            previous = reply["map"]
    return EXIT_OK


def command_criu_action(_: argparse.Namespace) -> int:
    from watcher.criu import main as criu_main  # noqa: PLC0415

    return criu_main(os.environ)


def command_restore_check(arguments: argparse.Namespace) -> int:
    if arguments.config is not None and not os.path.isfile(arguments.config):
        raise UsageError(f"--config {arguments.config}: no such file")
    from watcher.criu.restore import restore_check  # noqa: PLC0415

    # The gate reads its socket and config as the CRIU action does, from the environment.
    environ = dict(os.environ)
    if arguments.socket:
        environ[client.SOCKET_ENV] = arguments.socket
    if arguments.config:
        environ[CONFIG_ENV] = arguments.config
    if environ.get(CONFIG_ENV):
        # The action, inside CRIU, can only log a bad config and keep the defaults; a config
        # this command is told to use is checked as every config is: wrong is exit 2. (The
        # default file is left to the action's reading, so the common path stays lean.)
        from watcher.config import load_config_file  # noqa: PLC0415 (msgspec)

        load_config_file(environ[CONFIG_ENV], required=True)
    return restore_check(arguments.checkpoint, environ, arguments.format)


def command_inspect(arguments: argparse.Namespace) -> int:
    from watcher.criu.inspect import inspect  # noqa: PLC0415

    return inspect(arguments.checkpoint, arguments.format, arguments.version_match)


def command_doctor(arguments: argparse.Namespace) -> int:
    _check_host_view(arguments)
    settings = _settings(arguments)
    from watcher.doctor import diagnose, exit_code  # noqa: PLC0415 (msgspec, the scanner)
    from watcher.doctor.report import as_json, as_text  # noqa: PLC0415

    # A host view named on the command line is another host than the daemon's, unless the
    # daemon is named too (in the DaemonSet's pod the view comes from the config).
    named_view = any(getattr(arguments, key) for key in ("root", "proc", "sys", "mountinfo"))
    checks = diagnose(settings, ask_daemon=arguments.socket is not None or not named_view)
    if arguments.format == "json":
        print(as_json(checks))
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        root = settings.view.root
        header = f"{PROG} doctor: {'this host' if root == '/' else f'the host under {root}'}"
        print(as_text(checks, colour=colour, width=_terminal_columns(), header=header))
    return exit_code(checks)


# -- install-action: the CRIU action as one self-contained file (deploy/kubernetes) ---------


def command_install_action(arguments: argparse.Namespace) -> int:
    from watcher.criu import actionfile  # noqa: PLC0415

    try:
        built = actionfile.build()
        target = actionfile.install(arguments.directory, built)
        wrapper = actionfile.install_wrapper(arguments.directory)
    except actionfile.ActionFileError as error:
        if error.usage:
            raise UsageError(f"install-action: {error}") from None
        fail(f"install-action: {error}")
        return EXIT_ABSENT
    print(
        f"{target}: {len(built.data)} bytes, {len(built.modules)} modules, runs on python3 >= 3.11"
    )
    print(
        f"{wrapper}: the cuda-checkpoint wrapper; put {arguments.directory} first on the PATH "
        "of the service that runs CRIU"
    )
    if built.left_out:
        print(
            f"left out (the direct scan, which needs the daemon's dependencies): "
            f"{', '.join(built.left_out)}; without the daemon this file refuses a restore "
            "that uses GPU devices"
        )
    return EXIT_OK


COMMANDS = {
    "scan": command_scan,
    "serve": command_serve,
    "get": command_get,
    "path": command_path,
    "watch": command_watch,
    "status": command_status,
    "criu-action": command_criu_action,
    "restore-check": command_restore_check,
    "inspect": command_inspect,
    "install-action": command_install_action,
    "doctor": command_doctor,
}


def _parse(args: list[str], only: str | None) -> argparse.Namespace:
    arguments, unknown = build_parser(only).parse_known_args(args)
    if unknown:
        # argparse reports these from the top-level parser; point to the command's help.
        where = f"{PROG} {arguments.command}"
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see `{where} --help`)")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        # Only the parser of the subcommand being run is built: building all of them is a
        # third of what `path` costs beyond a bare interpreter. Anything else (--help, a
        # typo) gets the whole command line, so that help and errors list every command.
        only = args[0] if args and args[0] in COMMANDS else None
        arguments = _parse(args, only)
        return COMMANDS[arguments.command](arguments)
    except UsageError as error:
        fail(str(error))
        return EXIT_USAGE
    except client.Unreachable as error:
        fail(str(error))
        return EXIT_UNREACHABLE
    except client.ServerError as error:
        fail(f"the daemon refused: {error.code}: {error}")
        return EXIT_ABSENT
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `gpu-device-watcher watch | head`: the reader left; that is not an error.
        sys.stderr.close()
        return EXIT_OK
