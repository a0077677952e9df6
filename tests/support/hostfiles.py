"""The files of a fake host: what `/proc/devices` says, character nodes, sysfs render nodes.

Kept importable from here; the code lives in `tests.support.host`, the one host builder.
"""

from __future__ import annotations

from tests.support.host import (
    drm_partition,
    drm_render,
    kfd_node,
    make_nodes,
    mknod,
    partitioned_gpu,
    proc_devices_text,
)

__all__ = [
    "drm_partition",
    "drm_render",
    "kfd_node",
    "make_nodes",
    "mknod",
    "partitioned_gpu",
    "proc_devices_text",
]
