"""`install-action DIR`: the CRIU action as one file that runs on the host's own python3.

In the container deployment the daemon lives in a pod, but CRIU runs on the host (under
runc, CRI-O or containerd) and executes the action there, where nothing of ours is
installed. The file written here is a zipapp behind a /bin/sh front (`FRONT`): the front
answers the stages that have nothing to do, finds the system's Python 3.11+ by absolute path
and runs the file with it isolated and without `site` (`python -I -S -c ZIP_PROGRAM FILE`:
the zip is put first on `sys.path`, nothing of CRIU's working directory or environment is,
and no host `.pth` file runs), and without such a Python fails only a stage that needs a GPU
record (the rules: `watcher.criu.shfront`). After the front comes a zip of the `watcher`
modules the action imports, which must need the standard library alone.

Which modules: those `watcher.criu` imports, at module level or inside its functions,
followed through every module found, as read from their source (the action imports most of
its modules lazily, so importing `watcher.criu` alone would show too few). A function of
`watcher.criu` or of one of its modules that imports a third-party package is the direct-scan
fallback (it needs the daemon's dependencies): its imports are left out, and the file instead
refuses a restore it cannot check when the daemon is unreachable, and lets a dump go on only
when the tree holds no NVIDIA device (`watcher.criu.hostmap.without_scanner`). Then every
chosen module is imported in a fresh `python3 -I` that blocks all but the standard library: a
module that needs anything else stops the install, loudly, rather than shipping an action
that breaks inside CRIU.

Standard library only, and imported only by `install-action`.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import py_compile
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from watcher.atomicfile import write_atomically
from watcher.criu.shfront import MIN_PYTHON, STAGES, SYSTEM_PYTHON, WITHOUT_PYTHON

__all__ = [
    "ACTION_NAME",
    "WRAPPER_NAME",
    "ActionFileError",
    "Built",
    "action_modules",
    "build",
    "install",
    "install_wrapper",
    "wrapper_bytes",
]

ACTION_NAME = "gpu-device-watcher-criu-action"
ENTRY = "watcher.criu"
# What the front runs, with the file itself and then CRIU's arguments: the zip put first on
# `sys.path` by hand. `python FILE` would run the zip's `__main__` through `runpy`, whose
# imports (importlib.util, contextlib, collections, functools) were ~5 ms of a ~12 ms stage.
# The front picked a python3.N new enough by its name; `__main__.py` stays for people who run
# the file with a Python of their own.
ZIP_PROGRAM = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
from watcher.criu import console_main, exit_now
exit_now(console_main())"""
# sh reads a script a command at a time, so it never reaches the zip: every path through the
# front ends in `exec` or `exit`. Python's zipimport finds the archive from its end.
FRONT = f"""\
#!/bin/sh
# gpu-device-watcher's CRIU action (written by `gpu-device-watcher install-action`): this
# /bin/sh front, then a zip of the action's Python modules, which the front runs with the
# system's python3.N (N >= {MIN_PYTHON[1]}) by absolute path, isolated (-I) and without site
# (-S). Stages with nothing to do start no Python; without a usable Python only a stage that
# needs a GPU record fails.
{STAGES}
{SYSTEM_PYTHON}
if [ -n "$gdw_python" ]; then
    exec "$gdw_python" -I -S -c '{ZIP_PROGRAM}' "$0" "$@"
fi
{WITHOUT_PYTHON}
""".encode()
# Fixed: the same checkout gives the same bytes, so a re-install is visibly a no-op.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

_MAIN = f'''\
"""gpu-device-watcher's CRIU action (written by `gpu-device-watcher install-action`)."""
import sys

if sys.version_info < {MIN_PYTHON!r}:
    print(
        "gpu-device-watcher: the CRIU action needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or "
        "later; " + sys.executable + " is " + sys.version.split()[0],
        file=sys.stderr,
    )
    sys.exit(1)

from watcher.criu import console_main, exit_now

exit_now(console_main())
'''

# Run as `python3 -I -c _CHECK PACKAGE_PARENT MODULE...`: imports each module with every
# import outside the standard library refused, and says what was loaded and what failed.
_CHECK = """\
import importlib, json, sys
parent, modules = sys.argv[1], sys.argv[2:]
sys.path.insert(0, parent)
allowed = set(sys.stdlib_module_names) | {"watcher"}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in allowed:
            raise ImportError(f"{name} is not in the standard library")
        return None
sys.meta_path.insert(0, Refuse())
failed = {}
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as error:
        failed[module] = f"{type(error).__name__}: {error}"
loaded = sorted(name for name in sys.modules if name == "watcher" or name.startswith("watcher."))
print(json.dumps({"loaded": loaded, "failed": failed}))
"""


class ActionFileError(Exception):
    """The action file cannot be built or written; the message says why and what to do.

    `usage`: the cause is the directory given (exit 2), not the installed package (exit 1).
    """

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class Built:
    data: bytes
    modules: tuple[str, ...]
    left_out: tuple[str, ...]


def _ours(name: str) -> bool:
    return name == "watcher" or name.startswith("watcher.")


def _is_stdlib(name: str) -> bool:
    return name.partition(".")[0] in sys.stdlib_module_names


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ActionFileError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports for mypy, never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST) -> list[ast.AST]:
    """ast.walk, minus what lies under `if TYPE_CHECKING:`."""
    found: list[ast.AST] = []
    pending = [node]
    while pending:
        current = pending.pop()
        if _type_checking_only(current):
            pending.extend(getattr(current, "orelse", []))
            continue
        found.append(current)
        pending.extend(ast.iter_child_nodes(current))
    return found


