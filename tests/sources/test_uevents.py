"""Kernel uevents (watcher.sources.uevents): which messages ask for a rescan, the filter the
kernel runs, the source driven by scripted messages, and the subscription against the real
kernel, unprivileged and in a fresh network namespace.

Messages are written the way the kernel writes them (lib/kobject_uevent.c): the header
`ACTION@DEVPATH`, then `ACTION=`, `DEVPATH=`, `SUBSYSTEM=`, the device's own keys and
`SEQNUM=`, each NUL-terminated. Root can send such bytes on the kernel's group in its own
network namespace, and every listener there receives them as it would the kernel's: the
filter tests do that in a namespace of their own (`unshare --net`), so nothing else on the
machine hears them. Netlink delivers a broadcast to every listener before `sendto`
returns, so what a socket holds afterwards is all it will ever get: no test waits for
silence.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.inprocess import running_daemon
from tests.support.processes import REPO, child_env
from watcher.daemon.scanning import uevent_interest
from watcher.sources import uevents
from watcher.sources.uevents import (
    KERNEL_GROUP,
    NETLINK_KOBJECT_UEVENT,
    UeventInterest,
    UeventSource,
    filter_program,
    relevance,
    subscribe,
)

INTEREST = uevent_interest()
NOBODY = 65534
WAIT_S = 10.0
# A virtual device whose `uevent` file root may write: the kernel then sends a synthetic
# uevent for it (`add`, with SYNTH_UUID) to every listener in every network namespace of
# the initial user namespace.
SYNTHETIC = Path("/sys/devices/virtual/mem/null/uevent")


def kernel_message(action: str, devpath: str, subsystem: str, *extra: str) -> bytes:
    keys = [f"ACTION={action}", f"DEVPATH={devpath}", f"SUBSYSTEM={subsystem}", *extra]
    return (f"{action}@{devpath}\0" + "\0".join([*keys, "SEQNUM=4711"]) + "\0").encode()


RENDER = "/devices/pci0000:00/0000:00:01.1/0000:01:00.0/0000:02:00.0/0000:03:00.0/drm/renderD128"
PARTITION = "/devices/platform/amdgpu_xcp.3/drm/renderD131"

# Each message and the reason it gives to rescan (None: it asks for nothing).
CASES: list[tuple[bytes, str | None]] = [
    (kernel_message("add", "/module/nvidia_uvm", "module"), "uevent: add module nvidia_uvm"),
    (kernel_message("remove", "/module/nvidia_uvm", "module"), "uevent: remove module nvidia_uvm"),
    (kernel_message("add", "/module/nvidia", "module"), "uevent: add module nvidia"),
    (
        kernel_message("remove", "/module/nvidia_modeset", "module"),
        "uevent: remove module nvidia_modeset",
    ),
    (kernel_message("add", "/module/nvidia_drm", "module"), "uevent: add module nvidia_drm"),
    (
        kernel_message("add", "/module/nvidia_peermem", "module"),
        "uevent: add module nvidia_peermem",
    ),
    (kernel_message("remove", "/module/amdgpu", "module"), "uevent: remove module amdgpu"),
    (
        kernel_message("add", RENDER, "drm", "MAJOR=226", "MINOR=128", "DEVNAME=dri/renderD128"),
        "uevent: add drm renderD128",
    ),
    (kernel_message("remove", PARTITION, "drm"), "uevent: remove drm renderD131"),
    # Another module, or a name that only starts like ours.
    (kernel_message("add", "/module/snd_hda_intel", "module"), None),
    (kernel_message("add", "/module/nvidiafb", "module"), None),
    (kernel_message("add", "/module/nvidi", "module"), None),
    (kernel_message("add", "/module/amdgpu/parameters", "module"), None),
    # Actions that neither create nor remove (a module's `change`, a render node's hotplug).
    (kernel_message("change", "/module/nvidia", "module"), None),
    (kernel_message("change", RENDER, "drm", "HOTPLUG=1"), None),
    (kernel_message("bind", "/devices/pci0000:00/0000:00:01.1", "pci"), None),
    # DRM devices that are no render node: a card, a connector.
    (kernel_message("add", "/devices/pci0000:00/0000:00:02.0/drm/card0", "drm"), None),
    (kernel_message("add", "/devices/pci0000:00/0000:00:02.0/drm/card0-DP-1", "drm"), None),
    # A module path under another subsystem, a render-looking path under another one.
    (kernel_message("add", "/module/nvidia", "drm"), None),
    (kernel_message("add", "/devices/virtual/misc/renderD128", "misc"), None),
    # What a busy machine sends all day.
    (
        kernel_message("add", "/devices/virtual/net/veth9a1b2c3", "net", "INTERFACE=veth9a1b2c3"),
        None,
    ),
    (kernel_message("remove", "/devices/virtual/block/loop7", "block", "DEVNAME=loop7"), None),
    (kernel_message("add", "/devices/virtual/mem/null", "mem", "SYNTH_UUID=0"), None),
    # udev's rebroadcast format, and a header with nothing after it.
    (b"libudev\0\xfe\xed\xca\xfe" + bytes(32) + b"SUBSYSTEM=module\0", None),
    (b"add@/module/nvidia", None),
]


def test_the_family_table_names_the_modules() -> None:
    modules = {"nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm", "nvidia_peermem", "amdgpu"}
    assert INTEREST.modules == modules
    assert INTEREST.render_nodes


@pytest.mark.parametrize(("message", "reason"), CASES, ids=lambda value: repr(value)[:48])
def test_relevance(message: bytes, reason: str | None) -> None:
    assert relevance(message, INTEREST) == reason


def test_render_nodes_are_ignored_when_no_family_owns_any() -> None:
    nvidia_only = UeventInterest.of(["nvidia"], render_nodes=False)
    assert relevance(kernel_message("add", RENDER, "drm"), nvidia_only) is None
    assert relevance(kernel_message("add", "/module/nvidia", "module"), nvidia_only) is not None


def test_the_filter_program_fits_the_kernel_limits() -> None:
    program = filter_program(INTEREST)
    assert len(program) % 8 == 0
    assert 0 < len(program) // 8 <= 4096  # BPF_MAXINSNS
    # Conditional jumps reach 255 instructions: a long module list must still assemble.
    many = UeventInterest.of([f"module_{number}" for number in range(100)], render_nodes=False)
    assert len(filter_program(many)) // 8 <= 4096


# --- the source, driven by scripted messages in process ------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._arrived = anyio.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self._arrived.set()
        self._arrived = anyio.Event()

    async def wait_for_count(self, count: int) -> None:
        with anyio.fail_after(WAIT_S):
            while len(self.reasons) < count:
                await self._arrived.wait()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_scripted_messages_drive_the_source_in_order() -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    expected = [reason for _, reason in CASES if reason is not None]
    with sender, UeventSource(INTEREST, sock=receiver) as source:
        recorder = Recorder()
        async with anyio.create_task_group() as group:
            await group.start(source.run, recorder)
            for message, _ in CASES:
                sender.send(message)
            # The last relevant message is the last case but a few: once it is reported,
            # every message before it has been read (one socket, in order).
            await recorder.wait_for_count(len(expected))
            assert recorder.reasons == expected
            # More than one drain's worth at once: all reported, none twice.
            for _ in range(3 * uevents.DRAIN_BATCH):
                sender.send(CASES[0][0])
            await recorder.wait_for_count(len(expected) + 3 * uevents.DRAIN_BATCH)
            assert recorder.reasons[len(expected) :] == [CASES[0][1]] * 3 * uevents.DRAIN_BATCH
            group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_module_uevent_makes_the_daemon_read_proc_devices_again(tmp_path: Path) -> None:
    """The daemon in process, its uevent source reading scripted kernel messages: only
    /proc/devices changes (nvidia_uvm reloaded with another major), then its uevent."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender:
        async with running_daemon(tmp_path, uevents=UeventSource(INTEREST, sock=receiver)) as run:
            run.host.mknod("/dev/nvidia-uvm", 509, 0)
            run.host.proc_devices({"nvidia": 195, "nvidia-uvm": 509})
            await run.ask({"op": "rescan"})
            generation = run.daemon.state.generation
            before = run.daemon.state.current.device("nvidia-uvm")
            assert before is not None and before.valid

            run.host.proc_devices({"nvidia": 195, "nvidia-uvm": 511})
            # Unrelated first: read and ignored, not counted.
            sender.send(kernel_message("add", "/module/snd_hda_intel", "module"))
            sender.send(kernel_message("add", "/module/nvidia_uvm", "module"))
            device_map = await run.next_generation(generation)
            uvm = next(entry for entry in device_map["devices"] if entry["name"] == "nvidia-uvm")
            assert not uvm["valid"]
            assert ("wrong-major", "/dev/nvidia-uvm") in {
                (problem["code"], problem["path"]) for problem in device_map["problems"]
            }
            status = (await run.ask({"op": "status"}))["status"]
            assert status["uevents"] == 1
            assert run.daemon.counters.uevents == 1


