"""The names and rules every entry point shares, in one stdlib-only module.

The lean entry points (the socket client, the CRIU action) must not import msgspec, anyio or
asyncio, so they could not take these from the heavy modules; before this module each kept
its own copy. Everything here imports only `os` and `stat` (both loaded by the interpreter
at start-up), so importing it costs the lean paths nothing measurable.
"""

from __future__ import annotations

import os
import stat

# Not `from typing import ...`: typing costs milliseconds at every start of the CRIU action.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "CHANGE_WORDS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "DEFAULT_SOCKET",
    "LABEL_NAMESPACE",
    "MOUNT_EVENTS_ENV",
    "PREFIX",
    "RECORD_NAME",
    "RECORD_VERSION",
    "SCAN_DEADLINE_ENV",
    "SOCKET_ENV",
    "config_file_problem",
    "escape_char",
    "file_kind",
    "gfd_product_label",
    "printable",
    "socket_path",
    "summary_line",
    "utc_timestamp",
]

# --- names -----------------------------------------------------------------------------------

DEFAULT_SOCKET = "/run/gpu-device-watcher/gpu-device-watcher.sock"
"""Where `serve` listens and clients connect unless told otherwise."""
SOCKET_ENV = "GPU_DEVICE_WATCHER_SOCKET"
"""Overrides the default socket, for the server and every client (the CRIU action included)."""
DEFAULT_CONFIG = "/etc/gpu-device-watcher/config.toml"
"""The config file; absent means defaults."""
CONFIG_ENV = "GPU_DEVICE_WATCHER_CONFIG"
"""Names another config for the CRIU action, which CRIU starts with no arguments."""
MOUNT_EVENTS_ENV = "GPU_DEVICE_WATCHER_MOUNT_EVENTS"
"""How the daemon judges mount changes: `auto`, `fanotify` or `mountinfo` (docs/map.md)."""
SCAN_DEADLINE_ENV = "GPU_DEVICE_WATCHER_SCAN_DEADLINE"
"""Seconds after which a scan under way is reported stuck (default 10; docs/reliability.md)."""

RECORD_NAME = "gpu-device-watcher.json"
"""The record `pre-dump` writes into CRIU's image directory."""
RECORD_VERSION = 2
"""The record format version written (and read) by this version."""

PREFIX = "gpu-device-watcher:"
"""Every line printed for a person (stderr, CRIU's log) starts with this."""

LABEL_NAMESPACE = "gpu-device-watcher.feature.node.kubernetes.io/"
"""The node labels' namespace: a sub-namespace of Node Feature Discovery's own, which every NFD
release since 0.9 accepts without configuration (names without a namespace are deprecated)."""


def socket_path(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """The socket to use: the one named explicitly, else the environment's, else the default."""
    return explicit or environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# --- label values ----------------------------------------------------------------------------

_GFD_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_. ")
_LABEL_VALUE_MAX = 63


def gfd_product_label(model: str) -> str:
    """A GPU model as GPU Feature Discovery writes `nvidia.com/gpu.product`.

    Characters outside `A-Za-z0-9-_. ` are removed and each run of spaces becomes one `-`
    (`NVIDIA H100 80GB HBM3` -> `NVIDIA-H100-80GB-HBM3`), so that a node selector may combine
    our `gpu-model` label with GFD's. Then it is made a valid Kubernetes label value, which
    GFD's value always is for real model names: cut to 63 characters, non-alphanumeric ends
    trimmed. The node labels and `inspect` both use this, so a checkpoint's affinity names
    exactly the value its node was labelled with. "" when nothing survives.
    """
    kept = "".join(char for char in model if char in _GFD_KEPT)
    value = "-".join(part for part in kept.split(" ") if part)
    value = value[:_LABEL_VALUE_MAX]
    start, end = 0, len(value)
    while start < end and not value[start].isalnum():
        start += 1
    while end > start and not value[end - 1].isalnum():
        end -= 1
    return value[start:end]


# --- the config file safety rule ---------------------------------------------------------------


def config_file_problem(
    path: str, info: os.stat_result, own_uid: int | None = None
) -> tuple[str, str] | None:
    """(why a config file must not be trusted, the command that fixes it), or None.

    The daemon and the CRIU action run as root and a config can relax what they check
    (`restore_version_match`, `allowed_uids`), so only root and the reader's own user may be
    able to write it: the owner is root or `own_uid` (default: the effective uid), and
    nobody else can write it (no write for others, nor for a group other than root's).
    Pass the fstat() of the file that was read: the path looked up again could name another
    file by then (swapped in a directory others can write).
    """
    owner = os.geteuid() if own_uid is None else own_uid
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (0, owner):
        return (
            f"config {path} is owned by another user (uid {info.st_uid})",
            f"only root or uid {owner} may own it; run: chown root {path}",
        )
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and info.st_gid != 0):
        return (
            f"config {path} is writable by others (mode {mode:04o})",
            f"only its owner and root may write it; run: chmod go-w {path}",
        )
    return None


