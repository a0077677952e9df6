"""Looking things up in a map as JSON (what clients get)."""

from __future__ import annotations

from typing import Any

__all__ = ["Map", "device", "names", "problem_codes"]

Map = dict[str, Any]


def device(device_map: Map, name: str) -> dict[str, Any] | None:
    return next((d for d in device_map["devices"] if d["name"] == name), None)


def names(device_map: Map) -> list[str]:
    return [d["name"] for d in device_map["devices"]]


def problem_codes(device_map: Map) -> list[tuple[str, str | None]]:
    return [(p["code"], p.get("path")) for p in device_map["problems"]]
