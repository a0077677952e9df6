"""The checks `criu`, `criu-config` and `criu-plugin`: the CRIU that runs, what it reads,
which action it runs and which plugins it loads."""

from __future__ import annotations

import io
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import watcher
from watcher.doctor.host import HostTree
from watcher.doctor.model import Check, fail, ok, skip, verdict, warn

__all__ = [
    "ACTION_DIR",
    "CONFIG_FILES",
    "ActionFacts",
    "ConfigFacts",
    "CriuFacts",
    "check_criu",
    "check_criu_config",
    "check_criu_plugin",
    "gather_action",
    "gather_config",
    "gather_criu",
    "parse_config",
    "parse_version",
]

ACTION_NAME = "gpu-device-watcher-criu-action"
# Where the DaemonSet's init container installs the action on the host (deploy/kubernetes).
ACTION_DIR = "/usr/local/libexec/gpu-device-watcher"
# The CRIU config file each caller makes CRIU read: plain `criu` its default file, runc and
# crun their own (runc asks CRIU over RPC to read runc.conf; crun through libcriu, crun.conf).
CONFIG_FILES = {
    "criu": "/etc/criu/default.conf",
    "runc": "/etc/criu/runc.conf",
    "crun": "/etc/criu/crun.conf",
}
DEFAULT_LIBDIR = "/usr/lib/criu"
# CRIU releases that brought what a GPU checkpoint needs.
CUDA_PLUGIN_SINCE = (4, 0)
AMDGPU_PLUGIN_SINCE = (3, 17)
# A CRIU run over RPC (runc, crun) reads the config file the runtime names only from this
# release on (issue 22 of this project's tracker; the CRIU release notes say so for 3.19).
RPC_CONFIG_SINCE = (3, 19)
PLUGINS = {"nvidia": "cuda_plugin.so", "amd": "amdgpu_plugin.so"}

_VERSION = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")
_LIBDIR_DEFAULT = re.compile(r"plugin directory \(by default (/[^)\s]*?)/?\)")


def parse_version(text: str) -> tuple[int, ...] | None:
    """`criu --version` ("Version: 4.1.1", maybe "GitID: ...") -> (4, 1, 1)."""
    found = _VERSION.search(text)
    if found is None:
        return None
    return tuple(int(part) for part in found.groups() if part is not None)


def dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def parse_config(text: str) -> list[tuple[str, str]]:
    """A CRIU config file's options as (name, value): one option a line, `name value` or
    `name=value`, the leading `--` optional, `#` starting a comment, values maybe quoted."""
    options = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, value = _split(line)
        options.append((name.lstrip("-"), value))
    return options


def _split(line: str) -> tuple[str, str]:
    found = re.match(r"([^\s=]+)(?:[\s=]+(.*))?$", line)
    if found is None:
        return line, ""
    value = (found.group(2) or "").strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif " #" in value:
        value = value.split(" #", 1)[0].strip()
    return found.group(1), value


# --- criu ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriuFacts:
    # Which `criu` each caller's PATH leads to ({"criu": ..., "containerd": ...}; None: none).
    found: dict[str, str | None]
    path: str | None
    version: tuple[int, ...] | None
    why_unknown: str | None
    libdir_default: str
    nvidia: bool
    amd: bool
    runtimes: tuple[str, ...] = ()
    # Each caller's PATH, to name where a missing criu should go.
    paths: dict[str, str] = field(default_factory=dict)
    # The file each found criu is (links resolved): two names of one file are one criu.
    real: dict[str, str | None] = field(default_factory=dict)


def gather_criu(
    host: HostTree, paths: dict[str, str], *, nvidia: bool, amd: bool, runtimes: tuple[str, ...]
) -> CriuFacts:
    found = {caller: host.which("criu", path_env) for caller, path_env in paths.items()}
    path = found.get("criu") or next((p for p in found.values() if p), None)
    version, why, libdir = None, None, DEFAULT_LIBDIR
    if path is not None:
        output = host.run(path, "--version")
        if output.text is None:
            why = output.why
        else:
            version = parse_version(output.text)
            if version is None:
                why = f"`{path} --version` printed no version: {output.text.strip()[:80]!r}"
            else:
                usage = host.run(path, "--help")
                if usage.text and (match := _LIBDIR_DEFAULT.search(usage.text)):
                    libdir = match.group(1)
    real = {p: host.resolve(p) for p in found.values() if p is not None}
    return CriuFacts(found, path, version, why, libdir, nvidia, amd, runtimes, dict(paths), real)


