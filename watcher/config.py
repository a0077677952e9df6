"""The TOML config and the command line merged into one validated `Settings`.

Command-line options win over the file; the file wins over defaults. An unknown key or a
wrong type is a `ConfigError` naming the key, which the CLI turns into exit 2.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import msgspec

from watcher.contract import DEFAULT_CONFIG, DEFAULT_SOCKET, SOCKET_ENV, config_file_problem
from watcher.core.snapshot import DEFAULT_DRIVER_ROOTS, DEFAULT_VALIDATIONS_DIR, HostView
from watcher.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_SOCKET",
    "RELOAD_LIVE",
    "RELOAD_ON_RESTART",
    "SOCKET_ENV",
    "ConfigError",
    "ConfigFile",
    "Settings",
    "check_file_safety",
    "foreign_mount_table",
    "load_config_file",
    "resolve_settings",
]

LogLevel = Literal["debug", "info", "warning", "error"]
VersionMatch = Literal["exact", "major"]
DumpChecks = Literal["warn", "refuse"]
_MODE = re.compile(r"0?[0-7]{3,4}")
_GID_MAX = 2**32 - 2  # (gid_t) -1 means "leave unchanged" to chown
_ID_MAX = _GID_MAX  # (uid_t) -1 is no user either
# The keys whose value is one of a few words: an error lists them.
_CHOICES: Final[Mapping[str, tuple[str, ...]]] = {
    "log_level": get_args(LogLevel),
    "restore_version_match": get_args(VersionMatch),
    "dump_checks": get_args(DumpChecks),
}
# What to write instead, for wrong types a person is likely to write.
_TYPE_HINTS: Final[Mapping[str, str]] = {
    "socket_mode": 'write the mode as a string of octal digits, e.g. socket_mode = "0660"',
}


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The keys of config.toml; None means "not set here"."""

    socket: str | None = None
    root: str | None = None
    proc: str | None = None
    sys: str | None = None
    mountinfo: str | None = None
    driver_roots: list[str] | None = None
    validations_dir: str | None = None
    debounce_ms: int | None = None
    log_level: LogLevel | None = None
    max_clients: int | None = None
    socket_mode: str | None = None
    socket_group: str | int | None = None
    allowed_uids: list[int] | None = None
    allowed_gids: list[int] | None = None
    # Read by the CRIU action at pre-restore: "exact" driver version, or same "major".
    restore_version_match: VersionMatch | None = None
    # Read by the CRIU action at pre-dump: whether a failed dump check stops the dump.
    dump_checks: DumpChecks | None = None
    # The Node Feature Discovery feature file, and the Prometheus endpoint (watcher.publish).
    nfd_features_file: str | None = None
    metrics_listen: str | None = None


# What a reload (SIGHUP) does with each key of ConfigFile. A key added to ConfigFile must be
# added to one of these two tables (a test checks it): say where it reaches on reload.
RELOAD_LIVE: Final[Mapping[str, str]] = {
    "root": "the host view: the next scan, the watched directories and the mount filter",
    "proc": "the host view: the next scan and the mount filter",
    "sys": "the host view: where the next scan reads class/drm, and the mount filter",
    "mountinfo": "the mount table parsed, watched and judged (a new watcher)",
    "driver_roots": "the candidate roots of the next scan and their watches",
    "validations_dir": "the next scan and the watched validations directory",
    "debounce_ms": "the rescan scheduler, from the next burst of events",
    "log_level": "the daemon's loggers, at once",
    "max_clients": "the server's admission of new connections",
    "allowed_uids": "the server's admission of new connections",
    "allowed_gids": "the server's admission of new connections",
    "restore_version_match": "nothing in the daemon: the CRIU action reads it at pre-restore",
    "dump_checks": "nothing in the daemon: the CRIU action reads it at pre-dump",
    "nfd_features_file": "the publisher: the old file is removed, the new one written",
    "metrics_listen": "the publisher: the metrics endpoint moves to the new address",
}
# The listening socket is bound once; these apply on restart, and a reload says so in the log.
RELOAD_ON_RESTART: Final = ("socket", "socket_mode", "socket_group")


@dataclass(frozen=True, slots=True)
class Settings:
    view: HostView
    socket: str
    debounce_ms: int = 20
    log_level: LogLevel = "info"
    max_clients: int = 256
    socket_mode: int = 0o660
    socket_group: str | int | None = None
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
    config_path: str | None = None
    nfd_features_file: str | None = None
    # (host, port) of `metrics_listen`, the host without IPv6 brackets.
    metrics_listen: tuple[str, int] | None = None


class ListenAddressError(ValueError):
    """A `metrics_listen` value that is not HOST:PORT; the message says what is wrong."""


