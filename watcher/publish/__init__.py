"""Telling the cluster: node labels (Node Feature Discovery) and Prometheus metrics.

`Publisher` is what the daemon starts; the rest is its parts: `labels` (pure: label values
from a map, `cuda-checkpoint` included: the map's `driver.cuda_checkpoint`), `nfd` (the
atomic feature file), `metrics` (the collector and the HTTP endpoint).
"""

from watcher.publish.publisher import Publisher

__all__ = ["Publisher"]
