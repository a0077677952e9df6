"""The check `cuda-checkpoint`: which `cuda-checkpoint` CRIU's CUDA plugin runs, for plain
`criu` and for each runtime service, whether it is our wrapper (which adds `--device-map`
when a restore lands on other GPUs), the real binary behind it and what that can do."""

from __future__ import annotations

from dataclasses import dataclass

from watcher.criu import cudacheckpoint
from watcher.doctor.criu import ACTION_DIR
from watcher.doctor.host import HostTree
from watcher.doctor.model import Check, skip, verdict

__all__ = ["CudaFacts", "Lookup", "check_cuda_checkpoint", "gather_cuda"]

# cuda-checkpoint's --device-map (restore onto GPUs with other UUIDs) needs this driver major.
DEVICE_MAP_DRIVER = 580


@dataclass(frozen=True)
class Lookup:
    caller: str  # "criu" (a root shell), "containerd", "crio"
    path_env: str
    first: str | None  # the cuda-checkpoint that PATH leads to
    wrapper: bool
    real: str | None  # the real binary run in the end
    help_text: str | None  # the real binary's `-h`
    help_why: str | None  # why there is no help text


@dataclass(frozen=True)
class CudaFacts:
    nvidia: bool
    driver_version: str | None
    lookups: tuple[Lookup, ...]
    # The wrapper `install-action` put beside the action (the DaemonSet's), if there is one:
    # a link to it is the whole fix for a PATH that does not lead to it.
    installed_wrapper: str | None = None


def gather_cuda(
    host: HostTree,
    paths: dict[str, str],
    *,
    nvidia: bool,
    driver_version: str | None,
    map_cuda_checkpoint: str | None,
) -> CudaFacts:
    lookups = []
    helps: dict[str, tuple[str | None, str | None]] = {}
    for caller, path_env in paths.items():
        first = cudacheckpoint.resolve_on_path(path_env, host.root)
        wrapper = first is not None and cudacheckpoint.is_wrapper(first, root=host.root)
        real = (
            cudacheckpoint.find_real(
                path_env, skip=first, map_cuda_checkpoint=map_cuda_checkpoint, root=host.root
            )
            if wrapper
            else first
        )
        if real is not None and real not in helps:
            output = host.run(real, "-h")
            helps[real] = (output.text, output.why)
        text, why = helps.get(real or "", (None, None))
        lookups.append(Lookup(caller, path_env, first, wrapper, real, text, why))
    beside_action = f"{ACTION_DIR}/{cudacheckpoint.NAME}"
    installed = (
        beside_action
        if host.is_executable(beside_action)
        and cudacheckpoint.is_wrapper(beside_action, root=host.root)
        else None
    )
    return CudaFacts(nvidia, driver_version, tuple(lookups), installed)


def _major(version: str | None) -> int | None:
    head = (version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _install_dir(lookup: Lookup) -> str:
    return next((d for d in lookup.path_env.split(":") if d.startswith("/")), "/usr/local/sbin")


def _install(facts: CudaFacts, directory: str) -> str:
    """The command that puts our wrapper first in `directory`."""
    if facts.installed_wrapper is not None:
        return f"ln -sf {facts.installed_wrapper} {directory}/{cudacheckpoint.NAME}"
    return f"gpu-device-watcher install-action {directory}"


def _judge(lookup: Lookup, facts: CudaFacts) -> tuple[str, str, str | None]:
    directory = _install_dir(lookup)
    if lookup.first is None:
        return (
            "fail",
            (
                f"no cuda-checkpoint on PATH {lookup.path_env} (CRIU's CUDA plugin disables "
                "itself and checkpoints carry no GPU state)"
            ),
            f"{_install(facts, directory)}   (and NVIDIA's cuda-checkpoint behind it)",
        )
    if lookup.wrapper and lookup.real is None:
        return (
            "fail",
            (f"{lookup.first} is our wrapper, with no real cuda-checkpoint behind it"),
            "install -m 0755 cuda-checkpoint /usr/bin/   (NVIDIA's binary, driver 550+)",
        )
    chain = (
        f"{lookup.first} (our wrapper) -> {lookup.real}" if lookup.wrapper else f"{lookup.first}"
    )
    if lookup.help_text is None:
        return "skip", f"{chain}; its -h not read: {lookup.help_why}", None
    if "--action" not in lookup.help_text:
        return (
            "fail",
            (f"{chain} has no --action (CRIU's plugin needs driver r555 or later)"),
            "upgrade the NVIDIA driver to 580 or later (cuda-checkpoint --action, --device-map)",
        )
    major = _major(facts.driver_version)
    remap = "--device-map" in lookup.help_text and major is not None and major >= DEVICE_MAP_DRIVER
    if not lookup.wrapper:
        own = lookup.first.rpartition("/")[0]
        move = f"mv {lookup.first} /usr/bin/ && " if own == directory else ""
        return (
            "warn",
            (
                f"{chain} is NVIDIA's binary, not our wrapper: a restore onto GPUs with "
                "other UUIDs gets no --device-map"
            ),
            f"{move}{_install(facts, directory)}",
        )
    if not remap:
        return (
            "warn",
            (
                f"{chain}; driver {facts.driver_version or '(unknown)'} has no "
                "--device-map: "
                "restores only onto GPUs with the recorded UUIDs"
            ),
            "upgrade the NVIDIA driver to 580 or later",
        )
    driver = facts.driver_version
    return "ok", f"{chain}, --action and --device-map (driver {driver})", None


def check_cuda_checkpoint(facts: CudaFacts) -> Check:
    if not facts.nvidia:
        return skip("cuda-checkpoint", "no NVIDIA GPU on this host")
    rank = {"ok": 0, "skip": 1, "warn": 2, "fail": 3}
    judged = [_judge(lookup, facts) for lookup in facts.lookups]
    status, _, fix = max(judged, key=lambda item: rank[item[0]])
    # Callers that meet the same binary are named together.
    callers: dict[str, list[str]] = {}
    for lookup, (_, what, _) in zip(facts.lookups, judged, strict=True):
        callers.setdefault(what, []).append(lookup.caller)
    found = "; ".join(f"{', '.join(names)}: {what}" for what, names in callers.items())
    return verdict("cuda-checkpoint", status, found, fix)
