"""watcher.daemon.systemd against real sockets and the real systemd-socket-activate binary."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.daemon.systemd import Notifier, NotifyError, listen_fds, watchdog_interval

REPO = Path(__file__).resolve().parents[2]
SOCKET_ACTIVATE = Path("/usr/bin/systemd-socket-activate")
TIMEOUT = 10.0


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _recv(listener: socket.socket) -> dict[str, str]:
    data = listener.recv(4096)
    assert data.endswith(b"\n")
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    assert len(fields) == len(data.decode().splitlines()), "one assignment per line"
    return fields


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(TIMEOUT)
        yield path, sock


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"gdw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        yield "@" + name, sock


# --- sd_notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["path_listener", "abstract_listener"])
def test_notify_messages_arrive(which: str, request: pytest.FixtureRequest) -> None:
    address, listener = request.getfixturevalue(which)
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        notifier.ready()
        assert _recv(listener) == {"READY": "1"}
        notifier.status("driver 580.95.05\ndev root /dev\n")
        assert _recv(listener) == {"STATUS": "driver 580.95.05 dev root /dev"}
        notifier.watchdog()
        assert _recv(listener) == {"WATCHDOG": "1"}
        notifier.stopping()
        assert _recv(listener) == {"STOPPING": "1"}
        notifier.notify("ERRNO=5", EXTEND_TIMEOUT_USEC=1000)
        assert _recv(listener) == {"ERRNO": "5", "EXTEND_TIMEOUT_USEC": "1000"}


def test_reloading_carries_monotonic_usec_in_the_same_datagram(
    path_listener: tuple[str, socket.socket],
) -> None:
    address, listener = path_listener
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        before = time.monotonic()
        notifier.reloading()
        after = time.monotonic()
    fields = _recv(listener)
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    usec = int(fields["MONOTONIC_USEC"])
    assert int(before * 1e6) - 1 <= usec <= int(after * 1e6) + 1


def test_notify_value_with_newline_is_refused(path_listener: tuple[str, socket.socket]) -> None:
    address, _ = path_listener
    with (
        Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier,
        pytest.raises(ValueError, match="newline"),
    ):
        notifier.notify(STATUS="a\nREADY=1")


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_notifier_is_a_noop_without_notify_socket(environ: dict[str, str]) -> None:
    with Notifier.from_env(environ) as notifier:
        assert not notifier.enabled
        notifier.ready()
        notifier.status("x")
        notifier.watchdog()
        notifier.reloading()
        notifier.stopping()


def test_notifier_rejects_unsupported_address() -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})


def test_notify_error_when_socket_path_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
    with Notifier.from_env({"NOTIFY_SOCKET": str(path)}) as notifier:
        # Bound but closed: nobody reads.
        with pytest.raises(NotifyError) as refused:
            notifier.ready()
        assert refused.value.errno == errno.ECONNREFUSED
        assert str(path) in str(refused.value)
        path.unlink()
        with pytest.raises(NotifyError) as missing:
            notifier.ready()
        assert missing.value.errno == errno.ENOENT
        assert str(path) in str(missing.value)
        assert isinstance(missing.value, OSError)


def test_notify_error_when_abstract_listener_is_gone() -> None:
    address = f"@gdw-test-{uuid.uuid4().hex}"
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        with pytest.raises(NotifyError) as raised:
            notifier.watchdog()
        assert raised.value.errno == errno.ECONNREFUSED
        assert address in str(raised.value)


def test_full_manager_queue_is_an_error_not_a_stall(
    path_listener: tuple[str, socket.socket],
) -> None:
    address, _ = path_listener
    with Notifier.from_env({"NOTIFY_SOCKET": address}) as notifier:
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(NotifyError) as raised:
            while time.monotonic() < deadline:
                notifier.watchdog()
        assert raised.value.errno == errno.EAGAIN


# --- watchdog ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid())}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({"WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_interval_rejects_bad_values(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        watchdog_interval(environ)


# --- sd_listen_fds, in process (nothing touches fd 3 here) ------------------------------


def test_listen_fds_ignores_another_pid_and_unsets() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_fds(environ) == []
    assert environ == {}


def test_listen_fds_without_activation() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) == []
    assert environ == {"PATH": "/bin"}


def test_listen_fds_unset_false_keeps_environment() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(environ, unset=False) == []
    assert environ == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"LISTEN_FDS": "many"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}, "LISTEN_FDNAMES"),
    ],
)
def test_listen_fds_rejects_bad_environment(extra: dict[str, str], match: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), **extra}
    with pytest.raises(ValueError, match=match):
        listen_fds(environ)
    assert environ == {}, "unset even when refusing"


def test_listen_fds_rejects_bad_pid() -> None:
    with pytest.raises(ValueError, match="LISTEN_PID"):
        listen_fds({"LISTEN_PID": "init", "LISTEN_FDS": "1"})


# --- sd_listen_fds, in a child that really holds fd 3 -----------------------------------

REPORT = """
def report(socks):
    return {
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
        "sockets": [
            {"name": s.name, "fd": s.socket.fileno(),
             "inheritable": os.get_inheritable(s.socket.fileno()),
             "address": s.socket.getsockname()}
            for s in socks
        ],
    }
