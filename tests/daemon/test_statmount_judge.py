"""The unprivileged statmount judge against the real kernel, and its fallback.

`watcher.sources.statmount` reads the mounts on, above and below the watched paths with
statx/statmount/listmount; `StatmountJudge` says a wake-up matters only when those changed,
and the table it reads for a scan must attribute every watched path as the whole mountinfo
table does. Scenarios mount in a fresh interpreter under `unshare --mount` (see
tests/nsrun.py); the judge itself runs there as root and, in a second process, as uid 65534
with every capability dropped, as the shipped unit runs the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.nsrun import run_scenario_module
from watcher.core.mountinfo import MountTable, PathFilter, parse_mountinfo
from watcher.daemon.judge import EveryChange, MountJudging, StatmountJudge
from watcher.sources.statmount import (
    MountSyscalls,
    RelevantMounts,
    StatmountUnavailable,
    mount_options,
    targeted_mismatch,
)

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def test_mount_options_are_written_as_mountinfo_writes_them() -> None:
    assert mount_options(0) == ("rw", "relatime")
    assert mount_options(0x1 | 0x2 | 0x4 | 0x8 | 0x10) == (
        "ro",
        "nosuid",
        "nodev",
        "noexec",
        "noatime",
    )
    assert mount_options(0x20 | 0x80) == ("rw", "nodiratime")  # strictatime: no word
    assert mount_options(0x200000 | 0x100000) == ("rw", "relatime", "nosymfollow", "idmapped")


class _NoStatmount(MountSyscalls):
    """As a kernel before 6.8, or a seccomp filter answering ENOSYS, would."""

    def statmount(self, mount_id: int) -> Any:
        raise OSError(errno.ENOSYS, "Function not implemented")


def test_without_statmount_the_judge_is_unavailable() -> None:
    with pytest.raises(StatmountUnavailable, match="not implemented"):
        StatmountJudge.open("/proc/self/mountinfo", PathFilter(["/dev"]), _NoStatmount())
    with pytest.raises(StatmountUnavailable, match="not this process's mount table"):
        RelevantMounts.open("/proc/1/mountinfo" if os.getpid() != 1 else "/nonexistent")


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSYS, "Function not implemented"), (errno.EPERM, "Operation not permitted")],
)
def test_without_statmount_every_wake_up_rescans(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int, words: str
) -> None:
    """The fallback forced at the system call (ENOSYS: before 6.8; EPERM: a seccomp filter
    such as the shipped unit's on systemd 252): today's path, every wake-up a rescan."""

    def refused(self: MountSyscalls, mount_id: int) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(MountSyscalls, "statmount", refused)
    # As the shipped unit runs it: no CAP_SYS_ADMIN, so no fanotify to fall back on either.
    monkeypatch.setattr(
        "watcher.daemon.judge.unsuitable", lambda: "fanotify mount events need CAP_SYS_ADMIN"
    )
    reasons: list[str] = []

    async def main() -> None:
        judging = MountJudging(
            "/proc/self/mountinfo",
            mode="auto",
            pollable=True,
            relevant=lambda: PathFilter(["/dev"]),
            on_relevant=reasons.append,
        )
        async with anyio.create_task_group() as group:
            await judging.start(group)
            assert isinstance(judging.judge, EveryChange)
            assert judging.targeted is None
            judging.on_wake("mount table changed")
            judging.close()
            group.cancel_scope.cancel()

    caplog.set_level("INFO", logger="watcher.daemon")
    anyio.run(main)
    assert reasons[:1] == ["mount table changed"]
    expected = (
        "every mountinfo wake-up rescans (fanotify mount events need CAP_SYS_ADMIN; "
        f"no statmount: {words})"
    )
    assert expected in caplog.text, caplog.text


def test_another_process_table_never_gets_the_statmount_judge() -> None:
    async def main() -> None:
        judging = MountJudging(
            "/proc/1/mountinfo",
            mode="auto",
            pollable=True,
            relevant=lambda: PathFilter(["/dev"]),
            on_relevant=lambda reason: None,
            foreign_root="/host",
        )
        async with anyio.create_task_group() as group:
            await judging.start(group)
            assert isinstance(judging.judge, EveryChange)
            assert judging.targeted is None
            group.cancel_scope.cancel()

    anyio.run(main)


# --- against the kernel ---------------------------------------------------------------------


def _nobody_python() -> list[str] | None:
    """A command running this checkout's Python as uid 65534 with no capabilities."""
    if shutil.which("setpriv") is None:
        return None
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    command = [
        *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        *("--inh-caps=-all", "--bounding-set=-all", "--"),
        sys.executable,
        "-I",
        "-c",
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]; "
        "from tests.daemon.test_statmount_judge import serve; serve()",
    ]
    probe = subprocess.run(
        command, input='{"op": "ping"}\n', capture_output=True, text=True, timeout=30, check=False
    )
    return command if probe.returncode == 0 else None


