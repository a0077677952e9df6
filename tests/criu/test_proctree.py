"""watcher.criu.proctree on the real kernel: real process trees, real fds, real mappings.

Every child runs in its own session; each test kills its whole process group in a finally
block, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.criu import proctree
from watcher.criu.proctree import DeviceUse, open_char_devices, process_tree, used_devices

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 15.0

NULL = (1, 3)  # /dev/null
ZERO = (1, 5)  # /dev/zero
FULL = (1, 7)  # /dev/full

Spawn = Callable[..., tuple["subprocess.Popen[bytes]", dict[str, Any]]]


def _read_json_line(child: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> dict[str, Any]:
    """The first stdout line of `child`, as JSON, within `timeout` seconds."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"child {child.pid} said nothing within {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            err = b""
            if child.stderr is not None:
                child.kill()
                _, err = child.communicate(timeout=TIMEOUT)
            raise RuntimeError(f"child exited early: {err.decode(errors='replace')}")
        buf += chunk
    result: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return result


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    try:
        child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=TIMEOUT)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """spawn(code, *argv, prefix=[...]) -> (Popen, first JSON line). Kills every tree after."""
    children: list[subprocess.Popen[bytes]] = []

    def _spawn(
        code: str, *argv: str, prefix: list[str] | None = None
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        child = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", MAP + textwrap.dedent(code), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            bufsize=0,
        )
        children.append(child)
        return child, _read_json_line(child)

    try:
        yield _spawn
    finally:
        for child in children:
            _kill_group(child)


# mmap through libc: Python's mmap.mmap keeps a dup() of the fd (3.11), which would hold the
# device open as well; these children must hold *only* the mapping.
MAP = """
import ctypes, os
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]

def map_only(path, shared=False):
    fd = os.open(path, os.O_RDWR)
    addr = _libc.mmap(None, 8192, 3, 1 if shared else 2, fd, 0)  # PROT_READ|WRITE
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap " + path)
    os.close(fd)
    return addr
"""

# A child that never exits on its own within a test, but is bounded if it is ever leaked.
SLEEPER = "import time; time.sleep(120)"


def _device(name: str, major: int, minor: int, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "path": f"/run/nvidia/driver/dev/{name}",
        "kind": extra.get("kind", "control"),
        "major": major,
        "minor": minor,
        "mode": "0666",
        "valid": extra.get("valid", True),
    }


# --------------------------------------------------------------------------------------------
# process_tree

TREE = f"""
    import json, subprocess, sys, threading

    # A grandchild that has a child of its own (a great-grandchild).
    gc = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\\n"
         "p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}])\\n"
         "print(p.pid, flush=True)\\n"
         "time.sleep(120)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ggc = int(gc.stdout.readline())

    # A grandchild forked by a second thread: the kernel lists it under that thread's
    # task/TID/children, not under the leader's.
    box = {{}}
    started, stop = threading.Event(), threading.Event()
    def forker():
        box["tid"] = threading.get_native_id()
        box["p"] = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
        started.set()
        stop.wait()
    threading.Thread(target=forker, daemon=True).start()
    started.wait(10)
    print(json.dumps({{"gc": gc.pid, "ggc": ggc, "tgc": box["p"].pid, "tid": box["tid"]}}),
          flush=True)
    sys.stdin.read()
"""


def test_process_tree_finds_every_descendant(spawn: Spawn) -> None:
    child, info = spawn(TREE)
    tree = process_tree(child.pid)
    assert tree[0] == child.pid
    assert sorted(tree) == sorted({child.pid, info["gc"], info["ggc"], info["tgc"]})
    assert len(tree) == len(set(tree))
    # The thread's child really is only visible through the thread's own children file.
    leader = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
    thread = Path(f"/proc/{child.pid}/task/{info['tid']}/children").read_text().split()
    assert str(info["tgc"]) in thread
    assert str(info["tgc"]) not in leader
    # A subtree starts where it is asked to.
    assert process_tree(info["gc"]) == [info["gc"], info["ggc"]]
    assert process_tree(info["ggc"]) == [info["ggc"]]


