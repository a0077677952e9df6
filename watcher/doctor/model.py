"""A doctor check and the report of them all: plain values, no I/O (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHECK_IDS", "STATUSES", "Check", "exit_code", "summary", "verdict"]

STATUSES = ("ok", "warn", "fail", "skip")
# The contract's ids, in the order a node's chain is walked: the daemon and its map, CRIU,
# what CRIU loads and runs, the runtimes that drive it, and what the node advertises.
CHECK_IDS = (
    "daemon",
    "map",
    "criu",
    "criu-config",
    "criu-plugin",
    "cuda-checkpoint",
    "runtime-runc",
    "runtime-crun",
    "runtime-crio",
    "runtime-containerd",
    "labels",
)


@dataclass(frozen=True)
class Check:
    """One check: `fix` is a command or config line exactly when `status` is warn or fail."""

    id: str
    status: str
    found: str
    fix: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.id}: unknown status {self.status!r}")
        if (self.status in ("warn", "fail")) != (self.fix is not None):
            raise ValueError(f"check {self.id}: a fix goes with warn and fail, and only with them")

    def as_dict(self) -> dict[str, str | None]:
        return {"id": self.id, "status": self.status, "found": self.found, "fix": self.fix}


def ok(check_id: str, found: str) -> Check:
    return Check(check_id, "ok", found)


def skip(check_id: str, why: str) -> Check:
    return Check(check_id, "skip", why)


def warn(check_id: str, found: str, fix: str) -> Check:
    return Check(check_id, "warn", found, fix)


def fail(check_id: str, found: str, fix: str) -> Check:
    return Check(check_id, "fail", found, fix)


def verdict(check_id: str, status: str, found: str, fix: str | None) -> Check:
    """A check of any status; `fix` is kept only where the status wants one."""
    return Check(check_id, status, found, fix if status in ("warn", "fail") else None)


def summary(checks: list[Check]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for check in checks:
        counts[check.status] += 1
    return counts


def exit_code(checks: list[Check]) -> int:
    """0 when nothing failed, 1 when a check failed (warnings do not fail the node)."""
    return 1 if any(check.status == "fail" for check in checks) else 0