@pytest.fixture
def scratch() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts in a private mount namespace")
    # Under /tmp, searchable by uid 65534 (pytest's tmp_path is under a 0700 directory).
    directory = Path(tempfile.mkdtemp(prefix="gdw-sm-", dir="/tmp"))
    directory.chmod(0o755)
    (directory / "scratch").mkdir(mode=0o755)
    yield directory / "scratch"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.realfs
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_the_judge_sees_every_relevant_change_and_no_other(scratch: Path, user: str) -> None:
    if user == "nobody":
        command = _nobody_python()
        if command is None:
            pytest.skip("setpriv(1) missing or no interpreter uid 65534 can run")
        (scratch.parent / "nobody").write_text(json.dumps(command))
    result = run_scenario_module("tests.daemon.test_statmount_judge", "judge", scratch, timeout=180)
    assert result.returncode == 0, f"scenario failed:\n{result.stdout}{result.stderr}"


def serve() -> None:
    """A judge driven over stdin/stdout (JSON lines), for the unprivileged run."""
    judge: StatmountJudge | None = None
    for line in sys.stdin:
        request = json.loads(line)
        reply: Any = None
        if request["op"] == "open":
            relevant = PathFilter(request["paths"], request["ancestors"])
            judge = StatmountJudge.open("/proc/self/mountinfo", relevant)
        elif request["op"] == "judge":
            assert judge is not None
            reply = judge.judge("wake-up")
        elif request["op"] == "table":
            assert judge is not None
            relevant = PathFilter(request["paths"], request["ancestors"])
            reply = _shown_table(judge.targeted(relevant), request["probe"])
        elif request["op"] == "uid":
            status = Path("/proc/self/status").read_text()
            reply = [os.getuid(), status.split("CapEff:")[1].split()[0]]
        print(json.dumps(reply), flush=True)


def _shown_table(table: MountTable, paths: list[str]) -> list[Any]:
    shown = []
    for path in paths:
        entry = table.resolve(path)
        shown.append(
            None
            if entry is None
            else [entry.id, entry.mount_point, entry.fstype, entry.source, list(entry.options)]
        )
    return shown


class _Remote:
    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, request: dict[str, Any]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the unprivileged judge died"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


class _Local:
    def __init__(self) -> None:
        self.judge: StatmountJudge | None = None

    def ask(self, request: dict[str, Any]) -> Any:
        if request["op"] == "open":
            relevant = PathFilter(request["paths"], request["ancestors"])
            self.judge = StatmountJudge.open("/proc/self/mountinfo", relevant)
            return None
        assert self.judge is not None
        if request["op"] == "judge":
            return self.judge.judge("wake-up")
        relevant = PathFilter(request["paths"], request["ancestors"])
        return _shown_table(self.judge.targeted(relevant), request["probe"])

    def close(self) -> None:
        pass


def _run(*args: str) -> None:
    subprocess.run(args, check=True, timeout=30)


Check = Callable[..., None]