"""

ACTIVATED_CHILD = (
    "import json, os\nfrom watcher.daemon.systemd import listen_fds\n"
    + REPORT
    + """
socks = listen_fds()
out = report(socks)
for s in socks:
    s.socket.settimeout(10)
    conn, _ = s.socket.accept()
    with conn:
        conn.sendall(s.name.encode() + b"\\n")
    s.socket.close()
print(json.dumps(out), flush=True)
"""
)

PASSED_FD_CHILD = (
    "import json, os, sys\n"
    + REPORT
    + """
src = int(sys.argv[1])
if src != 3:
    os.dup2(src, 3)
    os.close(src)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="api")
from watcher.daemon.systemd import listen_fds
try:
    out = report(listen_fds())
except ValueError as exc:
    out = {"error": str(exc), "env": {k: os.environ.get(k) for k in ("LISTEN_PID",)},
           "fd3_open": os.path.exists("/proc/self/fd/3")}
print(json.dumps(out), flush=True)
"""
)


def _wait_for_path(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, proc.communicate(timeout=TIMEOUT)
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.skipif(
    not SOCKET_ACTIVATE.exists(), reason=f"{SOCKET_ACTIVATE} (systemd) is not installed"
)
def test_listen_fds_under_real_systemd_socket_activate(tmp_path: Path) -> None:
    paths = [tmp_path / "api.sock", tmp_path / "metrics.sock"]
    argv = [str(SOCKET_ACTIVATE)]
    for path in paths:
        argv += ["-l", str(path)]
    argv += ["--fdname=api:metrics", sys.executable, "-c", ACTIVATED_CHILD]
    with subprocess.Popen(
        argv,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            for path in paths:
                _wait_for_path(path, proc)
            # systemd-socket-activate execs the child only once a connection arrives.
            replies = []
            for path in paths:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(TIMEOUT)
                    client.connect(str(path))
                    replies.append(client.makefile("rb").readline())
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert replies == [b"api\n", b"metrics\n"]
    out = json.loads(stdout)
    assert out["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert out["sockets"] == [
        {"name": "api", "fd": 3, "inheritable": False, "address": str(paths[0])},
        {"name": "metrics", "fd": 4, "inheritable": False, "address": str(paths[1])},
    ]


def _run_with_fd_3(sock_or_fd: socket.socket | int) -> dict[str, object]:
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    proc = subprocess.run(
        [sys.executable, "-c", PASSED_FD_CHILD, str(fd)],
        pass_fds=(fd,),
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_listen_fds_adopts_a_passed_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        out = _run_with_fd_3(listener)
    assert out["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert out["sockets"] == [{"name": "api", "fd": 3, "inheritable": False, "address": str(path)}]


def test_listen_fds_refuses_a_socket_that_is_not_listening(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "idle.sock"))
        out = _run_with_fd_3(sock)
    assert "listening AF_UNIX SOCK_STREAM" in str(out["error"])
    assert "fd 3 (api)" in str(out["error"])
    assert out["fd3_open"] is True, "a refused descriptor is left as found"


def test_listen_fds_refuses_a_datagram_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "dgram.sock"))
        out = _run_with_fd_3(sock)
    assert "listening AF_UNIX SOCK_STREAM" in str(out["error"])
    assert "SOCK_DGRAM" in str(out["error"])


def test_listen_fds_refuses_a_tcp_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        out = _run_with_fd_3(sock)
    assert "AF_INET" in str(out["error"])


def test_listen_fds_refuses_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        out = _run_with_fd_3(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "not a socket" in str(out["error"])