# A host name or an IPv4 address: dot-separated labels of letters, digits and hyphens.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); IPv6 hosts in brackets (`[::1]:9402`)."""
    host, colon, port_text = value.rpartition(":")
    if not colon or not host:
        raise ListenAddressError(f'must be "HOST:PORT" (e.g. "127.0.0.1:9402"), got {value!r}')
    if host.startswith("["):
        if not host.endswith("]"):
            raise ListenAddressError(f"unclosed [ in {value!r}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenAddressError(
                f"{host!r} in brackets is not an IPv6 address (in {value!r})"
            ) from None
    elif ":" in host:
        raise ListenAddressError(
            f'an IPv6 address goes in brackets ("[{host}]:{port_text}"), got {value!r}'
        )
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ListenAddressError(f"{host!r} is not a host name or IP address (in {value!r})")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65_535:
        raise ListenAddressError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def format_listen(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _explain(error: msgspec.ValidationError) -> str:
    # msgspec says "Object contains unknown field `x`" or "Expected `int`, got `str` - at
    # `$.debounce_ms`"; say it in the terms of a config file.
    # Every key is optional in the Struct; "| null" would only confuse a reader.
    text = str(error).replace(" | null", "")
    unknown = re.search(r"unknown field `([^`]+)`", text)
    if unknown:
        known = ", ".join(ConfigFile.__struct_fields__)
        return f"unknown key {unknown.group(1)!r} (known keys: {known})"
    where = re.search(r" - at `\$\.?([^`]*)`", text)
    if where:
        key, what = where.group(1), text[: where.start()]
        choice = re.fullmatch(r"Invalid enum value (.*)", what)
        if key in _CHOICES and choice:
            return f"key {key!r}: must be {_one_of(_CHOICES[key])}, got {choice.group(1)}"
        if key in _TYPE_HINTS:
            return f"key {key!r}: {what}; {_TYPE_HINTS[key]}"
        return f"key {key!r}: {what}"
    return text


def _one_of(choices: tuple[str, ...]) -> str:
    """'"a", "b" or "c"'"""
    quoted = [f'"{choice}"' for choice in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]


def check_file_safety(path: str, info: os.stat_result | None = None) -> None:
    """Refuse a config that a user other than root or ours owns or can write.

    The rule itself is `watcher.contract.config_file_problem`, shared with the CRIU action.
    Pass `info`, the fstat() of the file that was read: a path looked up again could name
    another file by then (swapped in a directory others can write).
    """
    if info is None:
        info = os.stat(path)
    problem = config_file_problem(path, info)
    if problem is not None:
        why, fix = problem
        raise ConfigError(f"{why}: {fix}")


def load_config_file(path: str, *, required: bool) -> ConfigFile:
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            data = file.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config {path} does not exist") from None
        return ConfigFile()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    # The file that was read is the one checked, not whatever the path names afterwards.
    check_file_safety(path, info)
    try:
        config = msgspec.toml.decode(data, type=ConfigFile)
    except msgspec.ValidationError as error:
        raise ConfigError(f"config {path}: {_explain(error)}") from None
    except msgspec.DecodeError as error:
        raise ConfigError(f"config {path} is not valid TOML: {error}") from None
    _validate(path, config)
    return config


def _validate(path: str, config: ConfigFile) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config {path}: key {key!r}: {why}")

    # TOML can spell a NUL ("\u0000"); no path holds one, and every use of it would raise.
    for key in (
        "socket",
        "root",
        "proc",
        "sys",
        "mountinfo",
        "validations_dir",
        "nfd_features_file",
    ):
        value = getattr(config, key)
        if value is not None and (not value.startswith("/") or "\0" in value):
            raise bad(key, f"must be an absolute path, got {value!r}")
    for root in config.driver_roots or ():
        if not root.startswith("/") or "\0" in root:
            raise bad("driver_roots", f"every root must be an absolute path, got {root!r}")
    if config.driver_roots is not None and not config.driver_roots:
        raise bad("driver_roots", "must name at least one root")
    for key in ("allowed_uids", "allowed_gids"):
        for number in getattr(config, key) or ():
            if not 0 <= number <= _ID_MAX:
                raise bad(key, f"every id must be from 0 to {_ID_MAX}, got {number}")
    if config.debounce_ms is not None and not 0 <= config.debounce_ms <= 10_000:
        raise bad("debounce_ms", "must be between 0 and 10000")
    if config.max_clients is not None and not 1 <= config.max_clients <= 65_536:
        raise bad("max_clients", "must be between 1 and 65536")
    group = config.socket_group
    if isinstance(group, str) and group.isascii() and group.isdigit():
        group = int(group)
    if isinstance(group, int) and not 0 <= group <= _GID_MAX:
        raise bad("socket_group", f"must be a group name or id (0 to {_GID_MAX}), got {group}")
    if isinstance(group, str) and (not group or "\0" in group or "/" in group or ":" in group):
        raise bad("socket_group", f"must be a group name or id, got {group!r}")
    if config.socket_mode is not None and not _MODE.fullmatch(config.socket_mode):
        raise bad(
            "socket_mode", f'must be an octal mode such as "0660", got {config.socket_mode!r}'
        )
    if config.nfd_features_file is not None:
        name = os.path.basename(config.nfd_features_file)
        if not name or name.startswith("."):
            # NFD skips dot files (our temporary files are dot files for that reason).
            raise bad("nfd_features_file", "must name a file whose name does not start with '.'")
    if config.metrics_listen is not None:
        try:
            parse_listen(config.metrics_listen)
        except ListenAddressError as error:
            raise bad("metrics_listen", str(error)) from None


def _check_host_view(path: str, config: ConfigFile, options: Mapping[str, Any]) -> None:
    """The host view's keys must name what exists, as their options must (`--proc DIR`).

    Otherwise a typo scans an empty host: a map saying "driver not loaded". Only the values
    the file supplies are checked here; the command line checks its own.
    """
    for key, is_kind, kind in (
        ("root", os.path.isdir, "not a directory"),
        ("proc", os.path.isdir, "not a directory"),
        ("sys", os.path.isdir, "not a directory"),
        ("mountinfo", os.path.isfile, "no such file"),
    ):
        value = getattr(config, key)
        if options.get(key) is None and value is not None and not is_kind(value):
            raise ConfigError(f"config {path}: key {key!r}: {value}: {kind}")


def _check_socket_group(path: str, group: str | int | None) -> None:
    """A group name must exist here: found now, not when the socket is bound (exit 1 then,
    which systemd retries in vain). A number is taken as it is, as chown(1) takes it."""
    if not isinstance(group, str) or (group.isascii() and group.isdigit()):
        return
    try:
        grp.getgrnam(group)
    except KeyError:
        raise ConfigError(
            f"config {path}: key 'socket_group': no such group {group!r} (name an existing "
            "group or give its number)"
        ) from None


def resolve_settings(
    options: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Merge command-line `options` (None = not given), the config file and defaults."""
    config_path = options.get("config")
    config = load_config_file(config_path or DEFAULT_CONFIG, required=config_path is not None)

    def pick(key: str, default: Any) -> Any:
        given = options.get(key)
        if given is not None:
            return given
        from_file = getattr(config, key)
        return from_file if from_file is not None else default

    _check_host_view(config_path or DEFAULT_CONFIG, config, options)
    _check_socket_group(config_path or DEFAULT_CONFIG, config.socket_group)
    socket = options.get("socket") or environ.get(SOCKET_ENV) or config.socket or DEFAULT_SOCKET
    driver_roots = config.driver_roots
    mountinfo = pick("mountinfo", "/proc/self/mountinfo")
    view = HostView(
        # Resolved once: mount points in the table are real paths, so a --root reached
        # through a symlink would otherwise match no mount at all.
        root=os.path.realpath(pick("root", "/")),
        proc=pick("proc", "/proc"),
        sys=pick("sys", "/sys"),
        mountinfo=mountinfo,
        foreign_table=foreign_mount_table(mountinfo),
        driver_roots=tuple(driver_roots) if driver_roots is not None else DEFAULT_DRIVER_ROOTS,
        driver_roots_configured=driver_roots is not None,
        validations_dir=pick("validations_dir", DEFAULT_VALIDATIONS_DIR),
    )
    return Settings(
        view=view,
        socket=socket,
        debounce_ms=pick("debounce_ms", 20),
        log_level=pick("log_level", "info"),
        max_clients=pick("max_clients", 256),
        socket_mode=int(pick("socket_mode", "0660"), 8),
        socket_group=config.socket_group,
        allowed_uids=frozenset(config.allowed_uids) if config.allowed_uids is not None else None,
        allowed_gids=frozenset(config.allowed_gids) if config.allowed_gids is not None else None,
        config_path=config_path or DEFAULT_CONFIG,
        nfd_features_file=config.nfd_features_file,
        metrics_listen=(
            parse_listen(config.metrics_listen) if config.metrics_listen is not None else None
        ),
    )


# --- whose paths the mount table speaks in -----------------------------------------------

# The kernel writes the mount points of `/proc/PID/mountinfo` relative to PID's root. For this
# process (`/proc/self`, `/proc/thread-self`, our own pid) and for a plain file standing in for
# the table, they are our paths, and those under `--root` are translated by removing it. For
# another process they are that process's paths: in the container deployment (`--root /host
# --mountinfo /host/proc/1/mountinfo`) the host's init lists host paths while the files are
# reached under `/host`, two different prefixes. A few readlinks, done once per host view.
# <procfs>/<pid>/mountinfo or <procfs>/<pid>/task/<tid>/mountinfo, once links are resolved.
_PROC_TABLE = re.compile(r"(?P<proc>/.*)/(?P<pid>[0-9]+)(?:/task/[0-9]+)?/mountinfo")


def foreign_mount_table(mountinfo: str) -> bool:
    """Whether `mountinfo` is the table of another process than this one.

    `self` and `thread-self` are links to our own entries, so resolving the path turns them
    into our pid. The pid is compared with what `<procfs>/self` names in that same procfs,
    which is right even for a procfs of another PID namespace; where `self` does not resolve
    there (we are not in that namespace), the table cannot be ours. A path that is not a
    procfs entry is a plain file standing in for our table.
    """
    found = _PROC_TABLE.fullmatch(os.path.realpath(mountinfo))
    if found is None:
        return False
    proc = found.group("proc")
    if not os.path.islink(os.path.join(proc, "self")):
        return False  # not a procfs: a fixture laid out like one
    try:
        ours = os.readlink(os.path.join(proc, "self"))
    except OSError:
        return True
    return found.group("pid") != ours
