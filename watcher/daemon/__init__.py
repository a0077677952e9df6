"""The daemon behind `serve`, in parts with one job each.

- `scheduler`: when to rescan (debounce, spacing, re-arm ordering, throttled `rescan`).
- `judge`: which mount-table changes can move the map (mountinfo, fanotify; statmount next).
- `lifecycle`: what systemd hears (READY, STATUS, RELOADING, STOPPING, watchdog, signals).
- `scanning`: one scan as the daemon runs it; watch targets, mount filter, event filter.
- `service`: the `Daemon`: events -> scheduler -> scan -> published generation; reload.
- `compose`: `run()`, the composition root: environment, socket, real sources, wiring.
- `state`: the one live map (`MapState`) and the counters, read by the server and publishers.
- `systemd`, `logs`: sd_notify and socket activation; the log formats.
- `scanthread`: the scan's own thread and its watchdog.

Nothing is imported here: the server and the publishers import `state` without pulling in
the daemon's composition (which imports them).
"""
