"""Output formats for a map, working on plain JSON dicts so the lean client can use them.

Every text a person reads (the table, `watch`'s lines) passes through `contract.printable`:
paths and names come from the host and may hold terminal escapes. JSON escapes what its
encoder leaves raw (DEL, C1 controls, line separators, bidi overrides) as `\\uNNNN`, so it
stays valid JSON with the same values. `env` is left exact: its values are quoted for sh
(`shlex.quote`), and a sourced value must be the path itself.
"""

from __future__ import annotations

import json
import re
import shlex

from watcher.contract import CHANGE_WORDS, printable, summary_line

# Not `from typing import Any`: importing typing costs milliseconds at every client start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["as_env", "as_json", "as_json_line", "as_table", "describe_update", "env_name", "render"]

_NOT_NAME = re.compile(r"[^A-Z0-9]")
# What json.dumps(ensure_ascii=False) leaves raw and a terminal may act on or break a line at.
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _json_escaped(text: str) -> str:
    return _JSON_RAW.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def as_json(value: Any) -> str:
    return _json_escaped(json.dumps(value, indent=2, ensure_ascii=False))


def env_name(device_name: str) -> str:
    return "GDW_DEV_" + _NOT_NAME.sub("_", device_name.upper())


def as_env(device_map: dict[str, Any]) -> str:
    """Shell-sourceable lines; only valid devices get a GDW_DEV_ variable."""
    driver = device_map.get("driver") or {}

    def quote(value: object) -> str:
        return shlex.quote("" if value is None else str(value))

    lines = [
        f"GDW_GENERATION={quote(device_map.get('generation'))}",
        f"GDW_DRIVER_LOADED={'1' if driver.get('loaded') else '0'}",
        f"GDW_DRIVER_VERSION={quote(driver.get('version'))}",
        f"GDW_DRIVER_ROOT={quote(driver.get('root'))}",
        f"GDW_DEV_ROOT={quote(driver.get('dev_root'))}",
    ]
    lines.extend(
        f"{env_name(device['name'])}={quote(device['path'])}"
        for device in device_map.get("devices", [])
        if device.get("valid")
    )
    return "\n".join(lines)


def _columns(rows: list[list[str]]) -> list[str]:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _gpu_cell(gpu: dict[str, Any]) -> str:
    """The GPU's minor; a compute partition says which (its bus id, model and uuid are
    its physical GPU's, so the row would otherwise read as a second copy of that GPU)."""
    minor = "-" if gpu.get("minor") is None else str(gpu["minor"])
    partition = gpu.get("partition")
    return minor if partition is None else f"{minor} (partition {partition})"


def as_table(device_map: dict[str, Any]) -> str:
    """For people: the driver line, aligned devices and GPUs, then the problems."""
    driver = device_map.get("driver") or {}
    loaded = "loaded" if driver.get("loaded") else "NOT LOADED"
    lines = [
        f"driver {driver.get('version') or '?'} ({loaded})   "
        f"dev root {driver.get('dev_root') or '-'}   root {driver.get('root') or '-'}   "
        f"source {driver.get('source', '-')}   generation {device_map.get('generation')}",
    ]
    amd = device_map.get("amd") or {}
    devices = device_map.get("devices", [])
    gpus = device_map.get("gpus", [])
    # The AMD line and the FAMILY columns only on a host that has AMD: an NVIDIA host's
    # table is what it always was.
    mixed = bool(amd.get("loaded") or amd.get("dev_root")) or any(
        item.get("family", "nvidia") != "nvidia" for item in (*devices, *gpus)
    )
    if mixed:
        lines.append(
            f"amd kfd ({'loaded' if amd.get('loaded') else 'NOT LOADED'})   "
            f"dev root {amd.get('dev_root') or '-'}"
        )
    lines.append("")
    if devices:
        rows = [["NAME", "PATH", "KIND", "MAJ:MIN", "MODE", "VALID", "MOUNT"]]
        if mixed:
            rows[0].append("FAMILY")
        for device in devices:
            mount = device.get("mount")
            where = (
                f"{mount['fstype']} on {mount['mount_point']}{' (nodev)' if mount['nodev'] else ''}"
                if mount
                else "?"
            )
            rows.append(
                [
                    device["name"],
                    device["path"],
                    device["kind"],
                    f"{device['major']}:{device['minor']}",
                    device["mode"],
                    "yes" if device["valid"] else "NO",
                    where,
                    *([device.get("family", "nvidia")] if mixed else []),
                ]
            )
        lines.extend(_columns(rows))
    else:
        lines.append("no GPU device nodes found")
    if gpus:
        lines.append("")
        rows = [["GPU", "BUS ID", "MODEL", "UUID", "DEVICE", *(["FAMILY"] if mixed else [])]]
        rows.extend(
            [
                _gpu_cell(gpu),
                gpu.get("bus_id") or "-",
                gpu.get("model") or "-",
                gpu.get("uuid") or "-",
                gpu.get("device") or "-",
                *([gpu.get("family", "nvidia")] if mixed else []),
            ]
            for gpu in gpus
        )
        lines.extend(_columns(rows))
    problems = device_map.get("problems", [])
    lines.append("")
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines.extend(
            f"  {problem['severity']:<7}  {problem['code']}: {problem['message']}"
            for problem in problems
        )
    else:
        lines.append("no problems")
    return "\n".join(printable(line) for line in lines)


