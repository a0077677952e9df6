"""Kernel uevents through the real daemon: a module reload that changes only /proc/devices.

This kernel has no loadable modules, so a module's uevent cannot come from it; root sends the
same bytes on the kernel's group (the daemon listens in this, the host's, network namespace),
which every listener receives as it would the kernel's. Nothing else changes: no mount, no
node, so only the uevent can make the daemon look again.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.sources.test_uevents import kernel_message

from .harness import DEV_ROOT, UVM_MAJOR, Daemon, Namespace, device, problem_codes

pytestmark = pytest.mark.realfs

# The bound from the module's uevent to the subscriber's line: the 20 ms debounce,
# one scan, one line.
LATENCY_BOUND_S = 0.1
TIMEOUT_S = 10.0


def _send_on_the_kernels_group(message: bytes) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15) as sender:
        sender.sendto(message, (0, 1))


class _Lines:
    """A subscription read straight from its socket, so that one read can be bounded alone."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(path)
        self.sock.sendall(b'{"op":"subscribe"}\n')
        self._buffer = b""
        self.first = self.next(TIMEOUT_S)

    def next(self, timeout: float) -> dict[str, object]:
        self.sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the subscription"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        parsed: dict[str, object] = json.loads(line)
        return parsed


def test_a_module_uevent_makes_a_stale_uvm_node_wrong_major_within_100_ms(
    daemon: Daemon, host: Namespace
) -> None:
    if "uevents are unavailable" in daemon.log_text:
        pytest.skip("this kernel or sandbox gives the daemon no uevent socket (its log says so)")
    status = daemon.request({"op": "status"})["status"]
    lines = _Lines(daemon.socket)
    try:
        generation = lines.first["generation"]
        # nvidia_uvm reloaded with another major: /proc/devices alone changes.
        host.proc_devices({"nvidia": 195, "nvidia-uvm": UVM_MAJOR + 2})
        # Unrelated uevents first (dropped in the kernel), then another family's module,
        # then the one that matters.
        _send_on_the_kernels_group(kernel_message("add", "/module/snd_hda_intel", "module"))
        _send_on_the_kernels_group(kernel_message("add", "/devices/virtual/net/veth0", "net"))
        sent = time.monotonic()
        _send_on_the_kernels_group(kernel_message("add", "/module/nvidia_uvm", "module"))
        try:
            line = lines.next(LATENCY_BOUND_S)
        except TimeoutError:
            pytest.fail(f"no subscriber line within {LATENCY_BOUND_S * 1000:g} ms of the uevent")
        latency_ms = (time.monotonic() - sent) * 1000
    finally:
        lines.sock.close()
    assert line["generation"] == generation + 1
    device_map = line["map"]
    assert isinstance(device_map, dict)
    uvm = device(device_map, "nvidia-uvm")
    assert uvm is not None and not uvm["valid"], uvm
    assert ("wrong-major", f"{DEV_ROOT}/nvidia-uvm") in problem_codes(device_map)
    after = daemon.request({"op": "status"})["status"]
    # One uevent passed the filter and asked for the rescan; the unrelated ones never
    # reached the daemon.
    assert after["uevents"] == status["uevents"] + 1, (status, after)
    assert after["events"] == status["events"] + 1, (status, after)
    print(f"uevent -> subscriber: {latency_ms:.1f} ms")


def test_a_module_unload_drops_the_uvm_major(daemon: Daemon, host: Namespace) -> None:
    """rmmod nvidia_uvm: the node stays, its major is gone; the map must stop calling it
    valid at the module's `remove`."""
    if "uevents are unavailable" in daemon.log_text:
        pytest.skip("this kernel or sandbox gives the daemon no uevent socket (its log says so)")
    with daemon.subscribe() as subscription:
        host.proc_devices({"nvidia": 195})
        _send_on_the_kernels_group(kernel_message("remove", "/module/nvidia_uvm", "module"))
        line = subscription.next()
    uvm = device(line["map"], "nvidia-uvm")
    assert uvm is not None and not uvm["valid"], uvm
    assert daemon.request({"op": "status"})["status"]["uevents"] == 1
