"""Mount propagation into a service's namespace, reproduced without systemd.

Run as `unshare --mount --propagation private -- python mountns.py SPEC_JSON`: this process
owns a private "host" namespace, so the real host is never touched. In it:

1. `mount --make-rshared /`, as on a systemd host, and a tmpfs on the work directory;
2. a host tree there (an empty /dev, an empty /run/nvidia/driver, a fake /proc);
3. the daemon in a child namespace built the way systemd builds a service's (namespace.c):
   `unshare --mount --propagation slave` (every mount a slave of ours), a read-only bind
   over /run as ProtectSystem=strict makes it, then `--make-rshared /` (MountFlags= default);
   "private" instead of "slave" is the control, where nothing propagates;
4. once the daemon is READY, the GPU Operator's move: a tmpfs mounted on
   /run/nvidia/driver in *our* namespace, with /dev/nvidiactl and /dev/nvidia0 made in it;
5. then it waits (bounded) for the daemon's map to show them, and prints a JSON report.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.host import FakeHost
from tests.systemd.support import (
    NODES,
    SYSEXEC,
    TIMEOUT,
    Daemon,
    NotifyListener,
    child_env,
    mknod,
    write_proc,
)
from watcher import client

DRIVER_ROOT = "/run/nvidia/driver"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=TIMEOUT, capture_output=True)


def wait_for_map(sock: str, after: int, seconds: float) -> dict[str, Any] | None:
    """The map once its generation passes `after`, or None after `seconds`."""
    try:
        reply = client.request(
            sock, {"op": "wait", "after": after, "timeout": seconds}, timeout=seconds + TIMEOUT
        )
    except client.ServerError as error:
        if error.code == "timeout":
            return None
        raise
    result: dict[str, Any] = reply["map"]
    return result


def main() -> int:
    spec = json.loads(sys.argv[1])
    base = Path(spec["base"])
    sh("mount", "--make-rshared", "/")
    host = FakeHost.under(base)
    host.tmpfs(base, source="gdw-host")
    for directory in ("/dev", DRIVER_ROOT, "/run/nvidia/validations"):
        host.mkdir(directory)
    write_proc(host.proc)
    root, proc = host.root, host.proc
    (base / "config.toml").write_text("")
    sock = str(base / "gdw.sock")

    run_dir = str(root / "run")
    namespace = [
        *("unshare", "--mount", "--propagation", spec["propagation"], "--"),
        *("sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" &&'),
    ]
    namespace[-1] += ' mount --make-rshared / && shift && exec "$@"'
    daemon_argv = [
        *namespace,
        *("sh", run_dir),
        *(sys.executable, str(SYSEXEC), "--confine", "--", *spec["daemon"], "serve"),
        *("--root", str(root), "--proc", str(proc), "--config", str(base / "config.toml")),
        *("--socket", sock, "--log-level", "debug"),
    ]
    listener = NotifyListener()
    daemon = Daemon(daemon_argv, base / "stderr", env=child_env(NOTIFY_SOCKET=listener.address))
    report: dict[str, Any] = {}
    try:
        ready = listener.until_field("READY")
        before = client.request(sock, {"op": "get"})
        report["before"] = before["map"]

        # The GPU Operator's driver container root appears, after the service started.
        driver_root = host.fs(DRIVER_ROOT)
        host.tmpfs(DRIVER_ROOT, source="nvidia-driver")
        for name, (major, minor) in NODES.items():
            mknod(driver_root / "dev" / name, major, minor)

        deadline = time.monotonic() + spec["wait"]
        after_map = None
        generation = before["generation"]
        while (remaining := deadline - time.monotonic()) > 0:
            after_map = wait_for_map(sock, generation, remaining)
            if after_map is None or after_map["driver"]["dev_root"] is not None:
                break
            generation = after_map["generation"]
        report["after"] = after_map
        mountinfo = Path(f"/proc/{ready.pid}/mountinfo").read_text()
        report["daemon_mounts"] = [
            line for line in mountinfo.splitlines() if f" {driver_root} " in line
        ]
    finally:
        with contextlib.suppress(AssertionError):
            daemon.stop()
        report["returncode"] = daemon.process.returncode
        daemon.close()
        listener.close()
        report["log"] = daemon.log()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
