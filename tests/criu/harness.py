"""Process trees to checkpoint, a CRIU runner and a reaper: shared by the CRIU tests and
`bench.criu_cost`.

- `prepare_criu()` runs `tests/criu/fetch_criu.sh .criu` (a no-op once the wrapper works) and
  raises `CriuUnavailable` with the reason when CRIU cannot be had.
- `spawn_tree()` starts `sh` (a session leader, no terminal: CRIU dumps it without
  `--shell-job`) with one child `sleep` that holds a file open on fd 3, and returns once
  both pids are known.
- CRIU's `restore -d` leaves the restored tree to whoever reaps orphans. Pid 1 in some
  sandboxes never does, and a zombie keeps its pid, which the next restore of the same
  image needs; so callers make themselves a child subreaper (`subreaper()`), and `reap()`
  collects what was killed. Every wait is bounded.
"""

from __future__ import annotations

import compileall
import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRIU_DIR = REPO / ".criu"
FETCH_SCRIPT = REPO / "tests" / "criu" / "fetch_criu.sh"
# The console script CRIU execs, installed next to this interpreter (the venv's bin).
ACTION = Path(sys.executable).with_name("gpu-device-watcher-criu-action")
# The cuda-checkpoint wrapper's /bin/sh front, as pip and install-action install it.
WRAPPER = REPO / "watcher" / "criu" / "wrapper.sh"
FETCH_TIMEOUT = 900.0
CRIU_TIMEOUT = 60.0
WAIT_TIMEOUT = 10.0

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def stage_wrapper(directory: Path) -> Path:
    """The cuda-checkpoint wrapper laid out as pip installs it (`directory/cuda-checkpoint`
    beside a `gpu-device-watcher` whose shebang names this interpreter); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    console = directory / "gpu-device-watcher"
    console.write_text(f"#!{sys.executable}\n# the console script's shebang is what counts\n")
    console.chmod(0o755)
    wrapper = directory / "cuda-checkpoint"
    wrapper.write_bytes(WRAPPER.read_bytes())
    wrapper.chmod(0o755)
    return wrapper


def stage_venv_install(
    venv: Path, *, packages_at: Path | None = None, with_pip: bool = False, tree: Path = REPO
) -> Path:
    """This checkout (or `tree`, another one) laid out in a new venv at `venv` as `pip install`
    of the wheel lays it out (the package compiled in the venv's site-packages; in bin, the
    action script, the cuda-checkpoint wrapper and a `gpu-device-watcher` whose shebang names
    the venv's python, as pip writes it); the venv's bin. With `packages_at`, the package goes
    there instead, for a `.pth` file to name. No dependency is installed: the action's daemon
    path needs none (it is stdlib only). `with_pip` makes the venv as users make it (`python
    -m venv` with its pip, and on 3.11 its setuptools `.pth`), which the bare interpreter's
    start pays for; slower (seconds)."""
    subprocess.run(
        [sys._base_executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bin_dir = venv / "bin"
    target = packages_at or site_packages(venv)
    shutil.copytree(
        tree / "watcher", target / "watcher", ignore=shutil.ignore_patterns("__pycache__")
    )
    compileall.compile_dir(str(target / "watcher"), quiet=1)
    console = bin_dir / "gpu-device-watcher"
    console.write_text(
        f"#!{bin_dir / 'python3'}\nimport sys\nfrom watcher.cli import main\nsys.exit(main())\n"
    )
    console.chmod(0o755)
    for source, name in (
        (tree / "scripts" / ACTION.name, ACTION.name),
        (tree / WRAPPER.relative_to(REPO), "cuda-checkpoint"),
    ):
        if source.exists():  # an older tree may have no wrapper
            (bin_dir / name).write_bytes(source.read_bytes())
            (bin_dir / name).chmod(0o755)
    return bin_dir


def site_packages(venv: Path) -> Path:
    """The venv's site-packages, where pip puts a wheel's package."""
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


class CriuUnavailable(Exception):
    """CRIU could not be prepared here; the message says why (tests skip with it)."""


def prepare_criu(dest: Path = CRIU_DIR, timeout: float = FETCH_TIMEOUT) -> Path:
    """The path of a working `criu` wrapper, fetched into `dest` when it is not there yet."""
    if os.geteuid() != 0:
        raise CriuUnavailable("CRIU dumps and restores need root")
    try:
        done = subprocess.run(
            ["bash", str(FETCH_SCRIPT), str(dest)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CriuUnavailable(f"{FETCH_SCRIPT.name} {dest} failed: {error}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise CriuUnavailable(f"{FETCH_SCRIPT.name} {dest} failed: {lines[-1]}")
    return dest / "criu"


# ------------------------------------------------------------------------------ reaping


@contextmanager
def subreaper() -> Iterator[None]:
    """Adopt this process's orphaned descendants (PR_SET_CHILD_SUBREAPER) for the duration."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rpartition(b")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as file:
            return file.read().strip()
    except OSError:
        return None


def reap(pids: Iterable[int], timeout: float = WAIT_TIMEOUT) -> None:
    """Wait until each pid has exited and collect it if it is a child of this process."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"pid {pid} ({comm(pid)}) still runs after {timeout} s")
        finally:
            os.close(pidfd)
        # Someone else's child (or collected already) raises ChildProcessError: gone either way.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def kill(pids: Iterable[int], names: Sequence[str] = ("sh", "sleep")) -> list[int]:
    """SIGKILL each pid that is still one of ours (by command name); the pids signalled."""
    signalled = []
    for pid in pids:
        if alive(pid) and comm(pid) in names:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            signalled.append(pid)
    return signalled


# ------------------------------------------------------------------------------ trees


_TREE = (
    # The child opens $1 on fd 3 (when one is given) *before* it reports its pid, then lets go
    # of the pipe and becomes `sleep`; the parent lets go of the pipe too. So the reader's EOF
    # means fd 3 is open and nobody in the tree holds the pipe (CRIU cannot dump a pipe to
    # the outside).
    'sh -c \'if [ -n "$1" ]; then exec 3<"$1"; fi; echo $$; exec sleep 1000 >/dev/null\' '
    'child "$1" </dev/null 2>/dev/null &\n'
    "exec >/dev/null\nwait\n"
)


@dataclass
class Tree:
    process: subprocess.Popen[bytes]
    child: int

    @property
    def root(self) -> int:
        return self.process.pid

    @property
    def pids(self) -> tuple[int, int]:
        return (self.root, self.child)

    def gone(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait for a tree that was killed (by CRIU's dump or by `kill`) and collect it."""
        self.process.wait(timeout=timeout)
        reap([self.child], timeout)

    def close(self) -> None:
        """Kill whatever still runs under these pids (the original or a restored copy)."""
        kill(self.pids)
        reap(self.pids)
        if self.process.returncode is None:
            self.process.wait(timeout=WAIT_TIMEOUT)


def spawn_tree(
    hold: str | None = "/dev/zero", timeout: float = WAIT_TIMEOUT, prefix: Sequence[str] = ()
) -> Tree:
    """`sh` (new session, no terminal) with a child `sleep` holding `hold` open on fd 3.

    `prefix`: a command that execs the rest (`nsenter --target=P --mount --`), so that the
    tree lives in another mount namespace and its root is still the process started here."""
    process = subprocess.Popen(
        [*prefix, "sh", "-c", _TREE, "sh", hold or ""],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert process.stdout is not None
    output, eof = b"", False
    deadline = time.monotonic() + timeout
    try:
        while not eof and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([process.stdout], [], [], left)
            if ready:
                chunk = os.read(process.stdout.fileno(), 64)
                output += chunk
                eof = not chunk
    finally:
        process.stdout.close()
    line = output.strip()
    if not eof or not line.isdigit():
        process.kill()
        process.wait(timeout=timeout)
        raise RuntimeError(f"the tree did not settle in {timeout} s: {output!r}")
    return Tree(process, int(line))


# ------------------------------------------------------------------------------ CRIU


@dataclass
class CriuRun:
    argv: list[str]
    returncode: int
    seconds: float
    log: str
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def explain(self) -> str:
        command = " ".join(self.argv)
        return f"{command} exited {self.returncode}\n{self.output}\n--- log ---\n{self.log}"


class Criu:
    """`criu dump` and `criu restore -d`, timed, with their log files read back."""

    def __init__(self, binary: Path, verbosity: int | None = 4) -> None:
        self.binary = binary
        self.verbosity = verbosity

    def _run(
        self,
        argv: list[str],
        images: Path,
        log: str,
        env: Mapping[str, str],
        timeout: float,
    ) -> CriuRun:
        argv = [str(self.binary), *argv, "-D", str(images), "-o", log]
        if self.verbosity is not None:
            argv.append(f"-v{self.verbosity}")
        started = time.perf_counter()
        done = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.perf_counter() - started
        try:
            text = (images / log).read_text(errors="replace")
        except OSError:
            text = ""
        return CriuRun(argv, done.returncode, seconds, text, done.stdout + done.stderr)

    def dump(
        self,
        pid: int,
        images: Path,
        env: Mapping[str, str],
        *,
        action: Path | None = ACTION,
        log: str = "dump.log",
        extra: Sequence[str] = (),
        timeout: float = CRIU_TIMEOUT,
    ) -> CriuRun:
        images.mkdir(parents=True, exist_ok=True)
        script = ["--action-script", str(action)] if action is not None else []
        return self._run(["dump", "-t", str(pid), *script, *extra], images, log, env, timeout)

    def restore(
        self,
        images: Path,
        env: Mapping[str, str],
        *,
        action: Path | None = ACTION,
        log: str = "restore.log",
        extra: Sequence[str] = (),
        timeout: float = CRIU_TIMEOUT,
    ) -> CriuRun:
        script = ["--action-script", str(action)] if action is not None else []
        return self._run(["restore", "-d", *script, *extra], images, log, env, timeout)
