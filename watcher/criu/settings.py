"""The few config keys the CRIU action reads, with tomllib alone.

The daemon validates the whole file (watcher.config, which needs msgspec); the action must
stay light, reads only `restore_version_match`, `dump_checks`, `proc` and `sys`, and only
when they can matter (tomllib and its imports cost milliseconds). Anything doubtful (an unsafe,
unreadable or invalid file, an unknown value) keeps the default and says why in CRIU's log.
"""

from __future__ import annotations

import os

from watcher.contract import CONFIG_ENV, DEFAULT_CONFIG, config_file_problem
from watcher.criu.text import say, shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

VERSION_POLICIES = ("exact", "major")
DUMP_CHECKS = ("warn", "refuse")

_cache: dict[str, dict[str, object]] = {}


def config_path(environ: Mapping[str, str]) -> tuple[str, bool]:
    """(path, named explicitly): the config the action reads."""
    explicit = environ.get(CONFIG_ENV)
    return (explicit, True) if explicit else (DEFAULT_CONFIG, False)


def _load(environ: Mapping[str, str]) -> dict[str, object]:
    """The config's top-level table; {} when there is none or it cannot be trusted."""
    path, explicit = config_path(environ)
    if path in _cache:
        return _cache[path]
    config: dict[str, object] = {}
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            # The daemon's rule: a file another user owns or can write must not relax a
            # safety check run as root.
            if (unsafe := config_file_problem(shown(path), info)) is not None:
                say(f"{unsafe[0]}; ignoring it")
            else:
                # Only for a file that is there: tomllib and its imports (re, typing,
                # datetime) cost ~6 ms, more than the rest of a stage.
                import tomllib  # noqa: PLC0415

                config = tomllib.load(file)
    except FileNotFoundError:
        if explicit:
            say(f"config {shown(path)} (from {CONFIG_ENV}) does not exist; using the defaults")
    # tomllib.TOMLDecodeError is a ValueError.
    except (OSError, ValueError) as error:
        say(f"cannot read config {shown(path)} ({shown(error)}); using the defaults")
    _cache[path] = config
    return config


def _choice(environ: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    value = _load(environ).get(key, allowed[0])
    if value not in allowed:
        path, _ = config_path(environ)
        choices = " or ".join(f'"{choice}"' for choice in allowed)
        say(
            f'config {shown(path)}: key "{key}" must be {choices}, got {shown(repr(value))}; '
            f'using "{allowed[0]}"'
        )
        return allowed[0]
    return str(value)


def version_policy(environ: Mapping[str, str]) -> str:
    """`restore_version_match`: "exact" (the default) or "major"."""
    return _choice(environ, "restore_version_match", VERSION_POLICIES)


def dump_checks(environ: Mapping[str, str]) -> str:
    """`dump_checks`: "warn" (the default) or "refuse"."""
    return _choice(environ, "dump_checks", DUMP_CHECKS)


def proc_dir(environ: Mapping[str, str]) -> str:
    """`proc` of the host view: where `driver/nvidia/capabilities` is read."""
    value = _load(environ).get("proc")
    return value if isinstance(value, str) and value.startswith("/") else "/proc"


def sys_dir(environ: Mapping[str, str]) -> str:
    """`sys` of the host view: where a render node's driver is read without the daemon."""
    value = _load(environ).get("sys")
    return value if isinstance(value, str) and value.startswith("/") else "/sys"
