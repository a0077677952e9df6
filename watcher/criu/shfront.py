"""The /bin/sh front of every program of ours that CRIU runs, and the rules it keeps.

CRIU runs its action script (and its CUDA plugin runs `cuda-checkpoint`) as root, with every
capability, from CRIU's work directory, which is the image directory unless `--work-dir`
says otherwise, and with CRIU's environment. A checkpointed workload may be able to write
that directory (one it was given, one created in /tmp), so anything there is hostile. Every
program of ours that CRIU runs therefore starts Python by these rules:

1. Stages with nothing to do are answered by sh (`STAGES`): no interpreter starts.
2. The interpreter is an absolute path, never found on `PATH` (an empty or relative entry
   of CRIU's `PATH` is the image directory): the install's own (the shebang pip wrote into
   the sibling console script), or for a file that must run on a bare host the system's
   (`SYSTEM_PYTHON`).
3. It runs with `-I`: neither the working directory nor the script's directory is put on
   `sys.path` (the `-c` form put the working directory first, so a planted `watcher/` or
   `__future__.py` ran as root), and no `PYTHON*` variable (`PYTHONPATH`, `PYTHONHOME`,
   `PYTHONSTARTUP`, ...) and no user site-packages are honoured. The install-action file
   puts itself first on `sys.path` (`actionfile.ZIP_PROGRAM`, given the file's own path).
4. It runs with `-S` as well: the `site` module, which would run the code of every `.pth`
   file in site-packages as root, never starts. A zipapp needs nothing but itself and the
   standard library; a pip-installed front runs `pip_program`, which puts this install's own
   site-packages on `sys.path` itself in a venv, and only elsewhere lets `site` do it.
5. The sh itself uses builtins; a tool from outside runs through `command -p`, which
   searches the system's default path rather than CRIU's `PATH`.

The pip-installed `scripts/gpu-device-watcher-criu-action` carries `STAGES` verbatim (a test
compares them), `install-action` writes `SYSTEM_PYTHON` and `WITHOUT_PYTHON` into its file;
the pip-installed action and `cuda-checkpoint` wrapper run `pip_program` of their module (a
test compares them).
Standard library only (it is text), imported by `install-action` and the tests.
"""

from __future__ import annotations

__all__ = ["MIN_PYTHON", "STAGES", "SYSTEM_PYTHON", "WITHOUT_PYTHON", "pip_program"]

MIN_PYTHON = (3, 11)

# Only pre-dump and pre-restore have work; CRIU runs the action at every stage (20 runs for
# one checkpoint and restore under runc). Arguments mean a person ran it by hand: Python
# answers that with a usage error.
STAGES = """\
case "${CRTOOLS_SCRIPT_ACTION-}" in
pre-dump | pre-restore | "") ;;
*) [ "$#" -eq 0 ] && exit 0 ;;
esac
"""

# Sets gdw_python to the system's python3.N with N >= 11 (the lowest such N: the one a
# distribution ships as its python3 comes first in the usual layouts), by absolute path
# alone; gdw_too_old lists those found older. The version is told by the name, so finding
# the interpreter starts nothing.
SYSTEM_PYTHON = f"""\
gdw_python=
gdw_too_old=
for gdw_candidate in /usr/local/bin/python3.[1-9][0-9] /usr/bin/python3.[1-9][0-9] \\
    /bin/python3.[1-9][0-9]; do
    if [ ! -f "$gdw_candidate" ] || [ ! -x "$gdw_candidate" ]; then
        continue
    fi
    if [ "${{gdw_candidate##*/python3.}}" -ge {MIN_PYTHON[1]} ]; then
        gdw_python=$gdw_candidate
        break
    fi
    gdw_too_old="$gdw_too_old $gdw_candidate"
done
"""

