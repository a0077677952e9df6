"""Telling the cluster: node labels (Node Feature Discovery) and Prometheus metrics.

`Publisher` is what the daemon starts; the rest is its parts: `labels` (pure: label values
from a map, `cuda-checkpoint` included: the map's `driver.cuda_checkpoint`), `nfd` (the
atomic feature file), `metrics` (the collector and the HTTP endpoint).

`Publisher` is imported on first use: it needs anyio, and `labels` alone (which `doctor`
uses) should not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watcher.publish.publisher import Publisher

__all__ = ["Publisher"]


def __getattr__(name: str) -> Any:
    if name == "Publisher":
        from watcher.publish.publisher import Publisher  # noqa: PLC0415

        return Publisher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