@pytest.mark.anyio
async def test_close_ends_a_waiting_run() -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    source = UeventSource(INTEREST, sock=receiver)
    with sender, anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            await group.start(source.run, Recorder())
            source.close()
    source.close()
    assert not source.available


@pytest.mark.anyio
async def test_without_the_socket_the_source_says_so_once_and_stays_quiet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(interest: UeventInterest) -> socket.socket:
        # What socket(2) answers under RestrictAddressFamilies= without AF_NETLINK.
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(uevents, "subscribe", refused)
    with caplog.at_level(logging.WARNING, logger="watcher.sources.uevents"):
        source = UeventSource(INTEREST)
    assert not source.available
    assert [record.getMessage() for record in caplog.records] == [
        "kernel uevents are unavailable (Address family not supported by protocol): module "
        "loads and unloads are seen only at the next other event or rescan"
    ]
    recorder = Recorder()
    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            await group.start(source.run, recorder)
            group.cancel_scope.cancel()
    source.close()
    assert recorder.reasons == []


# --- against the kernel -----------------------------------------------------------------------


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root: unshare --net, sending on the kernel's uevent group"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    done = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, check=False)
    if done.returncode != 0:
        return f"unshare --net failed: {done.stderr.decode(errors='replace').strip()}"
    return None


