"""The files of a fake host: what `/proc/devices` says, character nodes, sysfs render nodes.

Kept importable from here; the code lives in `tests.support.host`, the one host builder.
"""

from __future__ import annotations

from tests.support.host import drm_render, make_nodes, mknod, proc_devices_text

__all__ = ["drm_render", "make_nodes", "mknod", "proc_devices_text"]