def _scratch_tree(scratch: Path) -> tuple[Path, Path, Path]:
    """A tmpfs at SCRATCH holding a driver root, its dev root and a place elsewhere."""
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "gdw-scratch", str(scratch))
    driver = scratch / "root/run/nvidia/driver"
    dev = driver / "dev"
    other = scratch / "elsewhere"
    for directory in (dev / "nvidia-caps", other, driver / "usr"):
        directory.mkdir(parents=True)
    for directory in scratch.rglob("*"):
        directory.chmod(0o755)
    return driver, dev, other


def _the_judge(scratch: Path) -> _Local | _Remote:
    """The judge in this process, or in one as uid 65534 with no capabilities if asked."""
    marker = scratch.parent / "nobody"
    judge: _Local | _Remote
    if marker.exists():
        judge = _Remote(json.loads(marker.read_text()))
        uid, capabilities = judge.ask({"op": "uid"})
        assert uid == NOBODY and capabilities == "0000000000000000", capabilities
    else:
        judge = _Local()
    return judge


def _a_changed_table_is_caught(
    scratch: Path, driver: Path, dev: Path, relevant: PathFilter, check: Check
) -> None:
    """A mount on the driver root whose options differ in a copy of the table: a mismatch."""
    _run("mount", "-t", "tmpfs", "gdw-driver0", str(driver))
    dev.mkdir()
    check("mount on the driver root", relevant=True)
    text = Path("/proc/self/mountinfo").read_text()
    altered = "\n".join(
        line.replace(" rw,relatime ", " rw,nodev,relatime ", 1) if f" {driver} " in line else line
        for line in text.split("\n")
    )
    assert altered != text
    copy = scratch.parent / "mountinfo-copy"
    copy.write_text(altered)
    mismatch = targeted_mismatch(str(copy), relevant)
    assert mismatch is not None and "disagree about the mount of" in mismatch, mismatch
    _run("umount", str(driver))
    check("umount of the driver root", relevant=True)


def _irrelevant_churn(driver: Path, other: Path, check: Check) -> None:
    """A storm of irrelevant mounts and remounts, then a mount below the driver root only."""
    for index in range(40):
        _run("mount", "-t", "tmpfs", f"gdw-churn{index}", str(other))
        check(f"irrelevant mount {index}", relevant=False)
        if index % 10 == 0:
            _run("mount", "-o", "remount,nodev", str(other))
            check("irrelevant remount", relevant=False)
        _run("umount", str(other))
        check(f"irrelevant umount {index}", relevant=False)
    # Below a driver root but not below its dev root: not relevant (ancestors_of).
    _run("mount", "-t", "tmpfs", "gdw-usr", str(driver / "usr"))
    check("mount below the driver root", relevant=False)
    _run("umount", str(driver / "usr"))
    check("umount below the driver root", relevant=False)


def _over_the_dev_root(dev: Path, check: Check) -> None:
    """A mount over the (watched) dev root, remounted nodev and back, then gone."""
    _run("mount", "-t", "tmpfs", "-o", "mode=755", "gdw-dev", str(dev))
    check("mount over the dev root", relevant=True)
    _run("mount", "-o", "remount,nodev", str(dev))
    check("remount nodev", relevant=True)
    _run("mount", "-o", "remount,dev", str(dev))
    check("remount dev", relevant=True)
    (dev / "nvidia-caps").mkdir()
    _run("mount", "-t", "tmpfs", "-o", "nodev", "gdw-caps", str(dev / "nvidia-caps"))
    check("mount below the dev root", relevant=True)
    _run("mount", "-o", "remount,ro", str(dev / "nvidia-caps"))
    check("remount below the dev root", relevant=True)
    _run("umount", str(dev / "nvidia-caps"))
    check("umount below the dev root", relevant=True)
    _run("umount", str(dev))
    check("umount of the dev root", relevant=True)


