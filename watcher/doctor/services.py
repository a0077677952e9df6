"""The container runtimes' systemd services as their unit files describe them: present or
not, and the `PATH` they give the processes they start (so the CRIU they run, and the
`cuda-checkpoint` that CRIU's plugin runs)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from watcher.doctor.host import SERVICE_PATH, HostTree

__all__ = ["UNIT_DIRS", "Service", "parse_environment", "read_service"]

# systemd's unit search path for the system manager, highest priority first.
UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
)


@dataclass(frozen=True)
class Service:
    name: str
    unit: str | None  # the unit file in effect (host path); None: no such service
    path_env: str  # the PATH its processes get
    path_from: str  # where that PATH was set ("systemd's default" or a file)
    exec_start: str | None = None


def parse_environment(value: str) -> dict[str, str]:
    """One `Environment=` value: space-separated KEY=VALUE, each maybe quoted."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    pairs = {}
    for word in words:
        key, equals, setting = word.partition("=")
        if equals and key:
            pairs[key] = setting
    return pairs


def _service_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] section, continuation lines joined."""
    lines: list[tuple[str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service":
            key, equals, value = line.partition("=")
            if equals:
                lines.append((key.strip(), value.strip()))
    return lines


def read_service(host: HostTree, name: str) -> Service:
    """The unit file in effect for `name`.service and its drop-ins, in systemd's order."""
    unit_name = f"{name}.service"
    unit = next((f"{d}/{unit_name}" for d in UNIT_DIRS if host.is_file(f"{d}/{unit_name}")), None)
    if unit is None:
        return Service(name, None, SERVICE_PATH, "systemd's default")
    # Drop-ins from every directory, applied in the order of their file names; one of the
    # same name in a directory of higher priority hides the others.
    dropins: dict[str, str] = {}
    for directory in reversed(UNIT_DIRS):
        for file in host.listdir(f"{directory}/{unit_name}.d"):
            if file.endswith(".conf"):
                dropins[file] = f"{directory}/{unit_name}.d/{file}"
    path_env, path_from, exec_start = SERVICE_PATH, "systemd's default", None
    for source in [unit, *(dropins[file] for file in sorted(dropins))]:
        text, _ = host.read_text(source)
        for key, value in _service_lines(text or ""):
            if key == "Environment":
                if not value:
                    path_env, path_from = SERVICE_PATH, "systemd's default"
                elif "PATH" in (pairs := parse_environment(value)):
                    path_env, path_from = pairs["PATH"], source
            elif key == "ExecStart" and value:
                command = value.lstrip("-@:+!")
                exec_start = command.split()[0] if command.split() else None
    return Service(name, unit, path_env, path_from, exec_start)
