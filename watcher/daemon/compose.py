"""`serve`: the composition root. Reads what systemd handed over, binds the socket, builds
the parts and runs them; nothing here decides anything about maps or events."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace

import anyio

from watcher.config import Settings
from watcher.contract import MOUNT_EVENTS_ENV, SCAN_DEADLINE_ENV
from watcher.daemon import logs
from watcher.daemon.judge import mount_events_mode
from watcher.daemon.lifecycle import Lifecycle
from watcher.daemon.scanning import event_filter, uevent_interest, watched_subdirs
from watcher.daemon.scanthread import parse_deadline
from watcher.daemon.service import Daemon, Sources
from watcher.daemon.systemd import ActivatedSocket, Notifier, listen_fds, watchdog_interval
from watcher.errors import SocketSetupError
from watcher.server import bind_unix_socket, unlink_socket
from watcher.sources.inotify import TreeWatcher
from watcher.sources.mounts import MountTableWatcher
from watcher.sources.uevents import UeventSource

__all__ = ["real_sources", "run"]

log = logging.getLogger("watcher.daemon")


def real_sources(environ: Mapping[str, str]) -> Sources:
    """The kernel's event sources: inotify for directories, epoll (and fanotify) for mounts,
    netlink for uevents."""
    return Sources(
        tree=TreeWatcher(subdirs=watched_subdirs(), names=event_filter()),
        mount_table=MountTableWatcher,
        mount_events=mount_events_mode(environ.get(MOUNT_EVENTS_ENV)),
        uevents=UeventSource(uevent_interest()),
    )


def run(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    environ: Mapping[str, str] = os.environ,
) -> int:
    """`serve`: run until SIGTERM/SIGINT; 0 on a clean stop.

    `reload_settings` reads the config again with the same command-line options, for SIGHUP.
    """
    logs.setup(settings.log_level, environ)
    try:
        # What systemd handed us is checked before anything starts: a malformed variable
        # is one log line and exit 1, not a traceback from deep inside the event loop.
        interval = watchdog_interval(environ)
        notifier = Notifier.from_env(environ)
        activated = listen_fds()
        scan_deadline_s = parse_deadline(environ.get(SCAN_DEADLINE_ENV))
    except ValueError as error:
        logs.fatal(str(error), environ)
        return 1
    if activated:
        listener, settings = _take_activated(activated, settings)
        owned_inode: int | None = None
    else:
        try:
            bound = bind_unix_socket(settings.socket, settings.socket_mode, settings.socket_group)
        except SocketSetupError as error:
            logs.fatal(str(error), environ)
            return 1
        listener, owned_inode = bound, bound.inode
    try:
        daemon = Daemon(
            settings,
            Lifecycle(notifier, watchdog_s=interval),
            reload_settings,
            real_sources(environ),
            socket_activated=bool(activated),
            scan_deadline_s=scan_deadline_s,
        )
        anyio.run(daemon.serve, listener)
    finally:
        listener.close()
        if owned_inode is not None:
            unlink_socket(settings.socket, owned_inode)
        notifier.close()
    return 0


def _take_activated(
    activated: list[ActivatedSocket], settings: Settings
) -> tuple[socket.socket, Settings]:
    """The socket systemd passed (LISTEN_FDS), and the settings naming it."""
    listener = activated[0].socket
    for extra in activated[1:]:
        # One listening socket is served; holding the others would leave their clients
        # hanging in a backlog nobody accepts from.
        log.warning("ignoring extra socket passed by systemd (%s)", extra.name)
        extra.socket.close()
    # The contract: an activated socket wins over --socket, the environment and the config.
    # Name it as it is, so logs and a reload speak of the socket really served.
    address = listener.getsockname()
    if isinstance(address, str) and address:
        settings = replace(settings, socket=address)
    log.info("using the socket passed by systemd (%s): %s", activated[0].name, address)
    return listener, settings
