"""Every protocol op through the real daemon, bad requests, and many clients at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import watcher
from watcher import client

from .harness import DEV_ROOT, TIMEOUT, Daemon, Namespace, Subscription, device, names

pytestmark = pytest.mark.realfs


def test_get_and_path(daemon: Daemon) -> None:
    reply = daemon.get()
    assert reply["ok"] is True
    assert reply["generation"] == reply["map"]["generation"]
    assert set(reply["map"]) >= {"generation", "updated", "driver", "devices", "gpus", "problems"}
    # An NVIDIA host: the AMD object says nothing is there.
    assert reply["map"]["amd"] == {"loaded": False, "dev_root": None}
    assert reply["map"]["gpus"] == [
        {
            "minor": 0,
            "bus_id": "0000:3b:00.0",
            "model": "NVIDIA H200",
            "uuid": "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
            "device": f"{DEV_ROOT}/nvidia0",
            "family": "nvidia",
        }
    ]

    path = daemon.request({"op": "path", "name": "nvidia-uvm"})
    assert path["ok"] is True
    assert path["generation"] == reply["generation"]
    assert path["path"] == f"{DEV_ROOT}/nvidia-uvm"
    with pytest.raises(client.ServerError) as absent:
        daemon.request({"op": "path", "name": "nvidia7"})
    assert absent.value.code == "not-found"
    assert "nvidiactl" in str(absent.value)  # says what is there instead


def test_path_of_an_invalid_node_is_not_found_and_says_why(daemon: Daemon, host: Namespace) -> None:
    generation = daemon.get()["generation"]
    host.chmod(f"{DEV_ROOT}/nvidiactl", 0o600)  # still valid: mode is reported, not judged
    host.unlink(f"{DEV_ROOT}/nvidia0")
    host.mknod(f"{DEV_ROOT}/nvidia0", 195, 3)
    daemon.wait_map(lambda m: (device(m, "nvidia0") or {}).get("minor") == 3)
    assert daemon.get()["generation"] > generation
    with pytest.raises(client.ServerError) as invalid:
        daemon.request({"op": "path", "name": "nvidia0"})
    assert invalid.value.code == "not-found"
    assert "minor 3, expected 0" in str(invalid.value)
    assert daemon.request({"op": "path", "name": "nvidiactl"})["path"] == f"{DEV_ROOT}/nvidiactl"


def test_wait_times_out_returns_at_once_and_wakes_on_a_change(
    daemon: Daemon, host: Namespace
) -> None:
    generation = daemon.get()["generation"]
    started = time.monotonic()
    with pytest.raises(client.ServerError) as timed_out:
        daemon.request({"op": "wait", "after": generation, "timeout": 0.2})
    assert timed_out.value.code == "timeout"
    assert 0.2 <= time.monotonic() - started < TIMEOUT

    past = daemon.request({"op": "wait", "after": generation - 1, "timeout": 5})
    assert past["generation"] == generation

    with client.Connection(daemon.socket, timeout=TIMEOUT) as connection:
        # `after` omitted: the current generation.
        connection.send({"op": "wait", "timeout": TIMEOUT})
        host.mknod(f"{DEV_ROOT}/nvidia-modeset", 195, 254)
        woken = connection.receive()
    assert woken["generation"] == generation + 1
    assert "nvidia-modeset" in names(woken["map"])


def test_subscribe_sends_the_map_then_one_line_per_generation(
    daemon: Daemon, host: Namespace
) -> None:
    with daemon.subscribe() as subscription:
        first = subscription.first
        assert set(first) >= {"ok", "generation", "map"}
        assert first["map"] == daemon.get()["map"]
        host.mknod(f"{DEV_ROOT}/nvidia1", 195, 1)
        line = subscription.next()
        assert set(line) >= {"ok", "generation", "changes", "map"}
        assert line["changes"] == [
            {"change": "added", "name": "nvidia1", "path": f"{DEV_ROOT}/nvidia1"}
        ]
        assert line["map"] == daemon.get()["map"]


def test_rescan_and_status(daemon: Daemon) -> None:
    before = daemon.request({"op": "status"})["status"]
    assert set(before) >= {
        "version",
        "uptime_s",
        "generation",
        "clients",
        "scans",
        "events",
        "uevents",
        "last_scan_ms",
    }
    assert before["version"] == watcher.__version__
    assert before["clients"] == 1  # this very connection
    assert before["scans"] >= 1
    assert before["last_scan_ms"] > 0

    rescanned = daemon.request({"op": "rescan"})
    assert rescanned["ok"] is True
    # Nothing changed on the host: same generation, same map.
    assert rescanned["generation"] == before["generation"]
    after = daemon.request({"op": "status"})["status"]
    assert after["scans"] > before["scans"]
    assert after["uptime_s"] >= before["uptime_s"]


def test_bad_requests_cost_only_their_own_connection(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(TIMEOUT)
        raw.connect(daemon.socket)
        lines = raw.makefile("rb")
        for bad in (b'{"op":"nope"}', b"not json", b"", b'{"op":"path"}'):
            raw.sendall(bad + b"\n")
            reply = json.loads(lines.readline())
            assert reply["ok"] is False
            assert reply["error"]["code"] == "bad-request", (bad, reply)
        raw.sendall(b'{"op":"get","extra":[1,2]}\n')
        assert json.loads(lines.readline())["ok"] is True

        raw.sendall(b"x" * (64 * 1024 + 10) + b"\n")
        reply = json.loads(lines.readline())
        assert reply["error"]["code"] == "too-large"
        assert lines.readline() == b""  # closed
        lines.close()
    assert daemon.get()["ok"] is True


def generation_at_least(generation: int) -> Callable[[dict[str, Any]], bool]:
    return lambda device_map: device_map["generation"] >= generation


def test_concurrent_clients_during_changes(daemon: Daemon, host: Namespace) -> None:
    start = daemon.get()["generation"]
    changes = 3
    subscriptions = [Subscription(daemon.socket) for _ in range(4)]
    stop = threading.Event()

    def getter() -> list[int]:
        seen: list[int] = []
        with client.Connection(daemon.socket, timeout=TIMEOUT) as connection:
            # Until told to stop, and at least 50 requests. The stop flag is read before
            # the request is sent, so the last request starts after the last change was
            # published (a request in flight when the flag was set may predate it).
            while True:
                stopped = stop.is_set()
                seen.append(connection.request({"op": "get"})["generation"])
                if stopped and len(seen) >= 50:
                    break
        return seen

    def follow(subscription: Subscription) -> list[dict[str, Any]]:
        with subscription:
            return subscription.until(lambda m: m["generation"] >= start + changes)

    with ThreadPoolExecutor(max_workers=12) as pool:
        try:
            getters = [pool.submit(getter) for _ in range(8)]
            followers = [pool.submit(follow, s) for s in subscriptions]
            for minor in range(1, changes + 1):
                host.mknod(f"{DEV_ROOT}/nvidia{minor}", 195, minor)
                daemon.wait_map(generation_at_least(start + minor))
        finally:
            # Set before the pool joins its threads, whatever happened above.
            stop.set()
        seen_by_getters = [future.result(TIMEOUT) for future in getters]
        seen_by_followers = [future.result(TIMEOUT) for future in followers]
    for seen in seen_by_getters:
        assert seen == sorted(seen), "a client saw the generation go backwards"
        assert start <= seen[0]
        assert seen[-1] == start + changes
    for lines in seen_by_followers:
        assert [line["generation"] for line in lines] == list(range(start + 1, start + changes + 1))
        assert [c["name"] for line in lines for c in line["changes"]] == [
            f"nvidia{minor}" for minor in range(1, changes + 1)
        ]