INSTALL_CRIU = "apt-get install criu   (or dnf install criu; CRIU 4.0 or later for the CUDA plugin)"


def check_criu(facts: CriuFacts) -> Check:
    if facts.path is None:
        return fail("criu", "no criu on any caller's PATH", INSTALL_CRIU)
    callers = ", ".join(f"{caller} -> {where or 'none'}" for caller, where in facts.found.items())
    if facts.version is None:
        return skip("criu", f"{facts.path} (version not known: {facts.why_unknown}); {callers}")
    version = dotted(facts.version)
    this = facts.real.get(facts.path, facts.path)
    elsewhere = {
        where for where in facts.found.values() if where and facts.real.get(where, where) != this
    }
    found = f"{facts.path}, version {version}; {callers}"
    if facts.nvidia and facts.version < CUDA_PLUGIN_SINCE:
        return fail(
            "criu",
            f"{found}: CRIU {version} has no CUDA plugin (it came with 4.0), so no GPU state is "
            "checkpointed",
            INSTALL_CRIU,
        )
    if facts.amd and facts.version < AMDGPU_PLUGIN_SINCE:
        return fail(
            "criu",
            f"{found}: CRIU {version} has no amdgpu plugin (it came with 3.17)",
            INSTALL_CRIU,
        )
    rpc = [name for name in ("runc", "crun") if name in facts.runtimes]
    if rpc and facts.version < RPC_CONFIG_SINCE:
        return warn(
            "criu",
            f"{found}: over RPC ({', '.join(rpc)}) CRIU {version} reads no config file, so "
            "the action in /etc/criu/runc.conf is not run",
            INSTALL_CRIU,
        )
    unserved = [caller for caller, where in facts.found.items() if where is None]
    if unserved:
        caller = unserved[0]
        directory = next(
            (d for d in facts.paths.get(caller, "").split(":") if d.startswith("/")), "/usr/bin"
        )
        return fail(
            "criu",
            f"{found}: {', '.join(unserved)} find no criu on their PATH, so their checkpoints fail",
            f"ln -s {facts.path} {directory}/criu",
        )
    if elsewhere:
        return warn(
            "criu",
            f"{found}: callers run different criu binaries ({', '.join(sorted(elsewhere))})",
            f"keep one criu: remove or relink {', '.join(sorted(elsewhere))}",
        )
    can = ["action scripts"]
    if facts.nvidia:
        can.append("the CUDA plugin")
    if facts.amd:
        can.append("the amdgpu plugin")
    if rpc:
        can.append("config files over RPC")
    return ok("criu", f"{found}; can run {', '.join(can)}")


# --- the action each config names --------------------------------------------------------


@dataclass(frozen=True)
class ActionFacts:
    path: str
    exists: bool
    executable: bool
    # "zipapp" (install-action's file), "console-script" (pip's), or None (not ours).
    ours: str | None
    version: str | None = None
    # The packed modules are this version's own sources (None: cannot tell).
    current: bool | None = None
    regular: bool = True


_PACKED_VERSION = re.compile(rb"""__version__\s*=\s*["']([^"']+)["']""")


def _own_source(module_path: str) -> bytes | None:
    source = Path(watcher.__file__).parent.parent / module_path
    try:
        return source.read_bytes()
    except OSError:
        return None


def gather_action(host: HostTree, path: str) -> ActionFacts:
    if not host.exists(path):
        return ActionFacts(path, exists=False, executable=False, ours=None)
    if not host.is_file(path):
        return ActionFacts(path, exists=True, executable=False, ours=None, regular=False)
    executable = host.is_executable(path)
    data = host.read_bytes(path) or b""
    if not data.startswith(b"#!"):
        return ActionFacts(path, True, executable, None)
    # install-action's file: a /bin/sh front followed by a zip, which the zip reader finds
    # by its end record, however long the front is.
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if n.endswith(".py")]
                if "watcher/criu/__init__.py" not in names:
                    return ActionFacts(path, True, executable, None)
                packed = {name: archive.read(name) for name in names if name.startswith("watcher/")}
        except (zipfile.BadZipFile, KeyError, OSError):
            return ActionFacts(path, True, executable, None)
        match = _PACKED_VERSION.search(packed.get("watcher/__init__.py", b""))
        current = all(_own_source(name) == source for name, source in packed.items())
        return ActionFacts(
            path, True, executable, "zipapp", match.group(1).decode() if match else None, current
        )
    # pip's script: a /bin/sh front that starts the interpreter named in the shebang of the
    # sibling `gpu-device-watcher` console script (an older install: that shebang is its own).
    if b"from watcher.criu import console_main" not in data[:16384]:
        return ActionFacts(path, True, executable, None)
    interpreter = _shebang(data)
    if interpreter in {"/bin/sh", None}:
        sibling = host.read_bytes(f"{path.rpartition('/')[0]}/gpu-device-watcher", 4096)
        interpreter = _shebang(sibling or b"")
    same = (
        host.is_own_root
        and interpreter is not None
        and Path(interpreter).resolve() == Path(sys.executable).resolve()
    )
    return ActionFacts(
        path,
        True,
        executable,
        "console-script",
        watcher.__version__ if same else None,
        True if same else None,
    )


