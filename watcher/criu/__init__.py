"""The CRIU action script: record GPU devices at pre-dump, stop a doomed restore early.

CRIU runs the script by execvp with no arguments, once per stage, and reads its exit code; a
non-zero exit aborts the dump or the restore. Its stdout and stderr land in CRIU's log, so
every line printed here starts `gpu-device-watcher:` and can be found there.

This runs inside every dump and every restore, once for each of CRIU's stages, so it is
built for start-up time: this module imports only `os` and `sys`; the stage that has work to
do imports its own module (`dump`, `restore`), which imports the lean socket client and the
/proc walker (stdlib only); msgspec and the scanner are imported only when the daemon cannot
be reached and the action scans directly; asyncio, anyio and argparse never.

The parts, each stdlib only:

- `text`: the lines for CRIU's log, every value from a record or a process escaped;
- `settings`: the few config keys the action reads (tomllib, only when they matter);
- `hostmap`: this host's map, from the daemon or a direct scan;
- `recordfile`: reading a record from a possibly hostile image directory, and its shape;
- `gate`: the restore gate, pure (record + map + policy -> verdict);
- `dump`, `restore`: the two stages that do something, and `restore-check`.
"""

from __future__ import annotations

import os
import sys

from watcher.contract import CONFIG_ENV, RECORD_NAME, RECORD_VERSION

# Not `from typing import TYPE_CHECKING`: typing costs milliseconds at every one of CRIU's
# stages, and mypy honours any constant of this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import NoReturn

__all__ = [
    "CONFIG_ENV",
    "RECORD_NAME",
    "RECORD_VERSION",
    "console_main",
    "exit_now",
    "main",
]

# CONFIG_ENV: CRIU starts the action with no arguments, so a config at another path than the
# default can only be named through the environment CRIU passes on (the caller's).

EXIT_OK, EXIT_REFUSE, EXIT_USAGE = 0, 1, 2


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the action CRIU names in CRTOOLS_SCRIPT_ACTION; the exit code CRIU acts on."""
    environ = os.environ if environ is None else environ
    action = environ.get("CRTOOLS_SCRIPT_ACTION")
    if action not in ("pre-dump", "pre-restore"):
        if not action:
            from watcher.criu.text import say  # noqa: PLC0415 (the error path only)

            say("CRTOOLS_SCRIPT_ACTION is not set: this command is run by CRIU's --action-script")
            return EXIT_USAGE
        # post-dump, post-restore, pre-resume, post-resume, network-lock, ...: nothing to do.
        return EXIT_OK
    try:
        if action == "pre-dump":
            from watcher.criu.dump import pre_dump  # noqa: PLC0415

            return pre_dump(environ)
        from watcher.criu.restore import pre_restore  # noqa: PLC0415

        return pre_restore(environ)
    except Exception as error:  # noqa: BLE001 (one line in CRIU's log beats a traceback)
        from watcher.criu.text import say, shown  # noqa: PLC0415

        say(f"{action} failed unexpectedly: {type(error).__name__}: {shown(error, 300)}")
        return EXIT_REFUSE


def console_main() -> int:
    """Entry point for `gpu-device-watcher-criu-action` without the CLI's argparse.

    `--cuda-checkpoint WRAPPER FOUND ARGS...`: the `cuda-checkpoint` wrapper that `install-action`
    writes beside this file runs its Python side through the same file (CRIU itself never
    passes an argument)."""
    if sys.argv[1:2] == ["--cuda-checkpoint"] and len(sys.argv) > 3:
        from watcher.criu.cudawrap import main as wrapper_main  # noqa: PLC0415

        return wrapper_main(sys.argv[2], sys.argv[3], sys.argv[4:], os.environ)
    if len(sys.argv) > 1:
        from watcher.criu.text import say, shown  # noqa: PLC0415

        say(f"takes no arguments (CRIU runs it with none), got {shown(sys.argv[1:])}")
        return EXIT_USAGE
    return main()


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once stdout and stderr are flushed, skipping the
    interpreter's teardown.

    Freeing every module and object at exit costs ~2 ms of each stage that starts Python
    (measured: `python -I -c pass` 15.4 ms, with `os._exit(0)` 13.2 ms), and nothing here
    needs it: the action and the wrapper register no atexit handler, start no thread, and
    write their files with os calls that are closed before this. A flush that fails (CRIU
    closed its log pipe) changes nothing: CRIU acts on the exit code alone.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None when CRIU started us with the fd closed
                stream.flush()
        except (OSError, ValueError):
            pass  # nobody is reading any more; the exit code still is
    os._exit(code)