def test_parent_pid_fallback_agrees(spawn: Spawn) -> None:
    """The walk used on kernels without task/*/children sees the same parents."""
    child, info = spawn(TREE)
    by_parent = proctree._parent_map("/proc")
    assert sorted(by_parent[child.pid]) == sorted([info["gc"], info["tgc"]])
    assert by_parent[info["gc"]] == [info["ggc"]]


def test_process_tree_of_missing_and_zombie_processes(spawn: Spawn) -> None:
    assert process_tree(0) == []
    assert process_tree(-1) == []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=TIMEOUT)
    assert process_tree(gone.pid) == []
    # A child that has exited but was not reaped yet still has a /proc entry.
    child, info = spawn(
        """
        import json, os, sys, time
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        while open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)
        print(json.dumps({"zombie": pid}), flush=True)
        sys.stdin.read()
        """
    )
    assert process_tree(info["zombie"]) == [info["zombie"]]
    assert process_tree(child.pid) == [child.pid, info["zombie"]]
    assert open_char_devices([info["zombie"]]) == {}


def test_process_tree_survives_churn(spawn: Spawn) -> None:
    """Processes exiting mid-walk are skipped, never an error."""
    child, _ = spawn(
        """
        import json, os, time
        print(json.dumps({}), flush=True)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
        """
    )
    deadline = time.monotonic() + 1.0
    walks = 0
    while time.monotonic() < deadline:
        tree = process_tree(child.pid)
        assert tree[0] == child.pid
        assert len(tree) == len(set(tree))
        open_char_devices(tree)
        walks += 1
    assert walks > 10


# --------------------------------------------------------------------------------------------
# Open and mapped devices

HOLDER = """
    import json, os, subprocess, sys

    # fd: /dev/null held open here and in a grandchild.
    null = os.open("/dev/null", os.O_RDONLY)
    gc = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time; fd = os.open('/dev/null', os.O_RDONLY); "
         "print(fd, flush=True); time.sleep(120)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    gc.stdout.readline()

    # maps: a private mapping of /dev/zero shows the node itself; its fd is closed.
    map_only("/dev/zero")

    maps = open("/proc/self/maps").read()
    print(json.dumps({"gc": gc.pid, "maps": maps}), flush=True)
    sys.stdin.read()
"""


def test_fd_and_maps_are_found(spawn: Spawn) -> None:
    child, info = spawn(HOLDER)
    zero_lines = [line for line in info["maps"].splitlines() if "/dev/zero" in line]
    assert zero_lines and all(not line.endswith("(deleted)") for line in zero_lines)

    held = open_char_devices(process_tree(child.pid))
    assert held[NULL] == DeviceUse(1, 3, tuple(sorted([child.pid, info["gc"]])), ("fd",))
    assert held[ZERO] == DeviceUse(1, 5, (child.pid,), ("maps",))

    devices: list[dict[str, object]] = [
        _device("nvidiactl", *NULL),
        _device("nvidia0", 195, 0, kind="gpu"),
        _device("nvidia-uvm", *ZERO, kind="uvm"),
        {"name": "broken", "path": "/x", "kind": "gpu", "major": None, "minor": 3},
        _device("bool-major", True, 3),
    ]
    used = used_devices(child.pid, devices)
    assert used == [
        {
            "name": "nvidia-uvm",
            "path": "/run/nvidia/driver/dev/nvidia-uvm",
            "kind": "uvm",
            "major": 1,
            "minor": 5,
            "valid": True,
            "pids": [child.pid],
            "via": ["maps"],
        },
        {
            "name": "nvidiactl",
            "path": "/run/nvidia/driver/dev/nvidiactl",
            "kind": "control",
            "major": 1,
            "minor": 3,
            "valid": True,
            "pids": sorted([child.pid, info["gc"]]),
            "via": ["fd"],
        },
    ]
    # The grandchild's subtree holds only its own fd.
    assert used_devices(info["gc"], devices) == [
        {**used[1], "pids": [info["gc"]]},
    ]


