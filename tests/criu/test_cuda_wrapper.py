"""The `cuda-checkpoint` wrapper as CRIU's CUDA plugin runs it: by name, through PATH.

Real processes and files: the wrapper's /bin/sh front (`watcher/criu/wrapper.sh`) laid out
as pip installs it (beside a `gpu-device-watcher` whose shebang names this interpreter) and
as `install-action DIR` writes it (beside the action file, on the host's /usr/bin/python3);
stand-in `cuda-checkpoint` binaries that log their argv; and a daemon socket that serves a
given map (the stub below speaks the real protocol, one JSON line per request).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.criu.harness import WRAPPER, stage_wrapper
from tests.criu.test_gate import H200, U, host, record
from watcher.criu import actionfile
from watcher.criu.cudacheckpoint import WRAPPER_MARKER, is_wrapper
from watcher.criu.cudawrap import elf_interpreter

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60
BARE_PYTHON = Path("/usr/bin/python3")

# Logs its argv (one argument per line, NUL-separated file) and answers like the real one.
STAND_IN = """#!/bin/sh
printf '%s\\0' "$0" "$@" >>"$(dirname "$0")/calls"
echo "out:$*"
echo "err:$*" >&2
exit 7
"""


class MapServer:
    """A daemon socket that answers `get` with one map (the protocol's JSON lines)."""

    def __init__(self, path: Path, device_map: dict[str, Any]) -> None:
        self.path = path
        self.device_map = device_map
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, connection.makefile("rwb") as stream:
                for line in stream:
                    self.requests += 1
                    json.loads(line)
                    reply = {"ok": True, "generation": 3, "map": self.device_map}
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve_map(tmp_path: Path) -> Iterator[Any]:
    servers: list[MapServer] = []

    def start(device_map: dict[str, Any]) -> MapServer:
        server = MapServer(tmp_path / f"gdw{len(servers)}.sock", device_map)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def pip_layout(directory: Path) -> Path:
    """The wrapper as pip installs it: bin/cuda-checkpoint beside bin/gpu-device-watcher."""
    return stage_wrapper(directory)


def action_layout(directory: Path) -> Path:
    """The wrapper as `install-action DIR` writes it, beside the action file."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "install-action", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return directory / "cuda-checkpoint"


def run(
    path_dirs: list[Path],
    arguments: list[str],
    *,
    socket_path: Path | None = None,
    cwd: Path | str = "/",
    extra: dict[str, str] | None = None,
    program: str = "cuda-checkpoint",
) -> subprocess.CompletedProcess[bytes]:
    """`program` started as CRIU's plugin starts it: execvp by name, PATH as given."""
    environment = {
        "PATH": ":".join([*map(str, path_dirs), "/usr/bin", "/bin"]),
        "GPU_DEVICE_WATCHER_SOCKET": str(socket_path or "/nonexistent/gdw.sock"),
        "GPU_DEVICE_WATCHER_CONFIG": "/nonexistent/config.toml",
        **(extra or {}),
    }
    return subprocess.run(
        [program, *arguments],
        env=environment,
        cwd=cwd,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )


def calls(directory: Path) -> list[list[str]]:
    """The argv of each call the stand-in in `directory` received."""
    try:
        data = (directory / "calls").read_bytes()
    except FileNotFoundError:
        return []
    fields = data.split(b"\0")[:-1]
    result: list[list[str]] = []
    for field in fields:
        if field.endswith(b"/cuda-checkpoint") or not result:
            result.append([field.decode()])
        else:
            result[-1].append(field.decode())
    return result


# --------------------------------------------------------------------------------------------
# Pass-through


ARGUMENTS = ["--get-state", "--pid", "42", "two words", "", "line\nbreak"]


def test_every_call_passes_through_unchanged(tmp_path: Path) -> None:
    real = _executable(tmp_path / "real" / "cuda-checkpoint", STAND_IN)
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    direct = subprocess.run(
        [str(real), *ARGUMENTS], capture_output=True, timeout=TIMEOUT, check=False
    )
    wrapped = run([wrapper.parent, real.parent], ARGUMENTS)
    assert (wrapped.returncode, wrapped.stdout, wrapped.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    )
    assert direct.returncode == 7
    assert calls(real.parent) == [[str(real), *ARGUMENTS]] * 2


def test_a_chain_of_wrapper_copies_moves_forward_to_the_real_binary(tmp_path: Path) -> None:
    first = action_layout(tmp_path / "action")
    second = pip_layout(tmp_path / "venv" / "bin")
    real = _executable(tmp_path / "real" / "cuda-checkpoint", STAND_IN)
    done = run([first.parent, second.parent, real.parent], ["-h"])
    assert (done.returncode, done.stdout) == (7, b"out:-h\n"), done.stderr
    # Run by its path while a copy stands before it on PATH: no loop, the real one runs.
    done = run([first.parent, real.parent], ["-h"], program=str(second))
    assert (done.returncode, done.stdout) == (7, b"out:-h\n"), done.stderr


def test_no_binary_anywhere_is_127_and_one_line(tmp_path: Path, serve_map: Any) -> None:
    here = host([(0, H200, U[0])])
    server = serve_map(here)
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    done = run([wrapper.parent], ["-h"], socket_path=server.path)
    assert done.returncode == 127
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("gpu-device-watcher: no cuda-checkpoint on this host (")
    assert server.requests == 1


# --------------------------------------------------------------------------------------------
# The map's binary, under a driver root


def _driver_root_map(root: Path, binary: Path) -> dict[str, Any]:
    here = host([(0, H200, U[0])])
    here["driver"]["root"] = str(root)
    here["driver"]["cuda_checkpoint"] = str(binary)
    return here


def test_the_maps_binary_runs_when_path_has_none(tmp_path: Path, serve_map: Any) -> None:
    root = tmp_path / "driver"
    binary = _executable(root / "usr/bin/cuda-checkpoint", STAND_IN)
    server = serve_map(_driver_root_map(root, binary))
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    done = run([wrapper.parent], ["--get-restore-tid", "--pid", "9"], socket_path=server.path)
    assert (done.returncode, done.stdout, done.stderr) == (
        7,
        b"out:--get-restore-tid --pid 9\n",
        b"err:--get-restore-tid --pid 9\n",
    )


LIBRARY_C = 'const char *gdw_answer(void) { return "from the driver root"; }\n'
PROGRAM_C = """#include <stdio.h>
const char *gdw_answer(void);
int main(int argc, char **argv) {
    printf("%s:", gdw_answer());
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\\n");
    return 5;
}
"""


def _build_driver_root(tmp_path: Path, with_loader: bool) -> tuple[Path, Path]:
    """A driver root whose cuda-checkpoint needs libgdwdriver.so, found only in that root."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler here to build a binary that needs the driver root's library")
    build = tmp_path / "build"
    build.mkdir()
    (build / "lib.c").write_text(LIBRARY_C)
    (build / "main.c").write_text(PROGRAM_C)
    root = tmp_path / "driver"
    triplet_dir = root / "usr/lib/x86_64-linux-gnu"
    triplet_dir.mkdir(parents=True)
    library = triplet_dir / "libgdwdriver.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(build / "lib.c")],
        check=True,
        timeout=TIMEOUT,
    )
    binary = root / "usr/bin/cuda-checkpoint"
    binary.parent.mkdir(parents=True)
    subprocess.run(
        [compiler, "-o", str(binary), str(build / "main.c"), f"-L{triplet_dir}", "-lgdwdriver"],
        check=True,
        timeout=TIMEOUT,
    )
    if with_loader:
        # The root's own loader and libc, as a driver container ships them (copies of this
        # machine's: any matching pair will do).
        interpreter = elf_interpreter(str(binary))
        assert interpreter is not None
        loader = root / interpreter.lstrip("/")
        loader.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(interpreter), loader)
        libc = subprocess.run(
            [compiler, "-print-file-name=libc.so.6"], capture_output=True, text=True, check=True
        ).stdout.strip()
        shutil.copy(os.path.realpath(libc), triplet_dir / "libc.so.6")
    return root, binary


@pytest.mark.parametrize("with_loader", [True, False], ids=["root-loader", "host-loader"])
def test_a_driver_root_binary_finds_the_roots_libraries(
    tmp_path: Path, serve_map: Any, with_loader: bool
) -> None:
    root, binary = _build_driver_root(tmp_path, with_loader)
    alone = subprocess.run([str(binary), "-h"], capture_output=True, timeout=TIMEOUT, check=False)
    assert alone.returncode != 0
    assert b"libgdwdriver.so" in alone.stderr  # the library is only in the root
    server = serve_map(_driver_root_map(root, binary))
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    done = run([wrapper.parent], ["--action", "lock", "--pid", "3"], socket_path=server.path)
    assert (done.returncode, done.stdout, done.stderr) == (
        5,
        b"from the driver root: --action lock --pid 3\n",
        b"",
    )


# --------------------------------------------------------------------------------------------
# The device map at restore


def _images(tmp_path: Path, rec: dict[str, Any]) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "gpu-device-watcher.json").write_text(json.dumps(rec))
    return images


@pytest.mark.parametrize(
    ("here_uuid", "expected"),
    [(U[1], ["--device-map", f"{U[0]}={U[1]}"]), (U[0], [])],
    ids=["moved", "same-gpu"],
)
def test_restore_adds_the_device_map_only_when_the_gpu_moved(
    tmp_path: Path, serve_map: Any, here_uuid: str, expected: list[str]
) -> None:
    rec = record([(0, H200, U[0])])
    images = _images(tmp_path, rec)
    server = serve_map(host([(3, H200, here_uuid)]))
    real = _executable(tmp_path / "real" / "cuda-checkpoint", STAND_IN)
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    arguments = ["--action", "restore", "--pid", "4242"]
    done = run(
        [wrapper.parent, real.parent],
        arguments,
        socket_path=server.path,
        extra={"CRTOOLS_IMAGE_DIR": str(images)},
    )
    assert done.returncode == 7, done.stderr
    assert calls(real.parent) == [[str(real), *arguments, *expected]]
    assert done.stderr.decode() == "err:" + " ".join([*arguments, *expected]) + "\n"


def test_restore_maps_the_gpus_of_that_process(tmp_path: Path, serve_map: Any) -> None:
    rec = record([(0, H200, U[0]), (1, H200, U[1])])
    for entry in rec["used"]:
        if entry["name"] == "nvidia1":
            entry["pids"] = [5000]
    images = _images(tmp_path, rec)
    server = serve_map(host([(4, H200, U[4]), (5, H200, U[5])]))
    real = _executable(tmp_path / "real" / "cuda-checkpoint", STAND_IN)
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    environment = {"CRTOOLS_IMAGE_DIR": str(images)}
    for pid, wanted in (
        ("5000", f"{U[1]}={U[5]}"),
        ("4243", f"{U[0]}={U[4]}"),
        ("77", f"{U[0]}={U[4]},{U[1]}={U[5]}"),  # not in the record: every used GPU
    ):
        done = run(
            [wrapper.parent, real.parent],
            ["--action", "restore", "--pid", pid],
            socket_path=server.path,
            extra=environment,
        )
        assert done.returncode == 7, done.stderr
        assert calls(real.parent)[-1][-2:] == ["--device-map", wanted]


def test_other_actions_never_ask_for_the_map(tmp_path: Path, serve_map: Any) -> None:
    images = _images(tmp_path, record([(0, H200, U[0])]))
    server = serve_map(host([(3, H200, U[1])]))
    real = _executable(tmp_path / "real" / "cuda-checkpoint", STAND_IN)
    wrapper = pip_layout(tmp_path / "venv" / "bin")
    for arguments in (["--action", "unlock", "--pid", "1"], ["--get-restore-tid", "--pid", "1"]):
        done = run(
            [wrapper.parent, real.parent],
            arguments,
            socket_path=server.path,
            extra={"CRTOOLS_IMAGE_DIR": str(images)},
        )
        assert done.returncode == 7
    assert server.requests == 0
    assert [call[1:] for call in calls(real.parent)] == [
        ["--action", "unlock", "--pid", "1"],
        ["--get-restore-tid", "--pid", "1"],
    ]


# --------------------------------------------------------------------------------------------
# Immune to the working directory and the environment


HOSTILE_INIT = "import pathlib\npathlib.Path({marker!r}).write_text('hostile code ran')\n"


@pytest.mark.parametrize("layout", ["pip", "install-action"])
def test_the_working_directory_and_python_variables_count_for_nothing(
    tmp_path: Path, serve_map: Any, layout: str
) -> None:
    if layout == "install-action" and not BARE_PYTHON.is_file():
        pytest.skip(f"no {BARE_PYTHON} here: the install-action wrapper runs on it")
    hostile = tmp_path / "images"
    marker = tmp_path / "marker"
    (hostile / "watcher" / "criu").mkdir(parents=True)
    for name in ("watcher/__init__.py", "watcher/criu/__init__.py", "sitecustomize.py"):
        (hostile / name).write_text(HOSTILE_INIT.format(marker=str(marker)))
    _executable(hostile / "python3", f"#!/bin/sh\necho hostile > {marker}\n")
    rec = record([(0, H200, U[0])])
    (hostile / "gpu-device-watcher.json").write_text(json.dumps(rec))
    root = tmp_path / "driver"
    binary = _executable(root / "usr/bin/cuda-checkpoint", STAND_IN)
    here = _driver_root_map(root, binary)
    here["gpus"][0]["uuid"] = U[9]
    server = serve_map(here)
    wrapper = (
        pip_layout(tmp_path / "venv" / "bin")
        if layout == "pip"
        else action_layout(tmp_path / "action")
    )
    done = run(
        [hostile, wrapper.parent],
        ["--action", "restore", "--pid", "4242"],
        socket_path=server.path,
        cwd=hostile,
        extra={
            "CRTOOLS_IMAGE_DIR": str(hostile),
            "PYTHONPATH": str(hostile),
            "PYTHONSTARTUP": str(hostile / "sitecustomize.py"),
            "PYTHONHOME": str(hostile),
            "PYTHONSAFEPATH": "",
        },
    )
    assert not marker.exists(), marker.read_text()
    assert done.returncode == 7, done.stderr
    assert calls(binary.parent)[-1][1:] == [
        "--action",
        "restore",
        "--pid",
        "4242",
        "--device-map",
        f"{U[0]}={U[9]}",
    ]


# --------------------------------------------------------------------------------------------
# Installed


def test_install_action_writes_the_wrapper_beside_the_action(tmp_path: Path) -> None:
    wrapper = action_layout(tmp_path / "action")
    assert wrapper.stat().st_mode & 0o777 == 0o755
    assert wrapper.read_bytes() == WRAPPER.read_bytes() == actionfile.wrapper_bytes()
    assert WRAPPER_MARKER in wrapper.read_text()
    assert is_wrapper(wrapper)
    assert (tmp_path / "action" / actionfile.ACTION_NAME).is_file()


def test_the_restore_path_imports_nothing_heavy() -> None:
    # What the wrapper's Python side loads for a restore with the daemon up: the lean modules
    # alone (2 ms budget beside the interpreter's start), nothing that drags in re or enum.
    heavy = ("re", "enum", "glob", "typing", "asyncio", "anyio", "msgspec", "argparse")
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys, watcher.criu.cudawrap, watcher.criu.restore, watcher.criu.recordfile, "
            "watcher.client; print(' '.join(sorted(set(sys.argv[1:]) & set(sys.modules))))",
            *heavy,
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=TIMEOUT,
        check=True,
    )
    assert done.stdout.strip() == ""


def test_a_link_to_the_installed_wrapper_works_from_another_directory(
    tmp_path: Path, serve_map: Any
) -> None:
    # The node setup docs/criu.md gives: a link in /usr/local/sbin to install-action's copy.
    if not BARE_PYTHON.is_file():
        pytest.skip(f"no {BARE_PYTHON} here: the install-action wrapper runs on it")
    wrapper = action_layout(tmp_path / "libexec")
    links = tmp_path / "sbin"
    links.mkdir()
    (links / "cuda-checkpoint").symlink_to(wrapper)
    real = _executable(tmp_path / "bin" / "cuda-checkpoint", STAND_IN)
    done = run([links, real.parent], ["--get-state", "--pid", "8"])
    assert (done.returncode, done.stdout) == (7, b"out:--get-state --pid 8\n"), done.stderr
    # No binary on PATH: the Python side, found through the link, asks for the map.
    root = tmp_path / "driver"
    binary = _executable(root / "usr/bin/cuda-checkpoint", STAND_IN)
    server = serve_map(_driver_root_map(root, binary))
    done = run([links], ["--get-state", "--pid", "8"], socket_path=server.path)
    assert (done.returncode, done.stdout) == (7, b"out:--get-state --pid 8\n"), done.stderr
    assert server.requests == 1
