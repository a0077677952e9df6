"""The checks `daemon`, `map` and `labels`: what the daemon serves and the node advertises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from watcher.doctor.model import Check, fail, ok, skip, warn

__all__ = [
    "DaemonFacts",
    "LabelFacts",
    "check_daemon",
    "check_labels",
    "check_map",
    "families_present",
]

START_DAEMON = "systemctl enable --now gpu-device-watcher.socket gpu-device-watcher.service"


@dataclass(frozen=True)
class DaemonFacts:
    socket: str
    status: dict[str, Any] | None
    # Why the daemon did not answer (None when it did).
    unreachable: str | None


def check_daemon(facts: DaemonFacts) -> Check:
    if facts.status is None and facts.unreachable is None:
        return skip(
            "daemon",
            "not asked: the host view given on the command line need not be the daemon's, so "
            f"the map is a direct scan (--socket {facts.socket} asks it)",
        )
    if facts.status is None:
        return warn(
            "daemon",
            f"no daemon at {facts.socket} ({facts.unreachable}); this report used a direct "
            "scan, and the installed CRIU action refuses restores of GPU checkpoints without it",
            f"{START_DAEMON}   (Kubernetes: kubectl -n gpu-device-watcher get pods -o wide)",
        )
    status = facts.status
    return ok(
        "daemon",
        f"running at {facts.socket}: version {status.get('version')}, generation "
        f"{status.get('generation')}, up {status.get('uptime_s')} s",
    )


def families_present(device_map: dict[str, Any]) -> tuple[bool, bool]:
    """(NVIDIA, AMD): whether the map shows any sign of each family on this host."""
    driver = device_map.get("driver") or {}
    amd = device_map.get("amd") or {}
    families = {
        item.get("family", "nvidia")
        for key in ("devices", "gpus")
        for item in device_map.get(key) or []
    }
    nvidia = bool(driver.get("loaded")) or "nvidia" in families
    return nvidia, bool(amd.get("loaded")) or "amd" in families


def check_map(
    device_map: dict[str, Any], *, from_daemon: bool, nvidiactl_in_dev: bool = False
) -> Check:
    source = "the daemon's map" if from_daemon else "a direct scan"
    nvidia, amd = families_present(device_map)
    driver = device_map.get("driver") or {}
    problems = device_map.get("problems") or []
    errors = [p for p in problems if p.get("severity") == "error"]
    warnings = [p for p in problems if p.get("severity") == "warning"]
    parts = []
    if nvidia:
        parts.append(
            f"NVIDIA driver {driver.get('version') or '(version unknown)'}"
            f"{'' if driver.get('loaded') else ' not loaded'}, dev root {driver.get('dev_root')}"
        )
    if amd:
        parts.append(f"AMD kfd, dev root {(device_map.get('amd') or {}).get('dev_root')}")
    gpus = len(device_map.get("gpus") or [])
    devices = device_map.get("devices") or []
    valid = sum(1 for device in devices if device.get("valid"))
    found = (
        f"{source}: {'; '.join(parts) or 'no GPU driver'}; {gpus} GPUs, "
        f"{valid}/{len(devices)} devices valid"
    )
    if warnings and not errors and nvidiactl_in_dev:
        # The GPU Operator's layout (nodes only under its driver root) is what the map warns
        # of; with /dev/nvidiactl there (a link to the driver root's) CRIU's CUDA plugin, the
        # one part of the chain that opens a fixed path, finds what it looks for.
        warnings = [p for p in warnings if p.get("code") != "not-in-dev"]
        if not warnings:
            return ok("map", f"{found}; not-in-dev, but /dev/nvidiactl is there for CRIU")
    if errors or warnings:
        worst = (errors or warnings)[0]
        codes = ", ".join(sorted({f"{p['code']} ({p['severity']})" for p in errors + warnings}))
        text = f"{found}; problems: {codes}"
        # The map's messages name what to do; the worst one is the fix to start with.
        fix = f"{worst.get('message')}" + (f" [{worst['path']}]" if worst.get("path") else "")
        return (fail if errors else warn)("map", text, fix)
    return ok("map", found)


@dataclass(frozen=True)
class LabelFacts:
    features_file: str | None
    # The file's name=value lines as read, or None with `why`.
    written: dict[str, str] | None
    why: str | None
    # The labels of the map now; None when the map could not be read as one (`why` says).
    expected: dict[str, str] | None


def parse_feature_file(text: str) -> dict[str, str]:
    labels = {}
    for line in text.splitlines():
        name, equals, value = line.strip().partition("=")
        if equals and name and not name.startswith("#"):
            labels[name] = value
    return labels


def _short(label: str) -> str:
    """A label's name without its namespace (`.../driver-version` -> `driver-version`)."""
    return label.rpartition("/")[2].removeprefix("gpu-device-watcher.")


def check_labels(facts: LabelFacts) -> Check:
    if facts.features_file is None:
        return skip("labels", "node labels are not configured (no nfd_features_file in the config)")
    if facts.written is None and facts.why == "Permission denied":
        return skip("labels", f"{facts.features_file}: cannot be read here ({facts.why})")
    if facts.expected is None:
        return skip("labels", f"cannot tell the labels of the map now: {facts.why}")
    if facts.written is None:
        return fail(
            "labels",
            f"{facts.features_file}: {facts.why}; Node Feature Discovery has no labels of ours",
            f"{START_DAEMON}   (the daemon writes the file; check its log: "
            "journalctl -u gpu-device-watcher)",
        )
    expected = facts.expected
    stale = sorted(
        name
        for name in set(facts.written) | set(expected)
        if facts.written.get(name) != expected.get(name)
    )
    if stale:
        shown = ", ".join(
            f"{_short(name)}={facts.written.get(name)!s} (now {expected.get(name)!s})"
            for name in stale
        )
        return warn(
            "labels",
            f"{facts.features_file} is stale: {shown}",
            "systemctl restart gpu-device-watcher   (the daemon rewrites the file on every change "
            "of the map; a stale file means it is not running or cannot write there)",
        )
    ready = next(
        (value for name, value in expected.items() if name.endswith("checkpoint-ready")),
        None,
    )
    return ok(
        "labels",
        f"{facts.features_file} is current ({len(facts.written)} labels, checkpoint-ready={ready})",
    )
