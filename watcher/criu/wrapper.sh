#!/bin/sh
# gpu-device-watcher cuda-checkpoint wrapper
#
# Stands first on CRIU's PATH as `cuda-checkpoint`, where CRIU's CUDA plugin runs it by bare
# name, and runs the real cuda-checkpoint with the same arguments, stdout, stderr and exit
# status. Installed by pip (the wheel's scripts) and by `gpu-device-watcher install-action DIR`.
#
# Every call but a restore of a checkpoint with our record is answered here without Python:
# the first cuda-checkpoint on PATH past this file is exec'd directly. Python (the package's
# own interpreter, by absolute path, isolated with -I so that CRIU's working directory, which
# may be an image directory others can write, and PYTHON* variables count for nothing, and
# with -S so that no .pth file's code runs: watcher/criu/shfront.py's pip_program) runs
# only to find a binary that is not on PATH (the map's driver.cuda_checkpoint, under a driver
# root) and to add --device-map at `--action restore`.

self=$0
case "$self" in
/*) ;;
*) self=${PWD:-.}/$self ;;
esac

# `--action restore` with our record in CRIU's image directory: the device map may be needed.
restore=
previous=
for argument; do
    [ "$previous" = --action ] && [ "$argument" = restore ] && restore=1
    previous=$argument
done
if [ -z "$restore" ] || [ -z "${CRTOOLS_IMAGE_DIR-}" ] ||
    [ ! -f "$CRTOOLS_IMAGE_DIR/gpu-device-watcher.json" ]; then
    restore=
fi

# execvp's order: the first executable of the name past this file. Before this file only when
# this file is not on PATH at all (run by its path); a copy of the wrapper found past it looks
# past itself in turn, so the chain only moves forward and cannot loop.
real=
before=
passed=
saved_ifs=$IFS
IFS=:
set -f
for directory in ${PATH-}; do
    candidate=${directory:-.}/cuda-checkpoint
    [ -f "$candidate" ] && [ -x "$candidate" ] || continue
    if [ "$candidate" -ef "$self" ]; then
        passed=1
    elif [ -n "$passed" ]; then
        real=$candidate
        break
    elif [ -z "$before" ]; then
        before=$candidate
    fi
done
set +f
IFS=$saved_ifs
[ -z "$passed" ] && real=$before
[ -n "$real" ] && [ -z "$restore" ] && exec "$real" "$@"

# The Python side: the interpreter this package was installed for (the shebang pip wrote into
# the sibling `gpu-device-watcher`), else, beside `install-action`'s file, the host's python3
# at a fixed path (never looked up on PATH).
link=$self
if [ -L "$link" ]; then
    link=$(command -p readlink -f -- "$link") || link=$self
fi
here=${link%/*}
python=
if [ -r "$here/gpu-device-watcher" ]; then
    {
        IFS= read -r first
        IFS= read -r second
    } <"$here/gpu-device-watcher"
    case "$first" in
    '#!/bin/sh')
        second=${second#\'\'\'exec\' }
        second=${second%' "$0" "$@"'}
        second=${second#\"}
        python=${second%\"}
        ;;
    '#!'*) python=${first#\#!} ;;
    esac
fi
if [ -n "$python" ] && [ -x "$python" ]; then
    exec "$python" -I -S -c 'import os, sys
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
from watcher.criu.cudawrap import console_main
exit_now(console_main())' "$self" "$real" "$@"
fi
if [ -f "$here/gpu-device-watcher-criu-action" ]; then
    # Beside install-action's file: the system's Python 3.11+ by absolute path alone
    # (watcher/criu/shfront.py, SYSTEM_PYTHON, verbatim).
gdw_python=
gdw_too_old=
for gdw_candidate in /usr/local/bin/python3.[1-9][0-9] /usr/bin/python3.[1-9][0-9] \
    /bin/python3.[1-9][0-9]; do
    if [ ! -f "$gdw_candidate" ] || [ ! -x "$gdw_candidate" ]; then
        continue
    fi
    if [ "${gdw_candidate##*/python3.}" -ge 11 ]; then
        gdw_python=$gdw_candidate
        break
    fi
    gdw_too_old="$gdw_too_old $gdw_candidate"
done
    if [ -n "$gdw_python" ]; then
        exec "$gdw_python" -I -S -c 'import sys
sys.path.insert(0, sys.argv.pop(1))
from watcher.criu import console_main, exit_now
exit_now(console_main())' "$here/gpu-device-watcher-criu-action" \
            --cuda-checkpoint "$self" "$real" "$@"
    fi
fi
echo "gpu-device-watcher: no cuda-checkpoint on this host (none on PATH past $self, and no Python 3.11 or later to ask the map: install gpu-device-watcher or run install-action beside this file)" >&2
exit 127