# --- wording -----------------------------------------------------------------------------------

CHANGE_WORDS = {"added": "appeared at", "removed": "disappeared from", "changed": "changed at"}
"""How a change of the map reads in logs and `watch`: "nvidia0 appeared at /dev/nvidia0"."""


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words, for the one-line refusals of the
    host files the scan reads and of the CRIU record."""
    if stat.S_ISLNK(mode):
        return "a symlink (not followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def escape_char(char: str) -> str:
    """One character as an escape a person can read: `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`
    (a backslash as `\\\\`)."""
    if char == "\\":
        return "\\\\"
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` fit for a terminal and a log line: every character that is not printable
    (control characters, C1 controls such as CSI, line and paragraph separators, format
    characters such as bidi overrides) as an escape; printable non-ASCII text stays.

    Host data (a path named by driver-ready, a GPU's model) reaches tables, `watch`, `status`
    and the daemon's log; unescaped, an ESC sequence in it would drive the reader's terminal
    and a line break would forge a line.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else escape_char(char) for char in text)


def utc_timestamp(now: float | None = None) -> str:
    """`2026-11-28T20:40:00.123456Z`: the map's `updated` and the record's `created`.

    With `time` alone (a builtin module): `datetime` costs the CRIU action milliseconds.
    """
    import time  # noqa: PLC0415 (builtin: nothing to read from disk)

    if now is None:
        now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1e6)  # truncated, as datetime.isoformat() does
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def summary_line(
    *,
    loaded: bool,
    version: str | None,
    dev_root: str | None,
    devices: int,
    invalid: int,
    severities: Iterable[str],
    amd_loaded: bool = False,
    amd_dev_root: str | None = None,
    amd_devices: int = 0,
    amd_invalid: int = 0,
) -> str:
    """The one-line summary of a map (systemd STATUS=, the daemon's log, `watch`).

    "driver 580.95.05, 4 devices in /run/nvidia/driver/dev, 1 warning"; `devices` and
    `invalid` count NVIDIA's. AMD is named only on a host that has it ("AMD kfd loaded,
    2 AMD devices in /dev"), and NVIDIA is left out on a host that has AMD and no NVIDIA.
    """
    head = f"driver {printable(version or '(unknown version)')}" if loaded else "driver not loaded"
    if dev_root:
        where = f"{devices} devices in {printable(dev_root)}"
        if invalid:
            where += f" ({invalid} not valid)"
    else:
        where = "no device root"
    parts = [head, where]
    if amd_loaded or amd_dev_root:
        if not (loaded or dev_root):
            parts = []
        parts.append("AMD kfd loaded" if amd_loaded else "AMD kfd not loaded")
        if amd_dev_root:
            amd_where = f"{amd_devices} AMD devices in {printable(amd_dev_root)}"
            parts.append(amd_where + (f" ({amd_invalid} not valid)" if amd_invalid else ""))
        else:
            parts.append("no AMD device root")
    counts: dict[str, int] = {}
    for severity in severities:
        counts[severity] = counts.get(severity, 0) + 1
    troubles = ", ".join(
        f"{count} {severity}{'s' if count > 1 else ''}"
        for severity in ("error", "warning")
        if (count := counts.get(severity, 0))
    )
    return ", ".join(part for part in (*parts, troubles) if part)
