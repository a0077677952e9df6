"""Node labels and metrics through the real daemon on a GPU-Operator-shaped host.

The feature file is watched with inotify (woken by the rename that replaces it) and the
metrics are scraped over TCP on loopback, both from outside the daemon's mount namespace.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyinotify
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import DRIVER_ROOT, NODES, VERSION, Daemon, Namespace

pytestmark = pytest.mark.realfs

CUDA = f"{DRIVER_ROOT}/usr/bin/cuda-checkpoint"
LABEL = "gpu-device-watcher.feature.node.kubernetes.io/"
GRAMMAR = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def configure(base: Path, text: str) -> None:
    config = base / "config.toml"
    config.write_text(text)
    config.chmod(0o600)


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        assert equals, f"not name=value: {line!r}"
        assert name.startswith(LABEL), name
        assert GRAMMAR.match(value), f"{name}: {value!r} is not a valid label value"
        labels[name.removeprefix(LABEL)] = value
    return labels


def read_labels(path: Path) -> dict[str, str] | None:
    try:
        return parse_labels(path.read_text())
    except FileNotFoundError:
        return None


def wait_labels(
    path: Path, predicate: Callable[[dict[str, str] | None], bool], timeout: float
) -> dict[str, str] | None:
    """The labels once `predicate` holds, woken by inotify on the file's directory."""
    manager = pyinotify.WatchManager()
    mask = pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE
    manager.add_watch(str(path.parent), mask)
    notifier = pyinotify.Notifier(manager, default_proc_fun=lambda _event: None)
    deadline = time.monotonic() + timeout
    try:
        while True:
            labels = read_labels(path)
            if predicate(labels):
                return labels
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such labels within {timeout:g} s; last: {labels}")
            if notifier.check_events(timeout=int(remaining * 1000) + 1):
                notifier.read_events()
                notifier.process_events()
    finally:
        notifier.stop()


