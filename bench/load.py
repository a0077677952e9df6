"""Closed-loop load on a JSON Lines socket, and the minimal server it is compared with.

`python -m bench.load run --socket S --clients N --seconds T [--requests R]` opens N
connections and keeps one `get` in flight on each (a client sends its next request when
its reply has arrived), for T seconds or R replies, from one process with one epoll loop so
that the load itself costs as little CPU as Python allows. It prints one JSON object:
requests, seconds, requests_per_s, p50_ms, p99_ms.

`python -m bench.load echo --socket S --reply FILE` serves FILE's bytes as the reply to
every request line: a stdlib server with no parsing, no asyncio, no limits. It is the
baseline for throughput: as fast as a single-threaded Python server can answer.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import time
from pathlib import Path

GET = b'{"op":"get"}\n'
# Every wait of this process is bounded: a daemon that stops answering ends the run.
STALL_S = 10.0


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _connect(path: str, clients: int, poller: select.epoll) -> dict[int, socket.socket]:
    """`clients` non-blocking connections to `path`, registered for reading, by fd."""
    connections: dict[int, socket.socket] = {}
    for _ in range(clients):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(STALL_S)
        sock.connect(path)
        sock.setblocking(False)
        connections[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    return connections


def run_load(path: str, clients: int, seconds: float, requests: int | None) -> dict[str, float]:
    poller = select.epoll()
    connections = _connect(path, clients, poller)
    buffers = dict.fromkeys(connections, b"")
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    clock = time.perf_counter
    started = clock()
    deadline = started + seconds
    for fd, sock in connections.items():
        sent_at[fd] = clock()
        sock.send(GET)
    done = 0
    in_flight = clients
    last_progress = started
    try:
        while in_flight:
            ready = poller.poll(1.0)
            now = clock()
            if not ready:
                if now - last_progress > STALL_S:
                    raise TimeoutError(f"no reply for {STALL_S:g} s")
                continue
            last_progress = now
            for fd, _ in ready:
                sock = connections[fd]
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("the server closed a connection")
                data = buffers[fd] + chunk
                if not data.endswith(b"\n"):
                    buffers[fd] = data
                    continue
                buffers[fd] = b""
                latencies.append((now - sent_at[fd]) * 1000)
                done += 1
                if now < deadline and (requests is None or done + in_flight <= requests):
                    sent_at[fd] = now
                    sock.send(GET)
                else:
                    poller.unregister(fd)
                    in_flight -= 1
    finally:
        elapsed = clock() - started
        for sock in connections.values():
            sock.close()
        poller.close()
    return {
        "clients": clients,
        "requests": done,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(done / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5), 4),
        "p99_ms": round(percentile(latencies, 0.99), 4),
    }


def serve_echo(path: str, reply: bytes) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(socket.SOMAXCONN)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    connections: dict[int, socket.socket] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                sock, _ = listener.accept()
                sock.setblocking(True)
                connections[sock.fileno()] = sock
                poller.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = connections[fd]
            data = sock.recv(1 << 16)
            if not data:
                poller.unregister(fd)
                del connections[fd]
                sock.close()
                continue
            # Closed-loop clients send whole lines; one reply per newline.
            sock.sendall(reply * data.count(b"\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("--socket", required=True)
    run.add_argument("--clients", type=int, default=1)
    run.add_argument("--seconds", type=float, default=2.0)
    run.add_argument("--requests", type=int)
    echo = commands.add_parser("echo")
    echo.add_argument("--socket", required=True)
    echo.add_argument("--reply", type=Path, required=True)
    arguments = parser.parse_args(argv)
    if arguments.command == "echo":
        serve_echo(arguments.socket, arguments.reply.read_bytes())
        return 0
    result = run_load(arguments.socket, arguments.clients, arguments.seconds, arguments.requests)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