# With no usable interpreter, a stage fails only where a GPU record is needed: pre-restore of
# an image directory that holds our record, and pre-dump of a tree that holds open or maps a
# node whose major /proc/devices gives to a GPU driver (`stat -L` of the tree's fd and
# map_files links gives the device numbers, as the Python side reads them). Everything it
# prints is a number or a fixed word: nothing from the host can forge a line.
WITHOUT_PYTHON = f"""\
gdw_say() {{
    printf 'gpu-device-watcher: %s\\n' "$*"
}}
gdw_need="this host has no Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later for the CRIU \
action (looked for python3.N, N >= {MIN_PYTHON[1]}, in /usr/local/bin, /usr/bin and /bin; \
found:${{gdw_too_old:- none}})"
gdw_fix="install python3 {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or later, e.g. apt-get install \
python3.{MIN_PYTHON[1]}"
case "${{CRTOOLS_SCRIPT_ACTION-}}" in
pre-restore)
    gdw_record="${{CRTOOLS_IMAGE_DIR-}}/gpu-device-watcher.json"
    if [ -e "$gdw_record" ] || [ -L "$gdw_record" ]; then
        gdw_say "the checkpoint holds a GPU record and $gdw_need: $gdw_fix; restore stopped" >&2
        exit 1
    fi
    exit 0
    ;;
pre-dump) ;;
*)
    gdw_say "CRTOOLS_SCRIPT_ACTION is not set: this command is run by CRIU's --action-script;" \\
        "$gdw_need: $gdw_fix" >&2
    exit 2
    ;;
esac
gdw_root=${{CRTOOLS_INIT_PID-}}
case "$gdw_root" in
'' | *[!0-9]*)
    gdw_say "pre-dump needs CRTOOLS_INIT_PID (a pid); $gdw_need: $gdw_fix" >&2
    exit 2
    ;;
esac
if [ ! -r /proc/devices ]; then
    gdw_say "cannot read /proc/devices, so cannot tell whether the tree of pid $gdw_root" \\
        "uses a GPU, and $gdw_need: $gdw_fix; dump stopped" >&2
    exit 1
fi
gdw_majors=
gdw_section=
while read -r gdw_number gdw_name; do
    case "$gdw_number" in
    Character) gdw_section=character ;;
    Block) gdw_section= ;;
    *)
        [ "$gdw_section" = character ] || continue
        case "$gdw_name" in
        nvidia | nvidia-frontend | nvidia-uvm | nvidia-caps | nvidia-caps-imex-channels | \\
            nvidia-nvswitch | kfd)
            gdw_majors="$gdw_majors $gdw_number "
            ;;
        esac
        ;;
    esac
done </proc/devices
if [ -z "$gdw_majors" ]; then
    gdw_say "no GPU driver registered in /proc/devices: nothing to record for the tree of" \\
        "pid $gdw_root, though $gdw_need"
    exit 0
fi
gdw_pending=$gdw_root
gdw_held=
while [ -n "$gdw_pending" ]; do
    set -- $gdw_pending
    [ "$#" -gt 0 ] || break
    gdw_pid=$1
    shift
    gdw_pending=$*
    if [ ! -d "/proc/$gdw_pid/fd" ]; then
        [ "$gdw_pid" = "$gdw_root" ] || continue
        gdw_say "pid $gdw_root is not running; dump stopped" >&2
        exit 1
    fi
    for gdw_children in /proc/"$gdw_pid"/task/*/children; do
        [ -r "$gdw_children" ] || continue
        gdw_kids=
        read -r gdw_kids <"$gdw_children" || :
        gdw_pending="$gdw_pending $gdw_kids"
    done
    gdw_seen=
    gdw_stat=$(command -p stat -L -c '%F|%t|%T' -- "/proc/$gdw_pid/fd" /proc/"$gdw_pid"/fd/* \\
        /proc/"$gdw_pid"/map_files/* 2>/dev/null)
    while IFS='|' read -r gdw_type gdw_major gdw_minor; do
        case "$gdw_type" in
        directory) gdw_seen=1 ;;
        'character special file')
            case "$gdw_majors" in
            *" $((0x$gdw_major)) "*)
                gdw_held="$gdw_held $((0x$gdw_major)):$((0x$gdw_minor))"
                ;;
            esac
            ;;
        esac
    done <<gdw_end
$gdw_stat
gdw_end
    if [ -z "$gdw_seen" ]; then
        # A child that exited while it was read is not part of the dump any more.
        [ "$gdw_pid" != "$gdw_root" ] && [ ! -d "/proc/$gdw_pid" ] && continue
        gdw_say "cannot read /proc/$gdw_pid (stat -L failed), so cannot tell whether the tree" \\
            "of pid $gdw_root uses a GPU, and $gdw_need: $gdw_fix; dump stopped" >&2
        exit 1
    fi
done
if [ -n "$gdw_held" ]; then
    gdw_say "the tree of pid $gdw_root holds GPU device(s)$gdw_held and $gdw_need:" \\
        "$gdw_fix; dump stopped" >&2
    exit 1
fi
gdw_say "no GPU device in use by the tree of pid $gdw_root; no record written, though" \\
    "$gdw_need"
exit 0
"""


# The `python -I -S -c` program of a pip-installed front. `site` costs ~1 ms of a stage that
# has ~3 ms of work, and it runs every `.pth` file's code; a venv's layout is fixed, so the
# program finds this install's packages itself: the venv's site-packages (a wheel install)
# and, after it, the source tree an editable install's `.pth` names (hatchling's file, a
# path alone), in the order `site` would put them. The interpreter is this install's (the
# front read it from the sibling console script), so its venv is this install's. Anything
# else (a system-wide install, another layout) gets `site` as before. Single quotes cannot
# appear: the front quotes the program in them.
_PIP_PROGRAM = """\
import os, sys
venv = os.path.dirname(os.path.dirname(sys.executable))
packages = "%s/lib/python%d.%d/site-packages" % (venv, *sys.version_info[:2])
roots = [packages]
try:
    with open(packages + "/_editable_impl_gpu_device_watcher.pth", "rb") as editable:
        roots.append(editable.readline().strip().decode())
except (OSError, UnicodeError):
    pass
if os.path.isfile(venv + "/pyvenv.cfg") and any(
    root.startswith("/") and os.path.isfile(root + "/watcher/criu/__init__.py")
    for root in roots
):
    sys.path += roots
else:
    import site
    site.main()
from watcher.criu import exit_now
from {module} import console_main
exit_now(console_main())"""


def pip_program(module: str) -> str:
    """The program a pip-installed front passes to `python -I -S -c`: `module`'s
    `console_main` with this install's packages on `sys.path`, then `exit_now`."""
    return _PIP_PROGRAM.format(module=module)
