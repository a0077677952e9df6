"""The daemon's side of Type=notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING, in order,
as a service manager listening on NOTIFY_SOCKET sees them; reloads good and bad; the journal.

The daemon runs through `sysexec.py`, which does what systemd does before exec: it sets
WATCHDOG_PID to the daemon's own pid and applies NoNewPrivileges=, an empty
CapabilityBoundingSet= and MemoryDenyWriteExecute= (the parts of the unit's sandbox that need
no namespace), so these tests also show that the daemon lives with them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from watcher import client

from .support import (
    JOURNAL_LINE,
    SYSEXEC,
    TIMEOUT,
    VERSION,
    Daemon,
    Host,
    NotifyListener,
    child_env,
    daemon_command,
    lines,
    mknod,
    monotonic_usec,
    passes_fd,
    without_traceback,
)

WATCHDOG_USEC = 200_000  # pings every 100 ms


def serve_argv(host: Host, config: Path, sock: Path, *before: str) -> list[str]:
    return [
        *(sys.executable, str(SYSEXEC), "--watchdog-pid", "--confine", *before, "--"),
        *daemon_command(),
        "serve",
        *host.view_args(),
        *("--config", str(config), "--socket", str(sock)),
    ]


def _starts_confined_and_ready(daemon: Daemon, listener: NotifyListener, sock: Path) -> None:
    """Confined (no capabilities, no new privileges), answering, then READY=1 and STATUS=."""
    listener.until_field("READY")
    confined = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
    )
    assert int(confined["CapBnd"], 16) == int(confined["CapEff"], 16) == 0, confined
    assert confined["NoNewPrivs"] == "1", confined
    # The server accepts before READY=1: a unit ordered after us finds it answering.
    first = client.request(str(sock), {"op": "get"})
    assert first["map"]["driver"]["dev_root"] == "/dev"
    status = listener.until_field("STATUS").fields["STATUS"]
    assert status.startswith(f"driver {VERSION}, 2 devices in /dev"), status


def _pings_every_half_watchdog(listener: NotifyListener) -> None:
    pings = [listener.until_field("WATCHDOG") for _ in range(4)]
    # Receipt times, so only an upper bound holds under load; 100 ms is the nominal gap.
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert all(gap < 1.0 for gap in gaps), gaps


def _a_good_reload(
    daemon: Daemon,
    listener: NotifyListener,
    *,
    host: Host,
    config: Path,
    subscriber: client.Connection,
    generation: int,
) -> None:
    config.write_text('driver_roots = ["/alt"]\nlog_level = "debug"\n')
    before = monotonic_usec()
    daemon.signal(signal.SIGHUP)
    reloading = listener.until_field("RELOADING")
    # In the same datagram, a CLOCK_MONOTONIC timestamp taken after our signal.
    assert reloading.fields["RELOADING"] == "1"
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()
    listener.until_field("READY", "READY=1 after the reload")
    status = listener.until_field("STATUS").fields["STATUS"]
    assert status.startswith(f"driver {VERSION}, 2 devices in /alt/dev"), status
    update = subscriber.receive()
    assert update["generation"] == generation + 1
    assert update["map"]["driver"]["dev_root"] == "/alt/dev"
    assert update["map"]["driver"]["source"] == "config"
    # The watches follow the new root, and debug logging is on.
    mknod(host.root / "alt/dev/nvidia1", 195, 1)
    update = subscriber.receive()
    assert update["generation"] == generation + 2
    assert {"change": "added", "name": "nvidia1", "path": "/alt/dev/nvidia1"} in update["changes"]
    assert [line for line in lines(daemon.log()) if line.startswith("<7>")]


def _a_bad_reload(
    daemon: Daemon,
    listener: NotifyListener,
    *,
    host: Host,
    config: Path,
    sock: Path,
    subscriber: client.Connection,
    generation: int,
) -> None:
    config.write_text('driver_roots = "/elsewhere"\n')
    log_before = lines(daemon.log())
    daemon.signal(signal.SIGHUP)
    listener.until_field("RELOADING")
    listener.until_field("READY", "READY=1 after a refused reload")
    status = listener.until_field("STATUS").fields["STATUS"]
    assert "in /alt/dev" in status, status
    new_lines = lines(daemon.log())[len(log_before) :]
    refused = [line for line in new_lines if "reload refused" in line]
    assert len(refused) == 1, new_lines
    assert refused[0].startswith("<3>"), refused
    assert "driver_roots" in refused[0], refused
    current = client.request(str(sock), {"op": "get"})
    assert current["generation"] == generation + 2
    assert current["map"]["driver"]["dev_root"] == "/alt/dev"
    # The subscriber is still there, and the kept config still watches /alt/dev.
    mknod(host.root / "alt/dev/nvidia2", 195, 2)
    assert subscriber.receive()["generation"] == generation + 3


def test_lifecycle_in_order_with_good_and_bad_reloads(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('driver_roots = ["/"]\nlog_level = "info"\n')
    sock = tmp_path / "gdw.sock"
    env = child_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    with Daemon(
        serve_argv(host, config, sock), tmp_path / "stderr", env=env, journal=True
    ) as daemon:
        # -- start: READY=1 once the first map is published, then STATUS= naming it --------
        _starts_confined_and_ready(daemon, listener, sock)
        # -- WATCHDOG=1 every WATCHDOG_USEC/2 ---------------------------------------------
        _pings_every_half_watchdog(listener)

        subscriber = client.Connection(str(sock), timeout=TIMEOUT)
        subscriber.send({"op": "subscribe"})
        generation = subscriber.receive()["generation"]
        assert not [line for line in lines(daemon.log()) if line.startswith("<7>")]

        # -- a good config: another driver root and log level; clients stay connected -----
        _a_good_reload(
            daemon, listener, host=host, config=config, subscriber=subscriber, generation=generation
        )
        # -- a bad config: refused in one line, the running one kept, READY=1 all the same -
        _a_bad_reload(
            daemon,
            listener,
            host=host,
            config=config,
            sock=sock,
            subscriber=subscriber,
            generation=generation,
        )

        # -- SIGTERM: STOPPING=1, exit 0, connections closed --------------------------------
        daemon.signal(signal.SIGTERM)
        listener.until_field("STOPPING")
        assert daemon.wait() == 0
        with pytest.raises(client.Unreachable, match="closed the connection"):
            subscriber.receive()
        subscriber.close()

        log = daemon.log()
    assert listener.events() == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    # NotifyAccess=main: every datagram came from the main process itself.
    assert {message.pid for message in listener.received} == {daemon.pid}
    without_traceback(log)
    assert all(JOURNAL_LINE.match(line) for line in lines(log)), log


def _feed(fifo: Path, text: str) -> threading.Thread:
    """Write `text` to the FIFO once its reader opens it (in a thread: open() blocks)."""

    def write() -> None:
        # BrokenPipeError: released by _release() rather than read by the daemon.
        with contextlib.suppress(BrokenPipeError), fifo.open("w") as writer:
            writer.write(text)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _release(fifo: Path, thread: threading.Thread) -> None:
    # A writer still blocked in open() (the daemon never came to read) is let go.
    if thread.is_alive():
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    thread.join(TIMEOUT)


def test_watchdog_stops_when_the_event_loop_is_wedged(
    host: Host, listener: NotifyListener, tmp_path: Path
) -> None:
    """WATCHDOG=1 comes from the event loop, not from a thread or timer beside it.

    No hook in the product blocks its loop on request, so the test wedges it the way a real
    bug would, with a blocking call on the loop: the config is a FIFO, and a reload reads the
    config on the loop, so after SIGHUP the loop sits in open() until someone writes. The
    process is alive and running meanwhile (not stopped); only the loop is stuck. The
    pings stop, which is what lets systemd's WatchdogSec= restart a wedged daemon, and
    resume once the loop is free again.
    """
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo, 0o600)
    feeder = _feed(fifo, 'log_level = "info"\n')  # read once at start
    env = child_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        with Daemon(
            serve_argv(host, fifo, tmp_path / "gdw.sock"), tmp_path / "stderr", env=env
        ) as daemon:
            listener.until_field("READY")
            _release(fifo, feeder)
            listener.until_field("WATCHDOG")
            listener.until_field("WATCHDOG")

            daemon.signal(signal.SIGHUP)
            listener.until_field("RELOADING")
            # 1 s is ten ping intervals: not one comes while the loop waits in open().
            listener.quiet_for("WATCHDOG", 1.0)
            state = Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state in {"S", "R"}, f"alive and not stopped, but in state {state}"

            feeder = _feed(fifo, 'log_level = "info"\n')
            listener.until_field("READY", "READY=1 once the loop is free")
            pings = [listener.until_field("WATCHDOG", timeout=1.0) for _ in range(3)]
            assert len(pings) == 3
            assert daemon.stop() == 0
    finally:
        _release(fifo, feeder)


# --- expected conditions: one line each, no traceback --------------------------------------


def _run_serve(
    arguments: list[str], env: dict[str, str], *, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        arguments,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        pass_fds=pass_fds,
    )


def _one_line(done: subprocess.CompletedProcess[str], returncode: int, phrase: str) -> None:
    output = lines(done.stderr)
    assert done.returncode == returncode, done.stderr
    assert len(output) == 1, output
    assert phrase in output[0], output
    # The contract: every error is one line on stderr starting with the command's name.
    assert output[0].startswith("gpu-device-watcher: "), output
    assert done.stdout == ""
    without_traceback(done.stderr)


@pytest.mark.parametrize(
    ("case", "returncode", "phrase"),
    [
        ("root-missing", 2, "--root"),
        ("config-unreadable", 2, "cannot read config"),
        ("config-invalid", 2, "not valid TOML"),
        ("socket-dir-missing", 1, "cannot create the socket directory"),
        ("socket-in-use", 1, "another gpu-device-watcher is serving"),
        ("notify-socket-bad", 1, "NOTIFY_SOCKET"),
        ("watchdog-usec-bad", 1, "WATCHDOG_USEC"),
    ],
)
def test_expected_failures_are_one_line(
    case: str, returncode: int, phrase: str, host: Host, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    sock = tmp_path / "gdw.sock"
    options = {"--config": str(config), "--socket": str(sock)}
    env = child_env()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        if case == "root-missing":
            options["--root"] = str(tmp_path / "missing")
        elif case == "config-unreadable":
            options["--config"] = str(tmp_path)  # a directory: EISDIR even for root
        elif case == "config-invalid":
            config.write_text("driver_roots = [\n")
        elif case == "socket-dir-missing":
            # The socket's own directory is made when missing; its parent is not.
            options["--socket"] = str(tmp_path / "missing" / "sub" / "gdw.sock")
        elif case == "socket-in-use":
            live.bind(str(sock))
            live.listen()
        elif case == "notify-socket-bad":
            env["NOTIFY_SOCKET"] = "vsock:2:1234"
        elif case == "watchdog-usec-bad":
            env["WATCHDOG_USEC"] = "soon"
        argv = [*daemon_command(), "serve", *host.view_args()]
        argv += [item for pair in options.items() for item in pair]
        _one_line(_run_serve(argv, env), returncode, phrase)


def test_a_passed_fd_that_is_no_listening_socket_is_one_line(host: Host, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.bind(str(tmp_path / "idle.sock"))  # bound, never listen()ed
        argv = [
            *(sys.executable, str(SYSEXEC), *passes_fd(idle), "--"),
            *(*daemon_command(), "serve", *host.view_args(), "--config", str(config)),
        ]
        done = _run_serve(argv, child_env(), pass_fds=(idle.fileno(),))
    _one_line(done, 1, "expected a listening AF_UNIX SOCK_STREAM socket")
    assert stat.S_ISSOCK((tmp_path / "idle.sock").lstat().st_mode)


def test_journal_prefixes_only_on_the_journal_stream(host: Host, tmp_path: Path) -> None:
    """JOURNAL_STREAM names the stream; a child whose stderr went elsewhere writes plainly."""
    config = tmp_path / "config.toml"
    config.write_text("")
    base = [*daemon_command(), "serve", *host.view_args(), "--config", str(config)]
    in_use = tmp_path / "gdw.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(in_use))
        live.listen()
        stderr_file = tmp_path / "stderr"
        with stderr_file.open("w") as stream:
            info = os.fstat(stream.fileno())
            stream_id = f"{info.st_dev}:{info.st_ino}"
            subprocess.run(
                [*base, "--socket", str(in_use)],
                env=child_env(JOURNAL_STREAM=stream_id),
                stderr=stream,
                timeout=TIMEOUT,
                check=False,
            )
        # The same variable, inherited by a process whose stderr is a pipe: no prefixes.
        elsewhere = _run_serve(
            [*base, "--socket", str(in_use)], child_env(JOURNAL_STREAM=stream_id)
        )
    message = f"gpu-device-watcher: another gpu-device-watcher is serving {in_use}"
    assert lines(stderr_file.read_text()) == [f"<3>{message}"]
    [plain] = lines(elsewhere.stderr)
    assert plain == message
