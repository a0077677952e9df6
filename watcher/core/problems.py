"""The problems a scan reports (the contract's codes), each with a message that names the
fix. Pure.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from watcher.core.devices import (
    Family,
)
from watcher.core.model import (
    FamilyName,
    Problem,
    ProblemCode,
    Severity,
)
from watcher.core.nodes import NodeCheck
from watcher.core.procfs import GpuInformation
from watcher.core.snapshot import Candidate, DevRootListing, HostSnapshot, HostView, family_listing

__all__ = [
    "Problems",
    "check_validations",
    "driver_root_problems",
    "missing_nodes",
    "mount_table_problems",
    "neither",
    "no_device_root",
    "not_in_dev",
    "not_loaded",
]


class Problems:
    def __init__(self, family: FamilyName) -> None:
        self.items: list[Problem] = []
        self.family: FamilyName = family  # of the problems added next

    def add(
        self, code: ProblemCode, severity: Severity, message: str, path: str | None = None
    ) -> None:
        self.items.append(
            Problem(code=code, severity=severity, message=message, path=path, family=self.family)
        )

    def sorted(self) -> tuple[Problem, ...]:
        rank = {"error": 0, "warning": 1, "info": 2}
        return tuple(
            sorted(self.items, key=lambda p: (rank[p.severity], p.code, p.path or "", p.message))
        )


def not_loaded(view: HostView, snapshot: HostSnapshot, family: Family, problems: Problems) -> None:
    why = (
        f"cannot read {view.proc}/devices ({snapshot.proc_devices_error})"
        if snapshot.proc_devices_error
        else f"{view.proc}/devices lists {neither(family.core_majors)}"
    )
    problems.add(
        "driver-not-loaded",
        family.not_loaded_severity,
        f"the {family.display} kernel driver is not loaded: {why}; load it "
        f"({family.load_hint}) or wait for the driver container to finish starting",
    )


def mount_table_problems(view: HostView, snapshot: HostSnapshot, problems: Problems) -> None:
    if snapshot.mounts_error is not None:
        problems.add(
            "nodev-mount",
            "warning",
            f"cannot read the mount table {view.mountinfo} ({snapshot.mounts_error}): which "
            "mount holds each node, and whether it is nodev (opening fails then), is unknown; "
            "is --mountinfo right?",
        )
    elif snapshot.mounts.errors:
        errors = snapshot.mounts.errors
        problems.add(
            "nodev-mount",
            "warning",
            f"{len(errors)} line{'s' if len(errors) > 1 else ''} of the mount table "
            f"{view.mountinfo} could not be parsed and were skipped (first: {errors[0]}); a "
            "node on a skipped mount is attributed to the mount below it, nodev unnoticed",
        )


def no_device_root(
    snapshot: HostSnapshot, candidates: list[Candidate], family: Family, problems: Problems
) -> None:
    unreadable = "".join(
        f"; cannot read {listing.dev_root} ({listing.error})"
        for candidate in candidates
        if (listing := snapshot.listings.get(candidate.dev_root)) is not None
        and listing.error is not None
    )
    where = (
        family.fixed_dev_root
        if family.fixed_dev_root is not None
        else "any driver root (" + ", ".join(candidate.dev_root for candidate in candidates) + ")"
    )
    problems.add(
        "no-device-root",
        "error",
        f"no {family.display} device nodes in {where}{unreadable}; {family.no_root_hint}",
    )


def driver_root_problems(
    snapshot: HostSnapshot, chosen: Candidate | None, family: Family, problems: Problems
) -> None:
    """Driver roots that exist but hold no readable nodes."""
    for candidate in snapshot.candidates:
        if (
            candidate.driver_root == "/"
            or candidate.driver_root not in snapshot.driver_roots_existing
            # driver-ready may keep the nodes apart from the driver root (NVIDIA_DEV_ROOT):
            # the root that was chosen is not empty, whichever candidate names it.
            or (chosen is not None and candidate.driver_root == chosen.driver_root)
        ):
            continue
        listing = family_listing(snapshot, family, candidate.dev_root)
        if listing.error is not None:
            # Unreadable is not empty: say so rather than blame the driver pod.
            problems.add(
                "driver-root-empty",
                "warning" if chosen else "error",
                f"driver root {candidate.driver_root} exists but {candidate.dev_root} cannot be "
                f"read ({listing.error}): gpu-device-watcher needs read and search permission "
                "on it (and every directory above it)",
                candidate.driver_root,
            )
        elif not listing.has_nodes:
            problems.add(
                "driver-root-empty",
                "warning" if chosen else "error",
                f"driver root {candidate.driver_root} exists but {candidate.dev_root} holds no "
                f"{family.display} device nodes: the driver container may still be starting, or "
                "its root was left behind by an earlier driver pod (check the driver pod)",
                candidate.driver_root,
            )


def not_in_dev(
    in_dev: DevRootListing | None, chosen: Candidate, nodes: NodeCheck, problems: Problems
) -> None:
    family = nodes.family
    # A stale or planted control node in /dev does not help a tool that opens it.
    if in_dev is None or not nodes.has_valid_control(in_dev):
        problems.add(
            "not-in-dev",
            "warning",
            f"{family.display} device nodes are in {chosen.dev_root}, not /dev: tools that "
            f"open /dev/{family.control} ({family.opened_by} among them) will not find them;"
            " ask gpu-device-watcher for the paths (`gpu-device-watcher path "
            f"{family.control}`)",
            chosen.dev_root,
        )


def neither(names: tuple[str, ...]) -> str:
    """ "neither 'a' nor 'b'" (or "no 'a'" for one name)."""
    quoted = [f"'{name}'" for name in names]
    if len(quoted) == 1:
        return f"no {quoted[0]}"
    return "neither " + " nor ".join(quoted)


def missing_nodes(
    family: Family,
    chosen: Candidate,
    listing: DevRootListing | None,
    *,
    majors: Mapping[str, int],
    information: list[GpuInformation],
    problems: Problems,
) -> None:
    expected: list[tuple[str, Severity, str]] = [
        (node.name, node.severity, node.why)
        for node in family.expected
        if node.when_major is None or node.when_major in majors
    ]
    listed_in = "/proc" if family.gpus_from == "proc" else "/sys/class/drm"
    for info in information:
        if info.minor is not None:
            expected.append(
                (
                    family.gpu_node_name(info.minor),
                    "error",
                    f"GPU {info.bus_id} is listed in {listed_in}",
                )
            )
    for name, severity, why in expected:
        if listing is None or listing.entry(name) is None:
            path = posixpath.join(chosen.dev_root, name)
            problems.add(
                "missing-node",
                severity,
                f"{path} is missing although {why}: run {family.recreate} (or restart the driver "
                "container) to create it",
                path,
            )


def check_validations(
    view: HostView,
    snapshot: HostSnapshot,
    chosen: Candidate | None,
    problems: Problems,
    family: Family,
) -> None:
    ready_path = posixpath.join(view.validations_dir, "driver-ready")
    named = next((c for c in snapshot.candidates if c.from_validations), None)
    if named is None:
        problems.add(
            "validations-mismatch",
            "warning",
            f"{ready_path} has no absolute {family.ready_root_key}; it was ignored (is the GPU "
            "Operator's driver validation healthy?)",
            ready_path,
        )
    elif chosen is not None and chosen != named:
        problems.add(
            "validations-mismatch",
            "warning",
            f"{ready_path} names {named.dev_root}, but it holds no valid {family.control}; using "
            f"{chosen.dev_root} instead (the driver-ready file may be stale after a driver pod "
            "restart)",
            ready_path,
        )