@pytest.fixture(scope="module")
def own_netns() -> None:
    if (problem := _netns_problem()) is not None:
        pytest.skip(problem)


def _scenario(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-W",
            "error",
            "-m",
            "tests.sources.test_uevents",
            name,
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_kernel_filter_passes_exactly_the_relevant_messages(own_netns: None) -> None:
    done = _scenario("kernel_filter")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_queue_overflow_asks_for_a_rescan(own_netns: None) -> None:
    done = _scenario("overflow")
    assert done.returncode == 0, done.stdout + done.stderr


def _sender() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)


def _queued(sock: socket.socket) -> list[bytes]:
    found = []
    while True:
        try:
            found.append(sock.recv(uevents.RECEIVE_BYTES, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return found


def scenario_kernel_filter() -> None:
    """In a network namespace of its own: every case sent as root on the kernel's group; the
    filtered socket holds exactly the relevant ones, a plain one all of them."""
    with subscribe(INTEREST) as filtered, _sender() as plain, _sender() as sender:
        plain.bind((0, KERNEL_GROUP))
        long_render = kernel_message("add", "/devices/" + "x" * 300 + "/drm/renderD128", "drm")
        for message, _ in [*CASES, (long_render, None)]:
            if message:
                sender.sendto(message, (0, KERNEL_GROUP))
        received = _queued(filtered)
        assert received == [message for message, reason in CASES if reason is not None]
        # Nothing is lost on the way: a socket without the filter has every message.
        assert len(_queued(plain)) == len(CASES) + 1


def scenario_overflow() -> None:
    """More relevant messages than the receive queue holds: ENOBUFS, reported as a loss."""
    sock = subscribe(INTEREST)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with _sender() as sender:
        for _ in range(200):
            sender.sendto(CASES[0][0], (0, KERNEL_GROUP))

    async def main() -> None:
        recorder = Recorder()
        with UeventSource(INTEREST, sock=sock) as source:
            async with anyio.create_task_group() as group:
                await group.start(source.run, recorder)
                with anyio.fail_after(WAIT_S):
                    while "uevent: messages lost (receive queue overflowed)" not in (
                        recorder.reasons
                    ):
                        await recorder.wait_for_count(len(recorder.reasons) + 1)
                group.cancel_scope.cancel()
        # What was queued before the overflow is still reported.
        assert CASES[0][1] in recorder.reasons

    anyio.run(main)


# --- unprivileged, in a fresh network namespace ---------------------------------------------


def _nobody_command(mode: str, *arguments: str) -> list[str]:
    """This checkout's Python as uid 65534, no capabilities, in a new network namespace."""
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    return [
        *("unshare", "--net", "--"),
        *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        *("--inh-caps=-all", "--bounding-set=-all", "--"),
        *(sys.executable, "-I", "-c"),
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]; "
        f"from tests.sources.test_uevents import listen; listen({mode!r}, *{arguments!r})",
    ]


@pytest.fixture
def nobody_in_own_netns(own_netns: None) -> Callable[..., list[str]]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is not installed")
    probe = subprocess.run(
        _nobody_command("probe"), capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip(
            "uid 65534 cannot run this checkout's Python (a private clone or venv): "
            + (probe.stderr.strip().splitlines() or ["no output"])[-1]
        )
    if not os.access(SYNTHETIC, os.W_OK):
        pytest.skip(f"{SYNTHETIC} is not writable here: no synthetic uevent can be sent")
    return _nobody_command


def test_the_subscription_works_unprivileged_in_a_fresh_network_namespace(
    nobody_in_own_netns: Callable[..., list[str]],
) -> None:
    marker = str(uuid.uuid4())
    with subprocess.Popen(
        nobody_in_own_netns("listen", marker),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        ready = _line(child.stdout.fileno())
        assert ready["uid"] == NOBODY and ready["cap_eff"] == "0000000000000000", ready
        assert ready["netns"] != os.stat("/proc/self/ns/net").st_ino, "not a fresh namespace"
        # Root writes; the kernel sends the uevent to every listener, this one included.
        SYNTHETIC.write_text(f"add {marker}")
        stdout, stderr = child.communicate(timeout=WAIT_S + 5)
    assert child.returncode == 0, stdout + stderr
    result = json.loads(stdout.splitlines()[-1])
    # The kernel's message (port id 0) reached the unprivileged listener in its own network
    # namespace, and the daemon's filter kept it out: a `mem` device is nothing of ours.
    assert result == {
        "header": "add@/devices/virtual/mem/null",
        "sender_port": 0,
        "filtered_got_it": False,
    }


def _line(fd: int) -> dict[str, Any]:
    ready, _, _ = select.select([fd], [], [], WAIT_S)
    assert ready, "the listener did not start"
    text = b""
    while not text.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        assert chunk, "the listener exited before it was ready"
        text += chunk
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def listen(mode: str, marker: str = "") -> None:
    """As uid 65534 in a fresh network namespace: subscribe as the daemon does, and beside
    it a plain socket on the same group; report the synthetic uevent carrying `marker`."""
    filtered = subscribe(INTEREST)
    with filtered, _sender() as plain:
        plain.bind((0, KERNEL_GROUP))
        if mode == "probe":
            return
        status = Path("/proc/self/status").read_text()
        print(
            json.dumps(
                {
                    "uid": os.getuid(),
                    "cap_eff": status.split("CapEff:")[1].split()[0],
                    "netns": os.stat("/proc/self/ns/net").st_ino,
                }
            ),
            flush=True,
        )
        wanted = f"SYNTH_UUID={marker}".encode()
        while True:
            ready, _, _ = select.select([plain], [], [], WAIT_S)
            if not ready:
                sys.exit("no synthetic uevent arrived")
            message, (port, _groups) = plain.recvfrom(uevents.RECEIVE_BYTES)
            if wanted in message.split(b"\0"):
                break
        # The kernel delivered to both sockets in the same broadcast: whatever the filtered
        # one holds now is all it will get of it.
        filtered_got_it = any(wanted in queued.split(b"\0") for queued in _queued(filtered))
        header = message.split(b"\0", 1)[0].decode()
        print(
            json.dumps({"header": header, "sender_port": port, "filtered_got_it": filtered_got_it})
        )


SCENARIOS: dict[str, Callable[[], None]] = {
    "kernel_filter": scenario_kernel_filter,
    "overflow": scenario_overflow,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