def scrape(port: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def metrics(port: int) -> Samples:
    code, text = scrape(port)
    assert code == 200, text
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def only(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (metric, labels), value in found.items() if metric == name}


def one(found: Samples, name: str) -> float:
    (value,) = only(found, name).values()
    return value


@pytest.fixture
def features(base: Path) -> Path:
    directory = base / "features.d"
    directory.mkdir()
    return directory / "gpu-device-watcher"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def published(
    host: Namespace, base: Path, features: Path, port: int, start_daemon: Callable[..., Daemon]
) -> Iterator[Daemon]:
    """A ready operator host: the driver container also ships cuda-checkpoint."""
    host.write(CUDA, "#!/bin/sh\n")
    host.chmod(CUDA, 0o755)
    configure(base, f'nfd_features_file = "{features}"\nmetrics_listen = "127.0.0.1:{port}"\n')
    yield start_daemon()


def test_labels_on_a_ready_host_then_driver_root_gone_then_back(
    published: Daemon, host: Namespace, features: Path
) -> None:
    # Written before READY=1: there to read at once.
    labels = read_labels(features)
    assert labels == {
        "checkpoint-ready": "true",
        "driver-version": VERSION,
        "driver-major": VERSION.split(".")[0],
        "dev-root": "run-nvidia-driver-dev",
        "gpu-count": "1",
        "gpu-model": "NVIDIA-H200",
        "cuda-checkpoint": "true",
    }
    assert os.listdir(features.parent) == [features.name]

    # The driver pod goes away: its root (nodes and cuda-checkpoint) with it.
    host.umount(DRIVER_ROOT, lazy=False)
    gone = time.monotonic()
    labels = wait_labels(
        features, lambda got: got is not None and got["checkpoint-ready"] == "false", 1.0
    )
    elapsed = time.monotonic() - gone
    # The driver is still loaded with its GPU: only the dev root and cuda-checkpoint went.
    assert labels == {
        "checkpoint-ready": "false",
        "driver-version": VERSION,
        "driver-major": VERSION.split(".")[0],
        "gpu-count": "1",
        "gpu-model": "NVIDIA-H200",
        "cuda-checkpoint": "false",
    }
    assert elapsed < 1.0
    published.wait_log(r"checkpoint-ready: false")

    # It comes back (built aside, moved in at once, as a container runtime does).
    stage = host.workdir / "stage"
    host.tmpfs(stage)
    host.populate_dev(stage / "dev", NODES)
    host.write(stage / "usr/bin/cuda-checkpoint", "#!/bin/sh\n")
    host.chmod(stage / "usr/bin/cuda-checkpoint", 0o755)
    host.move(stage, DRIVER_ROOT)
    labels = wait_labels(
        features, lambda got: got is not None and got["checkpoint-ready"] == "true", 10
    )
    assert labels is not None
    assert labels["cuda-checkpoint"] == "true"
    assert labels["dev-root"] == "run-nvidia-driver-dev"
    assert os.listdir(features.parent) == [features.name]


def test_without_cuda_checkpoint_the_host_is_not_ready(
    host: Namespace, base: Path, features: Path, start_daemon: Callable[..., Daemon]
) -> None:
    configure(base, f'nfd_features_file = "{features}"\n')
    daemon = start_daemon()
    labels = read_labels(features)
    assert labels is not None
    assert (labels["checkpoint-ready"], labels["cuda-checkpoint"]) == ("false", "false")
    assert labels["dev-root"] == "run-nvidia-driver-dev"
    assert daemon.get()["map"]["driver"]["cuda_checkpoint"] is None
    # Installed on the host later (a directory nothing watches) and found by the next scan,
    # here one asked for: the map names it, a new generation, the labels follow.
    host.write("/usr/local/bin/cuda-checkpoint", "#!/bin/sh\n")
    host.chmod("/usr/local/bin/cuda-checkpoint", 0o755)
    reply = daemon.request({"op": "rescan"})
    assert reply["map"]["driver"]["cuda_checkpoint"] == "/usr/local/bin/cuda-checkpoint"
    labels = wait_labels(
        features, lambda got: got is not None and got["checkpoint-ready"] == "true", 10
    )
    assert labels is not None
    assert labels["cuda-checkpoint"] == "true"
    daemon.wait_log("cuda-checkpoint: /usr/local/bin/cuda-checkpoint")


def test_metrics_equal_the_map_and_counters_only_grow(published: Daemon, port: int) -> None:
    device_map = published.get()["map"]
    found = metrics(port)
    prefix = "gpu_device_watcher_"
    assert one(found, prefix + "generation") == device_map["generation"]
    assert one(found, prefix + "driver_loaded") == 1
    driver = device_map["driver"]
    assert only(found, prefix + "driver_info") == {
        frozenset({("version", driver["version"]), ("dev_root", driver["dev_root"])}): 1.0
    }
    by_kind = Counter((d["kind"], "true" if d["valid"] else "false") for d in device_map["devices"])
    for labels, value in only(found, prefix + "devices").items():
        key = dict(labels)
        assert value == by_kind.get((key["kind"], key["valid"]), 0), key
    assert sum(only(found, prefix + "devices").values()) == len(device_map["devices"])
    by_code = Counter((p["code"], p["severity"]) for p in device_map["problems"])
    for labels, value in only(found, prefix + "problems").items():
        key = dict(labels)
        assert value == by_code.get((key["code"], key["severity"]), 0), key
    assert sum(only(found, prefix + "problems").values()) == len(device_map["problems"])
    assert one(found, prefix + "checkpoint_ready") == 1
    assert one(found, prefix + "subscribers") == 0

    previous = found
    for _ in range(3):
        published.request({"op": "rescan"})
        found = metrics(port)
        for counter in ("scans_total", "events_total"):
            assert one(found, prefix + counter) >= one(previous, prefix + counter), counter
        assert one(found, prefix + "scans_total") > one(previous, prefix + "scans_total")
        histogram = prefix + "scan_duration_seconds"
        assert one(found, histogram + "_count") == one(found, prefix + "scans_total")
        buckets = only(found, histogram + "_bucket")
        assert buckets[frozenset({("le", "+Inf")})] == one(found, histogram + "_count")
        assert one(found, histogram + "_sum") > 0
        previous = found

    # A subscriber is counted while it is there.
    # A subscriber is counted (registered before its first line, which it has received).
    with published.subscribe():
        found = metrics(port)
        assert one(found, prefix + "subscribers") == 1
        assert one(found, prefix + "clients") >= 1


def test_abuse_of_the_endpoint_does_not_harm_the_daemon(published: Daemon, port: int) -> None:
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        # The 17th and later were refused at once; the socket protocol is untouched.
        refused = idle[-1].recv(4096)
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert published.get()["ok"] is True
    finally:
        for connection in idle:
            connection.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as huge:
        # The daemon stops reading past the limit: the rest may bounce.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            huge.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 1_000_000)
        assert huge.recv(4096).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as garbage:
        garbage.sendall(b"\x00\xff garbage\r\n\r\n")
        assert garbage.recv(4096).startswith(b"HTTP/1.1 400 ")
    published.wait_log(r"metrics: bad request from 127\.0\.0\.1:\d+: malformed request line")
    assert scrape(port)[0] == 200
    assert published.get()["ok"] is True


def test_reload_moves_the_file_and_the_endpoint_and_stop_removes_the_file(
    published: Daemon, base: Path, features: Path, port: int
) -> None:
    assert read_labels(features) is not None
    moved = features.with_name("gdw-moved")
    new_port = free_port()
    configure(base, f'nfd_features_file = "{moved}"\nmetrics_listen = "127.0.0.1:{new_port}"\n')
    published.send_signal(signal.SIGHUP)
    published.wait_log(rf"metrics on http://127\.0\.0\.1:{new_port}/metrics")
    published.wait_log(r"config reloaded")
    labels = wait_labels(moved, lambda got: got is not None, 10)
    assert labels is not None
    assert labels["checkpoint-ready"] == "true"
    assert not features.exists()
    assert scrape(new_port)[0] == 200
    with pytest.raises(ConnectionRefusedError):
        scrape(port)
    # A clean stop takes the labels away: a stopped daemon vouches for nothing.
    assert published.stop() == 0
    assert os.listdir(features.parent) == []
    published.wait_log(rf"removed the NFD feature file {re.escape(str(moved))}")


def test_a_port_in_use_costs_the_metrics_not_the_map(
    base: Path, start_daemon: Callable[..., Daemon]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        configure(base, f'metrics_listen = "127.0.0.1:{port}"\n')
        daemon = start_daemon()
        line = daemon.wait_log(r"metrics_listen 127\.0\.0\.1:\d+: .*metrics not served")
        assert "in use" in line.lower() or "address" in line.lower()
        assert "a reload tries again" in line
        assert daemon.get()["ok"] is True
        status = daemon.request({"op": "status"})["status"]
        assert status["metrics"].startswith(f"not served: metrics_listen 127.0.0.1:{port}: ")
        # A reload with the port still taken: still not served, and still said so.
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_log(r"config reloaded")
        assert daemon.request({"op": "status"})["status"]["metrics"].startswith("not served")
    # The port is free now; the same config, reloaded, binds it.
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_log(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
    assert scrape(port)[0] == 200
    status = daemon.request({"op": "status"})["status"]
    assert status["metrics"] == f"http://127.0.0.1:{port}/metrics"
