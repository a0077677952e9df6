"""Kernel event sources: each reports "something under X may have changed", nothing more."""

from watcher.sources.inotify import OVERFLOW, TreeWatcher
from watcher.sources.mounts import DEFAULT_MOUNTINFO, MountTableWatcher

__all__ = ["DEFAULT_MOUNTINFO", "OVERFLOW", "MountTableWatcher", "TreeWatcher"]