def _shebang(data: bytes) -> str | None:
    """The interpreter a script's first line names, or None."""
    if not data.startswith(b"#!"):
        return None
    line = data[2:].split(b"\n", 1)[0].strip().decode("utf-8", "replace")
    return line.split()[0] if line else None


@dataclass(frozen=True)
class ConfigFacts:
    # caller -> (config file, present, the actions it names)
    files: dict[str, tuple[str, bool, tuple[ActionFacts, ...]]]
    callers: tuple[str, ...]
    libdirs: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


def gather_config(host: HostTree, callers: tuple[str, ...]) -> ConfigFacts:
    files: dict[str, tuple[str, bool, tuple[ActionFacts, ...]]] = {}
    libdirs: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    seen: dict[str, ActionFacts] = {}
    for caller, config in CONFIG_FILES.items():
        text, why = host.read_text(config)
        if text is None:
            if why != "no such file":
                unreadable[config] = why or "unreadable"
            files[caller] = (config, False, ())
            continue
        options = parse_config(text)
        for name, value in options:
            # The configs usually name one file: it is read (and unpacked) once.
            if name == "action-script" and value and value not in seen:
                seen[value] = gather_action(host, value)
        actions = tuple(seen[value] for name, value in options if name == "action-script" and value)
        for name, value in options:
            if name in ("libdir", "L") and value:
                libdirs[caller] = value
        files[caller] = (config, True, actions)
    return ConfigFacts(files, callers, libdirs, unreadable)


def action_fix(config: str) -> str:
    return (
        f"gpu-device-watcher install-action {ACTION_DIR} && echo 'action-script "
        f"{ACTION_DIR}/{ACTION_NAME}' >> {config}"
    )


def judge_action(action: ActionFacts) -> tuple[str, str, str | None]:
    """(status, what, fix) of one named action file."""
    if not action.exists:
        return (
            "fail",
            f"{action.path} does not exist (CRIU aborts every dump)",
            (f"gpu-device-watcher install-action {action.path.rpartition('/')[0] or '/'}"),
        )
    if not action.regular:
        directory = action.path.rpartition("/")[0] or "/"
        return (
            "fail",
            f"{action.path} is not a regular file (CRIU aborts every dump)",
            f"rm {action.path} && gpu-device-watcher install-action {directory}",
        )
    if not action.executable:
        return (
            "fail",
            f"{action.path} is not executable (CRIU aborts every dump)",
            (f"chmod 0755 {action.path}"),
        )
    if action.ours is None:
        return (
            "warn",
            f"{action.path} is not gpu-device-watcher's action",
            (f"keep it if it is yours, and add ours too: {action_fix('/etc/criu/runc.conf')}"),
        )
    if action.current is False:
        return (
            "warn",
            (
                f"{action.path} is gpu-device-watcher's action "
                f"{action.version or '(version unknown)'}, not this installation's "
                f"{watcher.__version__}"
            ),
            f"gpu-device-watcher install-action {action.path.rpartition('/')[0] or '/'}",
        )
    version = action.version or "version not known"
    return "ok", f"{action.path} (ours, {action.ours}, {version})", None