def test_fd_and_maps_of_one_device_merge(spawn: Spawn) -> None:
    child, _ = spawn(
        """
        import json, os, sys
        fd = os.open("/dev/zero", os.O_RDONLY)
        map_only("/dev/zero")
        print(json.dumps({}), flush=True)
        sys.stdin.read()
        """
    )
    used = used_devices(child.pid, [_device("nvidiactl", *ZERO)])
    assert [(u["name"], u["pids"], u["via"]) for u in used] == [
        ("nvidiactl", [child.pid], ["fd", "maps"])
    ]


def test_an_inode_mapped_by_several_processes_is_examined_once(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked child maps what its parent maps (the interpreter, libc, /dev/zero): each
    inode is looked up once for the whole tree, and the device is still found in both."""
    child, info = spawn(
        """
        import json, os, sys
        map_only("/dev/zero")
        forked = os.fork()
        if forked == 0:
            sys.stdin.read()
            os._exit(0)
        print(json.dumps({"forked": forked}), flush=True)
        sys.stdin.read()
        """
    )
    examined: list[tuple[int, int]] = []
    real = proctree._stat_mapping

    def counting(pid: int, mapping: Any, proc: str) -> os.stat_result | None:
        examined.append((mapping.fs_dev, mapping.inode))
        return real(pid, mapping, proc)

    monkeypatch.setattr(proctree, "_stat_mapping", counting)
    held = open_char_devices([child.pid, info["forked"]])
    assert held[ZERO] == DeviceUse(1, 5, tuple(sorted([child.pid, info["forked"]])), ("maps",))
    mapped = set()
    for pid in (child.pid, info["forked"]):
        for line in Path(f"/proc/{pid}/maps").read_bytes().splitlines(keepends=True):
            parsed = proctree._parse_maps_line(line)
            if parsed is not None:
                mapped.add((parsed.fs_dev, parsed.inode))
    assert sorted(examined) == sorted(mapped)  # every inode once, none twice


def test_shared_dev_zero_mapping_is_not_a_device(spawn: Spawn) -> None:
    """MAP_SHARED of /dev/zero is shmem: maps shows '/dev/zero (deleted)'; never reported."""
    child, info = spawn(
        """
        import json, os, sys
        map_only("/dev/zero", shared=True)
        print(json.dumps({"maps": open("/proc/self/maps").read()}), flush=True)
        sys.stdin.read()
        """
    )
    lines = [line for line in info["maps"].splitlines() if "/dev/zero" in line]
    assert lines and all(line.endswith("/dev/zero (deleted)") for line in lines)
    assert open_char_devices([child.pid]) == {}
    assert used_devices(child.pid, [_device("nvidiactl", *ZERO)]) == []


def test_unreadable_processes_are_skipped_and_reported(spawn: Spawn) -> None:
    """Without permission to read a process, it is skipped (and named), never a crash."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    child, _ = spawn(
        """
        import json, os, sys
        fd = os.open("/dev/null", os.O_RDONLY)
        print(json.dumps({}), flush=True)
        sys.stdin.read()
        """
    )
    # Started as root (the interpreter may live where others cannot read), then it drops to
    # nobody before looking.
    probe = textwrap.dedent(
        f"""
        import json, os
        from watcher.criu.proctree import open_char_devices, process_tree
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        unreadable = []
        held = open_char_devices(process_tree({child.pid}), unreadable=unreadable)
        print(json.dumps({{"held": [list(k) for k in held], "unreadable": unreadable}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert json.loads(out.stdout) == {"held": [], "unreadable": [child.pid]}
    # Gone processes are skipped silently.
    unreadable: list[int] = []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=TIMEOUT)
    assert open_char_devices([gone.pid], unreadable=unreadable) == {}
    assert unreadable == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "7fa1be04c000-7fa1be04d000 rw-p 00000000 00:06 4                  /dev/zero\n",
            (0x7FA1BE04C000, 0x7FA1BE04D000, os.makedev(0, 6), 4, "/dev/zero"),
        ),
        (
            "7f00-7f10 rw-s 00000000 fd:01 1234  /run/my dev/nvidia ctl",
            (0x7F00, 0x7F10, os.makedev(0xFD, 1), 1234, "/run/my dev/nvidia ctl"),
        ),
        (
            "7f00-7f10 r--p 00000000 00:1f 77  /tmp/a\\012b",
            (0x7F00, 0x7F10, os.makedev(0, 0x1F), 77, "/tmp/a\nb"),
        ),
        ("7fa1bd3f5000-7fa1bd3f7000 rw-s 00000000 00:01 1043   /dev/zero (deleted)", None),
        ("55b98c60e000-55b98c612000 rw-p 00000000 00:00 0      [heap]", None),
        ("7ffd0000-7ffd1000 r-xp 00000000 00:00 0              [vdso]", None),
        ("7f00-7f10 rw-p 00000000 00:00 0", None),
        ("7f00-7f10 rw-p 00000000 00:05 0   /weird", None),
        ("garbage", None),
        ("zz-7f10 rw-p 00000000 00:05 9   /x", None),
    ],
)
def test_parse_maps_line(line: str, expected: tuple[int, int, int, int, str] | None) -> None:
    m = proctree._parse_maps_line(line)
    got = None if m is None else (m.start, m.end, m.fs_dev, m.inode, m.path)
    assert got == expected


# --------------------------------------------------------------------------------------------
# Another mount namespace: the container case


def _need_unshare() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare -m, mount and mknod")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")


NAMESPACED = """
    import json, os, stat, subprocess, sys
    dev = sys.argv[1]
    run = lambda *a: subprocess.run(a, check=True, timeout=10)
    run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", dev)
    os.mknod(f"{dev}/nvidiactl", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(f"{dev}/nvidia-uvm", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    ctl = os.open(f"{dev}/nvidiactl", os.O_RDONLY)
    map_only(f"{dev}/nvidia-uvm")
    info = {"maps": open("/proc/self/maps").read(), "ls": sorted(os.listdir(dev))}
    if "--replace" in sys.argv:
        # What a driver pod restart does: a fresh tmpfs over the dev dir, new nodes in it.
        # The old mapping keeps its path text, but that path now names another node.
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", dev)
        os.mknod(f"{dev}/nvidia-uvm", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    if "--unlink" in sys.argv:
        os.unlink(f"{dev}/nvidia-uvm")
        info["maps"] = open("/proc/self/maps").read()
    print(json.dumps(info), flush=True)
    sys.stdin.read()
"""

NS_DEVICES = [
    _device("nvidiactl", *NULL),
    _device("nvidia-uvm", *ZERO, kind="uvm"),
    _device("nvidia-uvm-tools", *FULL, kind="uvm-tools"),
]


@pytest.mark.realfs
def test_devices_in_another_mount_namespace(spawn: Spawn, tmp_path: Path) -> None:
    _need_unshare()
    dev = tmp_path / "dev"
    dev.mkdir()
    child, info = spawn(NAMESPACED, str(dev), prefix=["unshare", "-m", "--propagation", "private"])
    assert info["ls"] == ["nvidia-uvm", "nvidiactl"]
    assert os.listdir(dev) == []  # the nodes exist only in the child's namespace
    assert os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{child.pid}/ns/mnt")
    assert f"{dev}/nvidia-uvm" in info["maps"]

    used = used_devices(child.pid, NS_DEVICES)
    assert [(u["name"], u["major"], u["minor"], u["pids"], u["via"]) for u in used] == [
        ("nvidia-uvm", 1, 5, [child.pid], ["maps"]),
        ("nvidiactl", 1, 3, [child.pid], ["fd"]),
    ]


@pytest.mark.realfs
def test_mapping_whose_path_now_names_another_node(spawn: Spawn, tmp_path: Path) -> None:
    """The path resolves to a different inode now: the mapped inode itself is used."""
    _need_unshare()
    dev = tmp_path / "dev"
    dev.mkdir()
    child, _ = spawn(
        NAMESPACED, str(dev), "--replace", prefix=["unshare", "-m", "--propagation", "private"]
    )
    node = os.stat(f"/proc/{child.pid}/root{dev}/nvidia-uvm")
    assert (os.major(node.st_rdev), os.minor(node.st_rdev)) == FULL  # the new node

    used = used_devices(child.pid, NS_DEVICES)
    assert [(u["name"], u["via"]) for u in used] == [
        ("nvidia-uvm", ["maps"]),  # 1:5, what is really mapped; 1:7 is not reported
        ("nvidiactl", ["fd"]),
    ]


@pytest.mark.realfs
def test_mapping_of_an_unlinked_node_is_skipped(spawn: Spawn, tmp_path: Path) -> None:
    """' (deleted)' mappings are skipped, as documented; an open fd still counts."""
    _need_unshare()
    dev = tmp_path / "dev"
    dev.mkdir()
    child, info = spawn(
        NAMESPACED, str(dev), "--unlink", prefix=["unshare", "-m", "--propagation", "private"]
    )
    assert f"{dev}/nvidia-uvm (deleted)" in info["maps"]
    used = used_devices(child.pid, NS_DEVICES)
    assert [(u["name"], u["via"]) for u in used] == [("nvidiactl", ["fd"])]


SHARED_INODE = """
    import json, os, stat, subprocess, sys
    dev = sys.argv[1]
    mount = ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", dev]
    subprocess.run(mount, check=True, timeout=10)
    os.mknod(f"{dev}/a", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.link(f"{dev}/a", f"{dev}/b")
    ready_r, ready_w = os.pipe()
    kid = os.fork()
    if kid == 0:
        map_only(f"{dev}/b")
        os.write(ready_w, b"x")
        sys.stdin.read()
        os._exit(0)
    os.read(ready_r, 1)
    map_only(f"{dev}/a")
    os.unlink(f"{dev}/a")
    print(json.dumps({"kid": kid, "maps": open("/proc/self/maps").read()}), flush=True)
    sys.stdin.read()
"""


@pytest.mark.realfs
def test_an_unlinked_name_does_not_hide_the_inode_mapped_through_another(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The root maps a node through a name since unlinked (' (deleted)', skipped); its child
    maps the same inode through a hard link that stands: the walk, which examines each inode
    once for the whole tree, still finds it in the child."""
    _need_unshare()
    dev = tmp_path / "dev"
    dev.mkdir()
    child, info = spawn(
        SHARED_INODE, str(dev), prefix=["unshare", "-m", "--propagation", "private"]
    )
    assert f"{dev}/a (deleted)" in info["maps"]
    used = used_devices(child.pid, NS_DEVICES)
    assert [(u["name"], u["pids"], u["via"]) for u in used] == [
        ("nvidia-uvm", [info["kid"]], ["maps"]),
    ]


# --------------------------------------------------------------------------------------------
# Maps a workload can craft: a file name with "\r", and a maps file of 63 MiB


def test_a_carriage_return_in_a_mapped_name_forges_no_maps_line(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A name holding "\\r" plus a fake maps line must not make /dev/full count as used.

    The kernel escapes only "\\n" in maps paths; splitting on anything else (splitlines
    splits on "\\r" too) turns the rest of the name into a line of its own.
    """
    full = os.stat("/dev/full")
    fake = (
        f"7f0000000000-7f0000001000 r--p 00000000 "
        f"{os.major(full.st_dev):02x}:{os.minor(full.st_dev):02x} {full.st_ino} "
    )
    directory = tmp_path / f"x\r{fake}" / "dev"
    directory.mkdir(parents=True)
    (directory / "full").write_bytes(b"\0" * 8192)
    child, info = spawn(
        """
        import json, sys
        map_only(sys.argv[1])
        print(json.dumps({"maps": open("/proc/self/maps", "rb").read().decode("latin-1")}))
        sys.stdin.read()
        """,
        str(directory / "full"),
    )
    [line] = [line for line in info["maps"].split("\n") if "\r" in line]
    # The control: cut at "\r", the rest of the name is a valid line mapping /dev/full itself.
    forged = proctree._parse_maps_line(line.split("\r", 1)[1])
    assert forged is not None and (forged.path, forged.inode) == ("/dev/full", full.st_ino)
    assert proctree._stat_mapping(child.pid, forged, "/proc") is not None

    devices = [_device("nvidia7", *FULL, kind="gpu")]
    assert used_devices(child.pid, devices) == []
    assert FULL not in open_char_devices([child.pid])


MANY_MAPPINGS = 60_000

MAPPER = f"""
    import json, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_RDONLY)
    # Offset 0 every time: neighbours cannot merge into one mapping.
    for _ in range({MANY_MAPPINGS}):
        address = _libc.mmap(None, 4096, 1, 2, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
    os.close(fd)
    print(json.dumps({{}}), flush=True)
    sys.stdin.read()
"""

# VmHWM, not ru_maxrss: the latter carries the parent's peak over fork and exec.
MEASURE = """
import sys
from watcher.criu.proctree import used_devices
pid = int(sys.argv[1])
libraries = set()
used = used_devices(pid, [], library_suffix=".so.580.95.05", libraries=libraries)
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak.split()[1], len(libraries))
"""


def test_reading_63_mib_of_maps_stays_in_bounded_memory(spawn: Spawn, tmp_path: Path) -> None:
    """60,000 mappings of a long-named file: the maps are streamed, not read whole.

    Read whole (the first version), this made pre-dump peak at 204 MiB.
    """
    with open("/proc/sys/vm/max_map_count") as file:
        if int(file.read()) < MANY_MAPPINGS + 1000:
            pytest.skip("vm.max_map_count is below the 61,000 mappings this test needs")
    long_dir = tmp_path.joinpath(*["d" * 250] * 4)
    long_dir.mkdir(parents=True)
    target = long_dir / "libcuda.so.580.95.05"
    target.write_bytes(b"\0" * 4096)
    child, _ = spawn(MAPPER, str(target))
    with open(f"/proc/{child.pid}/maps", "rb") as file:
        size = sum(len(chunk) for chunk in iter(lambda: file.read(1 << 20), b""))
    assert size > 60 * 1024 * 1024
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(child.pid)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    )
    peak_kib, libraries = (int(value) for value in done.stdout.split())
    assert libraries == 1
    assert peak_kib < 32 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for {size >> 20} MiB of maps"


# --------------------------------------------------------------------------------------------
# The tree's root


def test_environment_picks_the_names_and_bounds_the_values() -> None:
    env_child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('{}', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={
            "CUDA_VISIBLE_DEVICES": "0,1",
            "NVIDIA_VISIBLE_DEVICES": "x" * 100_000,
            "OTHER": "CUDA_VISIBLE_DEVICES=no",
            "BAD": "caf\xe9",
        },
        start_new_session=True,
    )
    try:
        _read_json_line(env_child)
        names = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
        found = proctree.environment(env_child.pid, names, limit=64)
        assert found == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "x" * 64}
        assert proctree.environment(env_child.pid, ["BAD"]) == {"BAD": "caf\xe9"}
        assert proctree.is_running(env_child.pid)
    finally:
        _kill_group(env_child)
    assert not proctree.is_running(env_child.pid)
    assert proctree.environment(env_child.pid, names) == {}
    assert not proctree.is_running(0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05\n", "libcuda.so.580.95.05"),
        (b"/usr/lib/libcuda.so.580.95.05 (deleted)\n", "libcuda.so.580.95.05"),
        (b"/usr/lib/libcuda.so.1", None),
        (b"/usr/lib/libcuda.so.580.95.05.bak", None),
        (b"/opt/caf\xe9/libnvidia-ml.so.580.95.05", "libnvidia-ml.so.580.95.05"),
        (b"/x/\xff.so.580.95.05", "\\xff.so.580.95.05"),
        (b"/x/" + b"a" * 300 + b".so.580.95.05", None),  # longer than any file name
    ],
)
def test_library_names(raw: bytes, expected: str | None) -> None:
    assert proctree._library_name(raw, b".so.580.95.05") == expected
