"""The namespace host: a small process that owns a private mount namespace and changes it.

Started by `harness.Namespace` as `unshare --mount --propagation private python nshost.py W`.
It mounts a tmpfs on the work directory W (so nothing it writes outlives it), then executes
one JSON command per line from stdin (`tests.support.host.FakeHost.execute`) and answers one
JSON line per command on stdout, after the change is done. The daemon under test runs in the
same namespace (`nsenter -t PID -m`), so it sees exactly these mounts in its own
/proc/self/mountinfo.

Run by path, before anything else is imported; every path it receives is a path as this
process sees it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.host import MS_PRIVATE, MS_REC, FakeHost, mount


def main() -> int:
    workdir = Path(sys.argv[1])
    # Nodes appear with their final mode in one step, so a rescan never sees one half made.
    os.umask(0)
    # unshare(1) made every mount private already; a tmpfs of our own holds all we write.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("gdw-test", workdir, "tmpfs", 0, "mode=755")
    host = FakeHost.under(workdir)
    print(json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            host.execute(json.loads(line))
        except Exception as error:  # noqa: BLE001 (reported to the test, which raises)
            print(
                json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True
            )
        else:
            print(json.dumps({"ok": True, "result": None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