def check_criu_config(facts: ConfigFacts) -> Check:
    found_in: dict[str, list[str]] = {}
    worst = "ok"
    fix: str | None = None
    rank = {"ok": 0, "warn": 1, "fail": 2}
    served: list[str] = []
    for caller in facts.callers:
        config, present, actions = facts.files[caller]
        name = config.rpartition("/")[2]
        if not present:
            found_in.setdefault("absent", []).append(name)
            continue
        if not actions:
            found_in.setdefault("no action-script", []).append(name)
            continue
        for action in actions:
            status, what, action_fix_line = judge_action(action)
            found_in.setdefault(what, []).append(name)
            if rank[status] > rank[worst]:
                worst, fix = status, action_fix_line
            if status != "fail" and action.ours is not None:
                served.append(caller)
    for config, why in facts.unreadable.items():
        return skip("criu-config", f"{config}: {why}; cannot tell which action CRIU runs")
    found = "/etc/criu/" + "; ".join(
        f"{', '.join(names)}: {what}" for what, names in found_in.items()
    )
    if not served:
        # The runtimes' file when one is there: Kubernetes checkpoints go through runc.
        target = "runc" if "runc" in facts.callers else facts.callers[0]
        return fail(
            "criu-config",
            f"{found}: no CRIU caller runs gpu-device-watcher's action (no record at dump, no "
            "restore gate)",
            # A named action that is broken is fixed where it is; none named, by naming one.
            fix or action_fix(CONFIG_FILES[target]),
        )
    if worst == "ok":
        # A caller without the action is said, not failed: a node checkpoints through one
        # runtime, and each runtime's own check says whether it runs the action.
        missing = [c for c in facts.callers if c not in served]
        if missing:
            found += f" (so not run by {', '.join(missing)})"
        return ok("criu-config", found)
    return verdict("criu-config", worst, found, fix)


# --- plugins -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginFacts:
    libdir: str
    libdir_from: str
    # family -> (library path, present)
    libraries: dict[str, tuple[str, bool]]
    criu_found: bool
    # NVIDIA: whether /dev/nvidiactl exists on the host (links followed, as the plugin's
    # access(2) does), and the map's dev root, where the node really is.
    nvidiactl_in_dev: bool = True
    dev_root: str | None = None


def gather_plugins(
    host: HostTree,
    criu: CriuFacts,
    config: ConfigFacts,
    *,
    nvidia: bool,
    amd: bool,
    dev_root: str | None = None,
) -> PluginFacts:
    libdir, origin = criu.libdir_default, "CRIU's default"
    for caller in ("runc", "criu", "crun"):
        if caller in config.libdirs and caller in config.callers:
            libdir, origin = config.libdirs[caller], f"libdir in {CONFIG_FILES[caller]}"
            break
    libraries = {}
    for family, wanted in (("nvidia", nvidia), ("amd", amd)):
        if wanted:
            library = f"{libdir.rstrip('/')}/{PLUGINS[family]}"
            libraries[family] = (library, host.is_file(library))
    in_dev = not nvidia or host.exists("/dev/nvidiactl")
    return PluginFacts(libdir, origin, libraries, criu.path is not None, in_dev, dev_root)


def check_criu_plugin(facts: PluginFacts) -> Check:
    if not facts.libraries:
        return skip("criu-plugin", "no NVIDIA or AMD GPU on this host: CRIU needs no GPU plugin")
    if not facts.criu_found:
        return skip("criu-plugin", "no criu found (see the criu check)")
    missing = [(family, lib) for family, (lib, present) in facts.libraries.items() if not present]
    found = (
        "; ".join(
            f"{lib} {'present' if present else 'missing'}"
            for lib, present in facts.libraries.values()
        )
        + f" (plugin directory {facts.libdir}: {facts.libdir_from})"
    )
    if not facts.nvidiactl_in_dev:
        # CRIU's CUDA plugin checks access("/dev/nvidiactl") before anything else and turns
        # itself off when it is not there (the GPU Operator's layout: CRIU issue 2509).
        where = f"{facts.dev_root}/nvidiactl" if facts.dev_root else None
        return fail(
            "criu-plugin",
            f"{found}; but /dev/nvidiactl does not exist, so the CUDA plugin disables itself",
            f"ln -s {where} /dev/nvidiactl"
            if where and where != "/dev/nvidiactl"
            else "mknod -m 0666 /dev/nvidiactl c 195 255",
        )
    if missing:
        family, library = missing[0]
        plugin = PLUGINS[family].removesuffix(".so")
        return fail(
            "criu-plugin",
            found,
            f"install CRIU's {plugin} into {facts.libdir}: make -C <criu source> {plugin} && "
            f"install -m 0644 plugins/{'cuda' if family == 'nvidia' else 'amdgpu'}/"
            f"{PLUGINS[family]} {library}",
        )
    return ok("criu-plugin", found)