def _imports(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module an import statement under `node` names (absolute names)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for statement in _walk(node):
        if isinstance(statement, ast.Import):
            found.extend(alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - statement.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append(base)
            # `from watcher import client` names a module, not an attribute.
            found.extend(
                f"{base}.{alias.name}"
                for alias in statement.names
                if _ours(base) and _is_module(f"{base}.{alias.name}")
            )
    return found


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts))]


def action_modules() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the modules the action needs, the watcher modules left out with the fallback).

    Raises ActionFileError when a needed module imports anything but the standard library.
    """
    needed: set[str] = set()
    left_out: set[str] = set()
    third_party: dict[str, set[str]] = {}
    pending = [ENTRY]
    while pending:
        module = pending.pop()
        if module in needed:
            continue
        needed.add(module)
        path = _source(module)
        tree = ast.parse(path.read_bytes(), filename=str(path))
        is_package = path.name == "__init__.py"
        followed: list[str] = []
        for node in tree.body:
            names = _imports(node, module, is_package)
            if (
                (module == ENTRY or module.startswith(ENTRY + "."))
                and isinstance(node, ast.FunctionDef)
                and any(not _is_stdlib(n) and not _ours(n) for n in names)
            ):
                # The direct scan: needs the daemon's dependencies, left out on purpose.
                left_out.update(n for n in names if _ours(n))
                continue
            followed.extend(names)
        for name in followed:
            if _ours(name):
                pending.extend([*_parents(name), name])
            elif not _is_stdlib(name):
                third_party.setdefault(name, set()).add(module)
    if third_party:
        where = "; ".join(f"{name} (in {', '.join(sorted(m))})" for name, m in third_party.items())
        raise ActionFileError(
            f"the CRIU action would import modules outside the standard library: {where}; "
            "it must run on the host's bare python3"
        )
    return tuple(sorted(needed)), tuple(sorted(left_out - needed))


def _check_imports(modules: tuple[str, ...], python: str) -> tuple[str, ...]:
    """Import `modules` in a fresh `python -I` limited to the standard library."""
    parent = str(Path(_source("watcher")).parent.parent)
    try:
        result = subprocess.run(
            [python, "-I", "-c", _CHECK, parent, *modules],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ActionFileError(f"cannot check the action's imports with {python}: {error}") from None
    if result.returncode != 0:
        raise ActionFileError(
            f"checking the action's imports with {python} failed: {result.stderr.strip()}"
        )
    report = json.loads(result.stdout)
    if report["failed"]:
        failures = "; ".join(f"{name}: {why}" for name, why in sorted(report["failed"].items()))
        raise ActionFileError(
            f"the CRIU action's modules do not import with the standard library alone: {failures}"
        )
    extra = sorted(set(report["loaded"]) - set(modules))
    if extra:
        # Imported at run time in a way the source walk cannot see (importlib and such).
        raise ActionFileError(f"the CRIU action imports modules not packed: {', '.join(extra)}")
    return tuple(report["loaded"])


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    # Stored, not deflated: zipimport then reads each module as it is, without importing
    # zlib and inflating at every stage (the file is a few hundred KiB either way).
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def build(python: str = sys.executable) -> Built:
    """The action file's bytes, and which modules it holds."""
    modules, left_out = action_modules()
    _check_imports(modules, python)
    buffer = io.BytesIO()
    # Zip offsets count from the start of the file, the front included (as zipapp writes a
    # shebang).
    buffer.write(FRONT)
    with (
        tempfile.TemporaryDirectory(prefix="gdw-action-") as scratch,
        zipfile.ZipFile(buffer, "w") as archive,
    ):
        archive.writestr(_entry("__main__.py"), _MAIN)
        for module in modules:
            source = _source(module)
            name = module.replace(".", "/") + ("/__init__" if source.name == "__init__.py" else "")
            archive.writestr(_entry(f"{name}.py"), source.read_bytes())
            # Compiled beside the source (zipimport's layout), unchecked: a host python of
            # the same version skips compiling at every CRIU stage; another one compiles.
            compiled = os.path.join(scratch, f"{module}.pyc")
            py_compile.compile(
                str(source),
                cfile=compiled,
                dfile=f"{ACTION_NAME}/{name}.py",
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            archive.writestr(_entry(f"{name}.pyc"), Path(compiled).read_bytes())
    return Built(buffer.getvalue(), modules, left_out)


WRAPPER_NAME = "cuda-checkpoint"


def wrapper_bytes() -> bytes:
    """The `cuda-checkpoint` wrapper's /bin/sh front, as the wheel installs it."""
    return Path(__file__).with_name("wrapper.sh").read_bytes()


def install_wrapper(directory: str) -> str:
    """Write `directory/cuda-checkpoint` (the wrapper) atomically, mode 0755; its path.

    Beside the action file it runs its Python side through that file on the host's python3
    (`--cuda-checkpoint`), so the host needs nothing else of ours."""
    try:
        write_atomically(directory, WRAPPER_NAME, wrapper_bytes(), mode=0o755)
    except OSError as error:
        target = os.path.join(directory, WRAPPER_NAME)
        raise ActionFileError(f"cannot write {target}: {error.strerror or error}") from None
    return os.path.join(directory, WRAPPER_NAME)


def install(directory: str, built: Built) -> str:
    """Write `directory/gpu-device-watcher-criu-action` atomically, mode 0755; its path."""
    target = os.path.join(directory, ACTION_NAME)
    if not os.path.lexists(directory):
        raise ActionFileError(f"{directory} does not exist; create it first", usage=True)
    if not os.path.isdir(directory):
        raise ActionFileError(f"{directory} is not a directory", usage=True)
    try:
        # Mode 0755 whatever the umask; CRIU finds the old file or the whole new one.
        write_atomically(directory, ACTION_NAME, built.data, mode=0o755)
    except OSError as error:
        raise ActionFileError(f"cannot write {target}: {error.strerror or error}") from None
    return target