def render(device_map: dict[str, Any], fmt: str) -> str:
    if fmt == "env":
        return as_env(device_map)
    if fmt == "table":
        return as_table(device_map)
    return as_json(device_map)


def as_json_line(value: Any) -> str:
    return _json_escaped(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _summary(device_map: dict[str, Any]) -> str:
    driver = device_map.get("driver") or {}
    amd = device_map.get("amd") or {}
    devices = device_map.get("devices", [])
    # A map of an older daemon has no `family`: all its devices are NVIDIA's.
    nvidia = [device for device in devices if device.get("family", "nvidia") == "nvidia"]
    others = [device for device in devices if device.get("family") == "amd"]
    return summary_line(
        loaded=bool(driver.get("loaded")),
        version=driver.get("version"),
        dev_root=driver.get("dev_root"),
        devices=len(nvidia),
        invalid=sum(1 for device in nvidia if not device.get("valid")),
        severities=(problem.get("severity", "") for problem in device_map.get("problems", [])),
        amd_loaded=bool(amd.get("loaded")),
        amd_dev_root=amd.get("dev_root"),
        amd_devices=len(others),
        amd_invalid=sum(1 for device in others if not device.get("valid")),
    )


def _device_line(change: dict[str, Any], device: dict[str, Any] | None) -> str:
    verb = CHANGE_WORDS.get(change["change"], change["change"])
    line = f"{change['name']} {verb} {change['path']}"
    if device is not None and change["change"] != "removed":
        line += f" ({device['major']}:{device['minor']}, mode {device['mode']}"
        line += ")" if device.get("valid") else ", NOT valid)"
    return line


def describe_update(previous: dict[str, Any] | None, reply: dict[str, Any]) -> list[str]:
    """Lines a person watching the daemon reads: what appeared, went, broke or healed."""
    return [printable(line) for line in _update_lines(previous, reply)]


def _update_lines(previous: dict[str, Any] | None, reply: dict[str, Any]) -> list[str]:
    current = reply["map"]
    generation = reply["generation"]
    if previous is None:
        return [f"generation {generation}: {_summary(current)}"]
    by_name = {device["name"]: device for device in current.get("devices", [])}
    lines = [
        f"generation {generation}: {_device_line(change, by_name.get(change['name']))}"
        for change in reply.get("changes", [])
    ]

    def keyed(device_map: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {
            (problem["code"], problem.get("path") or ""): problem
            for problem in device_map.get("problems", [])
        }

    before, after = keyed(previous), keyed(current)
    lines.extend(
        f"generation {generation}: {problem['severity']} {problem['code']}: {problem['message']}"
        for key, problem in after.items()
        if key not in before
    )
    lines.extend(
        f"generation {generation}: resolved {problem['code']} ({problem.get('path') or '-'})"
        for key, problem in before.items()
        if key not in after
    )
    if previous.get("driver") != current.get("driver") or previous.get("amd") != current.get("amd"):
        lines.append(f"generation {generation}: {_summary(current)}")
    return lines or [f"generation {generation}: {_summary(current)}"]
