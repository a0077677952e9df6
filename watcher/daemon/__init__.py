"""The daemon behind `serve`, in parts with one job each.

- `scheduler`: when to rescan (debounce, spacing, re-arm ordering, throttled `rescan`).
- `judge`: which mount-table changes can move the map (mountinfo, fanotify; statmount next).
- `lifecycle`: what systemd hears (READY, STATUS, RELOADING, STOPPING, watchdog, signals).
- `scanning`: one scan as the daemon runs it; watch targets, mount filter, event filter.
- `service`: the `Daemon`: events -> scheduler -> scan -> published generation; reload.
- `compose`: `run()`, the composition root: environment, socket, real sources, wiring.
"""

from __future__ import annotations

from watcher.daemon.compose import real_sources, run
from watcher.daemon.judge import MOUNT_EVENTS_MODES
from watcher.daemon.scanning import mount_filter, summary
from watcher.daemon.service import Daemon, Sources

# The old private name, still imported by tests of the mount filter.
_mount_filter = mount_filter

__all__ = [
    "MOUNT_EVENTS_MODES",
    "Daemon",
    "Sources",
    "mount_filter",
    "real_sources",
    "run",
    "summary",
]