def _above_the_dev_root(scratch: Path, driver: Path, dev: Path, other: Path, check: Check) -> None:
    """The driver root, an ancestor further up, and a mount moved onto the dev root."""
    _run("mount", "-t", "tmpfs", "gdw-driver", str(driver))
    check("mount on the driver root", relevant=True)
    _run("umount", str(driver))
    check("umount of the driver root", relevant=True)
    _run("mount", "-o", "remount,nodev", str(scratch))
    check("remount of an ancestor", relevant=True)
    _run("mount", "-o", "remount,dev", str(scratch))
    check("remount of an ancestor back", relevant=True)
    _run("mount", "-t", "tmpfs", "gdw-stage", str(other))
    _run("mount", "--move", str(other), str(dev))
    check("move onto the dev root", relevant=True)
    _run("umount", str(dev))
    check("umount of the moved mount", relevant=True)


def _moved_below_the_dev_root(dev: Path, other: Path, check: Check) -> None:
    """Moved from elsewhere to below the dev root: the mount keeps its id, and the count
    of mounts does not change; the mounts below the (small) mount are listed again."""
    _run("mount", "-t", "tmpfs", "-o", "nodev", "gdw-stage2", str(other))
    check("mount elsewhere", relevant=False)
    _run("mount", "--move", str(other), str(dev / "nvidia-caps"))
    check("move below the dev root", relevant=True)
    _run("mount", "--move", str(dev / "nvidia-caps"), str(other))
    check("move out from below the dev root", relevant=True)
    _run("umount", str(other))
    check("umount elsewhere", relevant=False)


def _among_many_mounts(scratch: Path, dev: Path, check: Check) -> None:
    """Many mounts in the mount the dev root lies in: only new ones are listed per wake-up,
    and a mount below the dev root is still seen as it comes and goes."""
    many = scratch / "many"
    for index in range(60):
        (many / str(index)).mkdir(parents=True)
        _run("mount", "-t", "tmpfs", "gdw-many", str(many / str(index)))
    check("many irrelevant mounts", relevant=False)
    _run("mount", "-t", "tmpfs", "gdw-caps2", str(dev / "nvidia-caps"))
    check("mount below the dev root among many", relevant=True)
    _run("umount", str(many / "7"))
    check("irrelevant umount among many", relevant=False)
    _run("umount", str(dev / "nvidia-caps"))
    check("umount below the dev root among many", relevant=True)


def scenario_judge(scratch: Path) -> None:
    driver, dev, other = _scratch_tree(scratch)
    judge = _the_judge(scratch)
    paths, ancestors = [str(dev), "/dev"], [str(driver)]
    probe = [str(dev), f"{dev}/nvidiactl", f"{dev}/nvidia-caps/nvidia-cap1", "/dev", str(driver)]
    judge.ask({"op": "open", "paths": paths, "ancestors": ancestors})

    def check(step: str, *, relevant: bool) -> None:
        reason = judge.ask({"op": "judge"})
        assert (reason is not None) == relevant, f"{step}: judged {reason!r}"
        # Seen once: the same state again is no change.
        assert judge.ask({"op": "judge"}) is None, f"{step}: judged twice"
        # The statmount table attributes every probed path as the whole table does.
        table = judge.ask({"op": "table", "paths": paths, "ancestors": ancestors, "probe": probe})
        text = Path("/proc/self/mountinfo").read_text()
        whole = _shown_table(parse_mountinfo(text, PathFilter(paths, ancestors)), probe)
        assert table == whole, f"{step}: {table} != {whole}"

    check("start", relevant=False)
    # The statmount read stands in for the whole table here ...
    assert targeted_mismatch("/proc/self/mountinfo", PathFilter(paths, ancestors)) is None
    # ... and a table that says otherwise (a mount's options changed in a copy) is caught.
    _a_changed_table_is_caught(scratch, driver, dev, PathFilter(paths, ancestors), check)
    _irrelevant_churn(driver, other, check)
    _over_the_dev_root(dev, check)
    _above_the_dev_root(scratch, driver, dev, other, check)
    _moved_below_the_dev_root(dev, other, check)
    _among_many_mounts(scratch, dev, check)
    judge.close()
    _run("umount", "-l", str(scratch))


if __name__ == "__main__":
    scenario, scratch_dir = sys.argv[1:]
    assert scenario == "judge"
    scenario_judge(Path(scratch_dir))
