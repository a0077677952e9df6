"""Whose paths a mount table speaks in: this process's, or another process's.

The kernel writes the mount points of `/proc/PID/mountinfo` relative to PID's root. For this
process (`/proc/self`, `/proc/thread-self`, our own pid) and for a plain file standing in
for the table, they are our paths, and those under `--root` are translated by removing it.
For another process they are that process's paths: in the container deployment
(`--root /host --mountinfo /proc/1/mountinfo`, host PID namespace) the host's init lists
host paths while the files are reached under `/host`, two different prefixes.

Standard library only; a few readlinks, done once when the host view is built.
"""

from __future__ import annotations

import os
import re

__all__ = ["foreign_mount_table"]

# <procfs>/<pid>/mountinfo or <procfs>/<pid>/task/<tid>/mountinfo, once links are resolved.
_PROC_TABLE = re.compile(r"(?P<proc>/.*)/(?P<pid>[0-9]+)(?:/task/[0-9]+)?/mountinfo")


def foreign_mount_table(mountinfo: str) -> bool:
    """Whether `mountinfo` is the table of another process than this one.

    `self` and `thread-self` are links to our own entries, so resolving the path turns them
    into our pid. The pid is compared with what `<procfs>/self` names in that same procfs,
    which is right even for a procfs of another PID namespace; where `self` does not resolve
    there (we are not in that namespace), the table cannot be ours. A path that is not a
    procfs entry is a plain file standing in for our table.
    """
    found = _PROC_TABLE.fullmatch(os.path.realpath(mountinfo))
    if found is None:
        return False
    proc = found.group("proc")
    if not os.path.islink(os.path.join(proc, "self")):
        return False  # not a procfs: a fixture laid out like one
    try:
        ours = os.readlink(os.path.join(proc, "self"))
    except OSError:
        return True
    return found.group("pid") != ours
