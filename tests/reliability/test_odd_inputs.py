"""Unreadable and odd inputs: a problem in the map or a logged warning, never a crash.

EACCES as root: root reads through mode 000 with CAP_DAC_OVERRIDE, so those runs go through
`setpriv --bounding-set=-dac_override,-dac_read_search`. The process stays uid 0 (it can still
reach the interpreter under /root as that directory's owner) but permission bits now bind it,
so a mode-000 file is EACCES exactly as for an unprivileged daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watcher.config import resolve_settings
from watcher.probe import scan

from .harness import (
    BUS_ID,
    Client,
    Daemon,
    Host,
    run_scan,
    run_scenario,
    write_atomic,
    write_config,
)

pytestmark = pytest.mark.reliability

MIB = 1 << 20
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def codes(device_map: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in device_map["problems"]:
        found.setdefault(problem["code"], []).append(problem["message"])
    return found


def scan_json(host: Host, config: Path, mountinfo: str, **kwargs: Any) -> dict[str, Any]:
    code, out, err = run_scan(host, config, mountinfo, **kwargs)
    assert code == 0, err
    assert "Traceback" not in err, err
    result: dict[str, Any] = json.loads(out.decode("utf-8"))  # strict UTF-8: valid JSON text
    return result


def serve_and_get(
    host: Host, base: Path, config: Path, mountinfo: str, **kw: Any
) -> dict[str, Any]:
    socket_path = base / "odd.sock"
    daemon = Daemon(host.options(socket_path, config, mountinfo), base / "odd.log", **kw)
    try:
        with Client(socket_path) as client:
            reply = client.ask({"op": "get"})
            assert client.ask({"op": "rescan"})["ok"]
            assert client.ask({"op": "status"})["ok"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert "Traceback" not in daemon.log.read_text(errors="replace"), daemon.log_tail()
    assert reply["ok"], reply
    return reply


# --- /proc files missing or unreadable -----------------------------------------------------


def test_proc_files_missing(base: Path, host: Host, record: Callable[..., None]) -> None:
    config = write_config(base / "c.toml")
    shutil.rmtree(host.proc)
    host.proc.mkdir()
    for result in (
        scan_json(host, config, "/proc/self/mountinfo"),
        serve_and_get(host, base, config, "/proc/self/mountinfo")["map"],
    ):
        found = codes(result)
        assert "cannot read" in found["driver-not-loaded"][0]
        assert "ENOENT" in found["driver-not-loaded"][0]
        assert result["driver"]["version"] is None
        assert result["gpus"] == []
    record("/proc/devices, version and gpus/ missing (scan and serve)", 2, 0)


@pytest.fixture
def setpriv() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) not found: cannot drop CAP_DAC_OVERRIDE for an EACCES test")


def test_unreadable_inputs_are_problems(
    base: Path, host: Host, setpriv: None, record: Callable[..., None]
) -> None:
    config = write_config(base / "c.toml")
    mountinfo = base / "mountinfo"
    mountinfo.write_text(Path("/proc/self/mountinfo").read_text())
    dev = host.fs("/run/nvidia/driver/dev")
    for path in (
        host.proc / "devices",
        host.proc / "driver/nvidia/version",
        host.proc / "driver/nvidia/gpus",
        mountinfo,
        dev,
    ):
        path.chmod(0)
    try:
        results = [
            scan_json(host, config, str(mountinfo), prefix=NO_DAC),
            serve_and_get(host, base, config, str(mountinfo), python=[*NO_DAC, *_python()])["map"],
        ]
    finally:
        dev.chmod(0o755)
    for result in results:
        found = codes(result)
        assert "EACCES" in found["driver-not-loaded"][0], found
        # An unreadable dev root is said to be unreadable, not empty.
        assert any("cannot be read (EACCES" in m for m in found["driver-root-empty"]), found
        assert "cannot read /run/nvidia/driver/dev (EACCES" in found["no-device-root"][0]
        assert any("cannot read the mount table" in m for m in found["nodev-mount"]), found
    record("/proc files, mount table and dev root unreadable (EACCES; scan and serve)", 2, 0)


def _python() -> list[str]:
    import sys

    return [sys.executable, "-m", "watcher"]


# --- big and odd mount tables and lines ------------------------------------------------------


def _mount_table(host: Host, count: int, *, nodev: bool) -> str:
    lines = ["1 0 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"]
    lines += [
        f"{n} 1 0:{n % 4096} / /var/lib/kubelet/pods/{n:06d}/volumes/kubernetes.io~projected/"
        f"kube-api-access-{n} rw,relatime shared:{n} - tmpfs tmpfs rw,size=1024k"
        for n in range(2, count)
    ]
    options = "rw,nosuid,nodev" if nodev else "rw,nosuid"
    lines.append(
        f"{count} 1 0:77 / {host.fs('/run/nvidia/driver')} {options} shared:9 - tmpfs tmpfs rw"
    )
    return "\n".join(lines) + "\n"


def test_a_mount_table_of_100000_lines(base: Path, host: Host, record: Callable[..., None]) -> None:
    config = write_config(base / "c.toml")
    mountinfo = base / "tables" / "mountinfo"
    write_atomic(mountinfo, _mount_table(host, 100_000, nodev=False))
    started = time.monotonic()
    result = scan_json(host, config, str(mountinfo))
    scan_s = time.monotonic() - started
    assert all(device["valid"] for device in result["devices"]), result
    assert {d["mount"]["id"] for d in result["devices"]} == {100_000}

    socket_path = base / "big.sock"
    daemon = Daemon(host.options(socket_path, config, str(mountinfo)), base / "big.log")
    try:
        with Client(socket_path) as client:
            first = client.ask({"op": "get"})
            # The table file changes (atomically, as a fixture is rewritten): now nodev.
            changed_at = time.monotonic()
            write_atomic(mountinfo, _mount_table(host, 100_000, nodev=True))
            reply = client.ask({"op": "wait", "after": first["generation"], "timeout": 10})
            update_s = time.monotonic() - changed_at
            status = client.ask({"op": "status"})["status"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert reply["ok"], reply
    assert not any(device["valid"] for device in reply["map"]["devices"])
    assert "nodev-mount" in codes(reply["map"])
    record(
        "mount table of 100,000 lines (--mountinfo file; scan, serve, rewrite)",
        3,
        0,
        scan_process_s=round(scan_s, 2),
        daemon_update_s=round(update_s, 2),
        daemon_scan_ms=status["last_scan_ms"],
    )


def test_lines_of_1_mib(base: Path, host: Host, record: Callable[..., None]) -> None:
    big = "x" * MIB
    config = write_config(base / "c.toml")
    with (host.proc / "devices").open("a") as file:
        file.write(f"  7 {big}\nCharacter devices:\nnot-a-number {big}\n")
    write_atomic(host.proc / "driver/nvidia/version", f"NVRM version: {big}\n")
    with (host.proc / f"driver/nvidia/gpus/{BUS_ID}/information").open("a") as file:
        file.write(f"Model: {big}\n")
    write_atomic(
        host.fs("/run/nvidia/validations/driver-ready"), f"X={big}\nNVIDIA_DRIVER_ROOT=/{big}\n"
    )
    mountinfo = base / "mountinfo"
    mountinfo.write_text(
        Path("/proc/self/mountinfo").read_text()
        + f"999 1 0:99 / /{big} rw - tmpfs tmpfs rw\n{big}\n"
        + f"998 1 0:98 / {host.fs('/run/nvidia/driver')} rw - tmpfs tmpfs {big}\n"
    )
    for result in (
        scan_json(host, config, str(mountinfo)),
        serve_and_get(host, base, config, str(mountinfo))["map"],
    ):
        found = codes(result)
        # The parse error quotes its line, shortened: one bad line cannot bloat every reply.
        assert len(found["driver-not-loaded"][0]) < 1000
        assert "could not be parsed" in found["nodev-mount"][0]
        assert len(found["nodev-mount"][0]) < 1000
    record("lines of 1 MiB in /proc files, driver-ready and the mount table", 2, 0)


def test_a_mount_point_that_is_not_utf8(
    namespaces: None, base: Path, record: Callable[..., None]
) -> None:
    """A real driver root named with bytes FF FE, on a tmpfs whose source is FF FE too."""
    (base / "ns").mkdir()
    log = base / "daemon.log"
    result = run_scenario("odd_bytes", {"workdir": str(base / "ns"), "log": str(log)}, 120)
    explain = f"{json.dumps(result)[:3000]}\n{log.read_text(errors='replace')[-3000:]}"
    assert result["scan_exit"] == 0, explain
    scanned = result["scan_json"]
    assert scanned is not None, explain  # stdout was valid UTF-8 JSON
    assert scanned["driver"]["dev_root"] == "/run/\\xff\\xfe/driver/dev"
    assert {d["mount"]["source"] for d in scanned["devices"]} == {"\\xff\\xfe"}
    assert "daemon_error" not in result, explain
    live = result["get"]["map"]
    assert live["driver"] == scanned["driver"]
    assert result["path"] == {
        "ok": True,
        "generation": result["get"]["generation"],
        "path": "/run/\\xff\\xfe/driver/dev/nvidiactl",
    }
    assert result["change_seen"], explain  # the non-UTF-8 dev root is watched too
    assert result["daemon_exit"] == 0
    record("non-UTF-8 bytes in a driver root, its mount point and mount source", 1, 0)


# --- malformed input, fuzzed -------------------------------------------------------------------

_junk_text = st.one_of(
    st.binary(max_size=400),
    st.lists(
        st.sampled_from(
            [
                b"Character devices:",
                b"Block devices:",
                b"195 nvidia",
                b"509 nvidia-uvm",
                b"x nvidia",
                b"  ",
                b"\xff\xfe",
                b"Device Minor: \t 0",
                b"Device Minor: 99999999",
                b"Model: \xc3",
                b"NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.1",
                b"NVIDIA_DRIVER_ROOT=/run/nvidia/driver",
                b"NVIDIA_DEV_ROOT=relative",
                b"NVIDIA_DRIVER_ROOT=/\x00",
                b"=",
                b"\\",
                b"\\1",
            ]
        ),
        max_size=8,
    ).map(b"\n".join),
)
_mount_lines = st.lists(
    st.one_of(
        st.binary(max_size=120).filter(lambda line: b"\n" not in line),
        st.tuples(
            st.integers(-2, 200),
            st.integers(-2, 200),
            st.sampled_from(
                [
                    "/",
                    "/run",
                    "/run/nvidia/driver",
                    "/run/nvidia/driver/dev",
                    "/dev",
                    "rel",
                    "/a\\040b",
                    "/\\777",
                    "/\\",
                ]
            ),
            st.sampled_from(["rw", "rw,nodev", "", ","]),
            st.sampled_from(
                [
                    " - tmpfs tmpfs rw",
                    " shared:1 - tmpfs tmpfs rw",
                    " -",
                    " - a b",
                    " - a b c d",
                    "",
                ]
            ),
        ).map(lambda f: f"{f[0]} {f[1]} 0:1 / {{ROOT}}{f[2]} {f[3]}{f[4]}".encode()),
    ),
    max_size=12,
).map(b"\n".join)


def test_malformed_inputs_never_crash_a_scan(
    base: Path, host: Host, soak: int, record: Callable[..., None]
) -> None:
    """Random and mangled /proc files, driver-ready and mount tables: a map that encodes."""
    config = write_config(base / "c.toml")
    mountinfo = base / "mountinfo"
    view = resolve_settings(
        {
            "root": str(host.root),
            "proc": str(host.proc),
            "mountinfo": str(mountinfo),
            "config": str(config),
        }
    ).view
    tried = 0

    @settings(
        max_examples=300 * soak,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        devices=_junk_text,
        version=_junk_text,
        information=_junk_text,
        ready=_junk_text,
        table=_mount_lines,
    )
    def one(devices: bytes, version: bytes, information: bytes, ready: bytes, table: bytes) -> None:
        nonlocal tried
        tried += 1
        write_atomic(host.proc / "devices", devices)
        write_atomic(host.proc / "driver/nvidia/version", version)
        write_atomic(host.proc / f"driver/nvidia/gpus/{BUS_ID}/information", information)
        write_atomic(host.fs("/run/nvidia/validations/driver-ready"), ready)
        write_atomic(mountinfo, table.replace(b"{ROOT}", os.fsencode(host.root)))
        device_map = scan(view)
        encoded = msgspec.json.encode(device_map)
        assert json.loads(encoded)["generation"] == 0

    one()
    record(
        "malformed /proc files, driver-ready and mount tables (hypothesis, in-process scan)",
        tried,
        0,
    )


def test_the_daemon_keeps_serving_through_malformed_inputs(
    base: Path, host: Host, record: Callable[..., None]
) -> None:
    """The same inputs under a live daemon: each rewrite is picked up, none kills it."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    config = write_config(base / "c.toml")
    mountinfo = base / "tables" / "mountinfo"
    write_atomic(mountinfo, Path("/proc/self/mountinfo").read_bytes())
    socket_path = base / "mal.sock"
    daemon = Daemon(host.options(socket_path, config, str(mountinfo)), base / "mal.log")
    inputs = [
        (mountinfo, (fixtures / "mountinfo/malformed.mountinfo").read_bytes()),
        (host.proc / "devices", (fixtures / "proc-devices/malformed.txt").read_bytes()),
        (
            host.fs("/run/nvidia/validations/driver-ready"),
            b"\xff\xfe\x00garbage\nNVIDIA_DRIVER_ROOT",
        ),
        (mountinfo, b"\x00" * 4096),
        (mountinfo, Path("/proc/self/mountinfo").read_bytes()),
    ]
    try:
        with Client(socket_path) as client:
            generation = client.ask({"op": "get"})["generation"]
            for path, data in inputs:
                write_atomic(path, data)
                # /proc is never watched (procfs sends no events): ask for the rescan.
                reply = client.ask({"op": "rescan"})
                assert reply["ok"], reply
                assert reply["generation"] >= generation
                generation = reply["generation"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert "Traceback" not in daemon.log.read_text(errors="replace")
    record("malformed inputs under a live daemon", len(inputs), 0)


def test_setpriv_really_drops_dac_override(base: Path, setpriv: None) -> None:
    """The EACCES tests are only as good as this: mode 000 must refuse a capability-less root."""
    secret = base / "secret"
    secret.write_text("x")
    secret.chmod(0)
    done = subprocess.run([*NO_DAC, "cat", str(secret)], capture_output=True, check=False)
    assert done.returncode != 0
    assert b"Permission denied" in done.stderr
