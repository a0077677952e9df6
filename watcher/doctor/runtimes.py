"""The checks `runtime-runc`, `runtime-crun`, `runtime-crio` and `runtime-containerd`: the
runtimes present and whether each can run gpu-device-watcher's CRIU action."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

from watcher.doctor.criu import CONFIG_FILES, RPC_CONFIG_SINCE, ConfigFacts, action_fix, dotted
from watcher.doctor.host import HostTree
from watcher.doctor.model import Check, fail, ok, skip, warn
from watcher.doctor.services import Service

__all__ = [
    "RuntimeFacts",
    "check_containerd",
    "check_crio",
    "check_crun",
    "check_runc",
    "gather_runtime",
    "parse_tool_version",
]

# crun reads /etc/criu/crun.conf from this release on (issue 22 of this project's tracker).
CRUN_READS_CONFIG = (1, 26)
# containerd's CRI plugin checkpoints and restores containers (kubelet's checkpoint API, a
# restore from a checkpoint image) from 2.0 on; 1.x has `ctr` task checkpoints only.
CONTAINERD_CRI_CHECKPOINT = (2, 0)
CRIO_DROPIN = "/etc/crio/crio.conf.d/90-criu.conf"


def parse_tool_version(text: str, tool: str) -> tuple[int, ...] | None:
    """`runc version 1.1.5+ds1`, `crun version 1.8.1`, `containerd github.com/containerd/
    containerd v1.7.2 <commit>`, `crio version 1.28.1` / `Version: 1.28.1` -> (1, 1, 5)."""
    patterns = (
        rf"{tool} version v?(\d+)\.(\d+)(?:\.(\d+))?",
        r"^Version:\s*v?(\d+)\.(\d+)(?:\.(\d+))?",
        rf"^{tool}\s+\S+\s+v?(\d+)\.(\d+)(?:\.(\d+))?",
    )
    for pattern in patterns:
        found = re.search(pattern, text, re.MULTILINE)
        if found:
            return tuple(int(part) for part in found.groups() if part is not None)
    return None


@dataclass(frozen=True)
class RuntimeFacts:
    name: str
    binary: str | None
    service: Service | None
    version: tuple[int, ...] | None
    version_output: str | None
    why_unknown: str | None
    criu_version: tuple[int, ...] | None = None
    config: ConfigFacts | None = None
    # CRI-O: the value of enable_criu_support and the file that set it (None: not set).
    criu_support: bool | None = None
    criu_support_from: str | None = None

    @property
    def present(self) -> bool:
        return self.binary is not None or (
            self.service is not None and self.service.unit is not None
        )


def gather_runtime(
    host: HostTree,
    name: str,
    paths: list[str],
    *,
    service: Service | None = None,
    criu_version: tuple[int, ...] | None = None,
    config: ConfigFacts | None = None,
) -> RuntimeFacts:
    binary = None
    if service is not None and service.exec_start and host.is_executable(service.exec_start):
        binary = service.exec_start
    for path_env in paths:
        binary = binary or host.which(name, path_env)
    version = output_text = why = None
    if binary is not None:
        output = host.run(binary, "--version")
        output_text, why = output.text, output.why
        if output.text is not None:
            version = parse_tool_version(output.text, name)
            if version is None:
                why = f"`{binary} --version` printed no version"
    support = support_from = None
    if name == "crio":
        support, support_from = _crio_criu_support(host)
    return RuntimeFacts(
        name,
        binary,
        service,
        version,
        output_text,
        why,
        criu_version,
        config,
        support,
        support_from,
    )


def _crio_criu_support(host: HostTree) -> tuple[bool | None, str | None]:
    files = ["/etc/crio/crio.conf"] + [
        f"/etc/crio/crio.conf.d/{name}"
        for name in host.listdir("/etc/crio/crio.conf.d")
        if name.endswith(".conf")
    ]
    value: bool | None = None
    source = None
    for file in files:  # drop-ins in name order, each over what came before
        text, _ = host.read_text(file)
        if text is None:
            continue
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        runtime = table.get("crio", {}).get("runtime", {})
        if isinstance(runtime, dict) and isinstance(runtime.get("enable_criu_support"), bool):
            value, source = runtime["enable_criu_support"], file
    return value, source


def _absent(check_id: str, name: str) -> Check:
    return skip(check_id, f"no {name} on this host")


def _version_unknown(check_id: str, facts: RuntimeFacts) -> Check:
    return skip(check_id, f"{facts.binary}: version not known ({facts.why_unknown})")


def _runs_action(facts: RuntimeFacts, caller: str) -> tuple[bool, str]:
    config = facts.config
    if config is None:
        return False, "no CRIU config read"
    path, present, actions = config.files[caller]
    ours = [a for a in actions if a.ours is not None and a.exists and a.executable]
    if not present:
        return False, f"{path} is absent"
    if not ours:
        return False, f"{path} names no working action of ours"
    return True, f"{path} names {ours[0].path}"


def check_runc(facts: RuntimeFacts) -> Check:
    if not facts.present:
        return _absent("runtime-runc", "runc")
    if facts.version is None:
        return _version_unknown("runtime-runc", facts)
    found = f"{facts.binary}, version {dotted(facts.version)}"
    if facts.criu_version is not None and facts.criu_version < RPC_CONFIG_SINCE:
        return fail(
            "runtime-runc",
            f"{found}: its CRIU {dotted(facts.criu_version)} reads no config file over RPC",
            "install CRIU 3.19 or later (4.0 or later for the CUDA plugin)",
        )
    runs, why = _runs_action(facts, "runc")
    if not runs:
        return fail("runtime-runc", f"{found}: {why}", action_fix(CONFIG_FILES["runc"]))
    return ok("runtime-runc", f"{found}; {why}")


def check_crun(facts: RuntimeFacts) -> Check:
    if not facts.present:
        return _absent("runtime-crun", "crun")
    if facts.version is None:
        return _version_unknown("runtime-crun", facts)
    found = f"{facts.binary}, version {dotted(facts.version)}"
    features = facts.version_output or ""
    if "+CRIU" not in features:
        return warn(
            "runtime-crun",
            f"{found}: built without CRIU (its --version lists no +CRIU), so it cannot "
            "checkpoint at all",
            'checkpoint with runc (CRI-O: default_runtime = "runc"), or install a crun built '
            "with CRIU support",
        )
    if facts.version < CRUN_READS_CONFIG:
        return warn(
            "runtime-crun",
            f"{found}: crun before {dotted(CRUN_READS_CONFIG)} reads no CRIU config file, so it "
            "never runs the action",
            "checkpoint with runc, or upgrade crun to 1.26 or later",
        )
    runs, why = _runs_action(facts, "crun")
    if not runs:
        return warn("runtime-crun", f"{found}: {why}", action_fix(CONFIG_FILES["crun"]))
    return ok("runtime-crun", f"{found}; {why}")


def check_crio(facts: RuntimeFacts) -> Check:
    if not facts.present:
        return _absent("runtime-crio", "CRI-O")
    where = facts.binary or (facts.service.unit if facts.service else None)
    version = f", version {dotted(facts.version)}" if facts.version else ""
    found = f"{where}{version}"
    enable = (
        f"printf '[crio.runtime]\\nenable_criu_support = true\\n' > {CRIO_DROPIN} && "
        "systemctl restart crio"
    )
    if facts.criu_support is None:
        return warn(
            "runtime-crio",
            f"{found}: enable_criu_support is not set in /etc/crio/crio.conf or crio.conf.d "
            "(its default depends on the CRI-O release)",
            enable,
        )
    if not facts.criu_support:
        return fail(
            "runtime-crio",
            f"{found}: enable_criu_support = false in {facts.criu_support_from}: checkpoints are "
            "refused",
            enable,
        )
    return ok(
        "runtime-crio",
        f"{found}: enable_criu_support = true ({facts.criu_support_from}); it runs runc or crun "
        "(see those checks)",
    )


def check_containerd(facts: RuntimeFacts) -> Check:
    if not facts.present:
        return _absent("runtime-containerd", "containerd")
    if facts.version is None:
        return _version_unknown("runtime-containerd", facts)
    found = f"{facts.binary}, version {dotted(facts.version)}"
    if facts.version < CONTAINERD_CRI_CHECKPOINT:
        return warn(
            "runtime-containerd",
            f"{found}: containerd before 2.0 cannot checkpoint or restore through the CRI "
            "(kubectl/kubelet checkpoints); only `ctr` task checkpoints run runc with CRIU",
            "upgrade containerd to 2.0 or later",
        )
    return ok(
        "runtime-containerd",
        f"{found}: CRI checkpoint and restore; its runc shim runs CRIU with /etc/criu/runc.conf",
    )
