"""This host's map: from the daemon, or from a direct scan when the daemon cannot answer."""

from __future__ import annotations

from watcher.criu.settings import config_path
from watcher.criu.text import say, shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# Long enough for a daemon busy rescanning a 10,000-mount table, short enough that a hung
# daemon delays a dump by seconds, not minutes (the direct scan then takes over).
DAEMON_TIMEOUT_S = 5.0


def current_map(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(generation, map) from the daemon; a direct scan (generation 0) when it cannot answer."""
    from watcher import client  # noqa: PLC0415 (only the stages that need it pay for it)

    path = client.socket_path(environ.get(client.SOCKET_ENV))
    try:
        reply = client.request(path, {"op": "get"}, timeout=DAEMON_TIMEOUT_S)
        generation, device_map = reply["generation"], reply["map"]
        if not isinstance(generation, int) or not isinstance(device_map, dict):
            raise TypeError("the reply holds no map")  # noqa: TRY301 (same fallback as below)
    except (client.Unreachable, client.ServerError) as error:
        say(f"{shown(error, 400)}; scanning this host directly instead")
        return direct_scan(environ)
    except (ValueError, KeyError, TypeError) as error:
        say(
            f"the daemon at {shown(path)} sent a reply that is not a map ({shown(error)}); "
            "scanning directly"
        )
        return direct_scan(environ)
    return generation, device_map


def direct_scan(environ: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    # The fallback is allowed to be heavy: it runs only when the daemon is down.
    import msgspec  # noqa: PLC0415

    from watcher.config import ConfigError, resolve_settings  # noqa: PLC0415
    from watcher.core.scan import HostView  # noqa: PLC0415
    from watcher.probe import scan  # noqa: PLC0415

    path, explicit = config_path(environ)
    try:
        view = resolve_settings({"config": path if explicit else None}, environ).view
    except ConfigError as error:
        say(f"{shown(error, 400)}; scanning with the default host view")
        view = HostView()
    # Through JSON, not to_builtins (which keeps tuples): the same shape the daemon sends.
    device_map: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(scan(view, generation=0)))
    return 0, device_map
