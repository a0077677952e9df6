"""The restore gate, pure: can this host take a checkpoint back, and with which device map.

`check(record, here, policy)` takes a checked record (`recordfile.validate`), this host's map
as plain JSON values (from the daemon or a direct scan: read defensively, any shape), and the
`restore_version_match` policy, and returns a `Verdict`: every reason the restore cannot work
(each with its contract code), the host path each used device lands on, and the device map
for `cuda-checkpoint --device-map` when a used GPU lands on another UUID.

Matching: a used GPU goes to the GPU of this host with the same UUID; failing that, to a GPU
of the same model that no other used GPU took, the same minor first. Every used GPU needs a
GPU of its own. Other used nodes (`nvidiactl`, `nvidia-uvm`, caps, `kfd`, ...) must be
present and valid here by name; so must a used GPU whose identity the record does not know.
AMD GPUs (used render nodes) are matched the same way among this host's AMD GPUs, by
`unique_id` then model, and each reports the render node it lands on; a compute partition
lands on a partition (same `unique_id` and partition number first), a whole GPU on a whole
GPU. The device map for cuda-checkpoint is NVIDIA's alone (CRIU's amdgpu plugin remaps
render nodes itself).

Every value from the record in a message goes through `shown()`: messages are printed into
CRIU's log.
"""

from __future__ import annotations

from watcher.criu.recordfile import GPU_KINDS, GpuId, Record, Used, uuid_ok
from watcher.criu.text import shown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

REASON_CODES = (
    "record-unreadable",
    "record-version",
    "driver-not-loaded",
    "driver-version",
    "driver-library",
    "device-absent",
    "device-invalid",
    "gpu-model",
    "gpu-count",
    "remap-unsupported",
    "mig-in-use",
)
# cuda-checkpoint --device-map arrived with the 580 drivers.
DEVICE_MAP_SINCE = 580
_LISTED = 4  # names listed in one message before "and N more"


class Verdict:
    """What the gate decided. `fits` is true when no reason was found."""

    __slots__ = ("device_map", "devices", "reasons", "record", "remap")

    def __init__(self, record: dict[str, str | None] | None = None) -> None:
        self.record = record
        self.reasons: list[tuple[str, str]] = []
        self.devices: list[dict[str, str | None]] = []
        self.device_map: dict[str, str] = {}
        self.remap = False

    @property
    def fits(self) -> bool:
        return not self.reasons

    def refuse(self, code: str, message: str) -> None:
        self.reasons.append((code, message))

    def as_json(self) -> dict[str, Any]:
        """The contract's JSON of `restore-check --format json`."""
        return {
            "fits": self.fits,
            "remap": self.remap,
            "record": self.record,
            "reasons": [{"code": code, "message": message} for code, message in self.reasons],
            "devices": self.devices,
            "device_map": self.device_map,
        }

    def device_map_text(self) -> str:
        """`OLD=NEW,OLD=NEW` as `cuda-checkpoint --device-map` takes it."""
        return ",".join(f"{old}={new}" for old, new in self.device_map.items())


# --------------------------------------------------------------------------------------------
# This host's map, read defensively


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        return []
    return [item for item in value if isinstance(item, dict)]


class _HostGpu:
    __slots__ = ("bus_id", "device", "family", "minor", "model", "partition", "uuid")

    def __init__(self, gpu: dict[str, Any]) -> None:
        self.family = _str(gpu.get("family")) or "nvidia"  # maps before AMD: NVIDIA's
        uuid = _str(gpu.get("uuid"))
        self.uuid = uuid if uuid is not None and uuid_ok(uuid) else None
        self.model = _str(gpu.get("model"))
        self.minor = _int(gpu.get("minor"))
        self.bus_id = _str(gpu.get("bus_id"))
        self.device = _str(gpu.get("device"))
        self.partition = _int(gpu.get("partition"))

    def label(self) -> str:
        return shown(self.uuid or self.bus_id or f"minor {self.minor}")


def _major(version: str | None) -> int | None:
    head = (version or "").split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 6 else None


def _versions_match(recorded: str, here: str, policy: str) -> bool:
    if policy == "major":
        return recorded.split(".", 1)[0] == here.split(".", 1)[0]
    return recorded == here


def library_version(name: str) -> str:
    """`libcuda.so.580.95.05` -> `580.95.05` ("" when the name has no `.so.` version)."""
    return name.rpartition(".so.")[2] if ".so." in name else ""


def _listing(names: list[str]) -> str:
    head = ", ".join(shown(name) for name in names[:_LISTED])
    return head + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _who(used: Used) -> str:
    pids = ", ".join(str(pid) for pid in used.pids[:_LISTED]) or "?"
    if len(used.pids) > _LISTED:
        pids += ", ..."
    return f"{shown(used.name)} (used by pid {pids})"


# --------------------------------------------------------------------------------------------
# The gate


def _nvidia_driver(verdict: Verdict, record: Record, driver: dict[str, Any], policy: str) -> bool:
    """NVIDIA's driver checks; False when the driver is not loaded (nothing else can be
    judged then)."""
    version_then, version_here = record.driver_version, _str(driver.get("version"))

    if "mig-in-use" in record.checks:
        caps = [used.name for used in record.used if used.kind == "cap"]
        verdict.refuse(
            "mig-in-use",
            "the checkpoint used a MIG GPU instance"
            + (f" (capability nodes {_listing(caps)})" if caps else "")
            + ": cuda-checkpoint cannot checkpoint or restore MIG, so no host can take it back",
        )
    if driver.get("loaded") is not True:
        verdict.refuse(
            "driver-not-loaded",
            "the NVIDIA driver is not loaded on this host"
            + (f" (it was {shown(version_then)} at dump)" if version_then else ""),
        )
        # Without a driver no node or GPU can be judged: the other reasons would only blame
        # what loading the driver brings back.
        return False
    if version_then and not (version_here and _versions_match(version_then, version_here, policy)):
        verdict.refuse(
            "driver-version",
            f"driver version {shown(version_here or 'unknown')} here, {shown(version_then)} at "
            f'dump (restore_version_match = "{policy}")',
        )
    foreign = [name for name in record.libraries if library_version(name) != version_here]
    if foreign:
        versions = sorted({library_version(name) or "?" for name in foreign})
        verdict.refuse(
            "driver-library",
            f"the checkpoint mapped {_listing(foreign)} (driver {_listing(versions)}); this "
            f"host's driver is {shown(version_here or 'unknown')}: the restored process maps "
            "those exact files, whatever restore_version_match says",
        )
    return True


class _HostMap:
    """This host's map as the gate reads it, built once per check: nodes by name and path,
    the problems at each path, and the refusals that name a node."""

    __slots__ = ("amd_dev_root", "by_name", "by_path", "dev_root", "gpus", "problems_at")

    def __init__(
        self, here: Mapping[str, Any], driver: dict[str, Any], amd: dict[str, Any]
    ) -> None:
        self.dev_root = shown(_str(driver.get("dev_root")) or "none")
        self.amd_dev_root = shown(_str(amd.get("dev_root")) or "none")
        devices = _dicts(here.get("devices"))
        self.by_name = {name: device for device in devices if (name := _str(device.get("name")))}
        self.by_path = {path: device for device in devices if (path := _str(device.get("path")))}
        self.problems_at: dict[str, list[str]] = {}
        for problem in _dicts(here.get("problems")):
            path, message = _str(problem.get("path")), _str(problem.get("message"))
            if path and message:
                self.problems_at.setdefault(path, []).append(message)
        self.gpus = [_HostGpu(gpu) for gpu in _dicts(here.get("gpus"))]

    def usable(self, verdict: Verdict, who: str, device: dict[str, Any]) -> bool:
        """True when the node is valid; else refuse it, with the map's problems at its path."""
        if device.get("valid") is True:
            return True
        path = _str(device.get("path")) or "?"
        why = "; ".join(self.problems_at.get(path, [])) or "see `gpu-device-watcher scan`"
        verdict.refuse(
            "device-invalid", f"{who} is not valid here: {shown(path)}: {shown(why, 400)}"
        )
        return False

    def name_of(self, gpu: _HostGpu) -> str:
        device = self.by_path.get(gpu.device) if gpu.device else None
        name = _str(device.get("name")) if device is not None else None
        return name or gpu.label()


def _drivers_loaded(
    verdict: Verdict, record: Record, driver: dict[str, Any], amd: dict[str, Any], policy: str
) -> bool:
    """The drivers of every family the checkpoint used; False when one is not loaded
    (nothing else can be judged then)."""
    families = {used.family for used in record.used}
    if "nvidia" in families and not _nvidia_driver(verdict, record, driver, policy):
        return False
    if "amd" in families and amd.get("loaded") is not True:
        verdict.refuse(
            "driver-not-loaded",
            "the AMD kfd driver is not loaded on this host (/proc/devices lists no 'kfd'), "
            "and the checkpoint used AMD GPU nodes",
        )
        return False
    return True


def check(record: Record, here: Mapping[str, Any], policy: str = "exact") -> Verdict:
    """Every reason this host cannot take `record`'s process back, and the device map."""
    verdict = Verdict(record.summary())
    if not record.used:
        # The tree touched no GPU device: any host will do.
        return verdict
    driver = here.get("driver")
    driver = driver if isinstance(driver, dict) else {}
    amd = here.get("amd")
    amd = amd if isinstance(amd, dict) else {}
    if not _drivers_loaded(verdict, record, driver, amd, policy):
        return verdict

    host = _HostMap(here, driver, amd)
    gpus_used: list[tuple[Used, GpuId]] = []
    for used in record.used:
        if used.kind in GPU_KINDS and used.gpu is not None and (used.gpu.uuid or used.gpu.model):
            gpus_used.append((used, used.gpu))
            continue
        # Any other node (and a GPU the record cannot identify) must be here by name.
        device = host.by_name.get(used.name)
        if device is None:
            verdict.refuse(
                "device-absent", f"{_who(used)} is absent here (dev root {host.dev_root})"
            )
        elif host.usable(verdict, _who(used), device):
            verdict.devices.append(
                {"name": used.name, "path": used.path, "here": _str(device.get("path"))}
            )

    version_here = _str(driver.get("version"))
    for family, dev_root, remaps in (
        ("nvidia", host.dev_root, True),
        ("amd", host.amd_dev_root, False),
    ):
        family_gpus = _FamilyGpus(
            used=[(used, want) for used, want in gpus_used if used.family == family],
            here=[gpu for gpu in host.gpus if gpu.family == family],
            dev_root=dev_root,
        )
        landing = family_gpus.assign()
        family_gpus.refuse_unlanded(verdict, landing)
        pairs = family_gpus.check_landed(verdict, landing, host)
        if remaps:
            # The family restores through cuda-checkpoint, whose --device-map must name
            # every checkpointed GPU when one moved.
            _device_map(verdict, pairs, version_here, host)
    verdict.devices.sort(key=lambda device: str(device["name"]))
    return verdict


# The order in which a used GPU that kept no UUID here looks for a free GPU of its model: a
# whole GPU for a whole GPU and a partition for a partition; another partition of the same
# GPU first, then the same minor, then any in the map's order.
_PREFERENCES: tuple[Callable[[GpuId, _HostGpu], bool], ...] = (
    lambda want, gpu: (
        want.partition is not None and want.uuid is not None and gpu.uuid == want.uuid
    ),
    lambda want, gpu: want.minor is not None and gpu.minor == want.minor,
    lambda want, gpu: True,
)


class _FamilyGpus:
    """The used GPUs of one family and this host's GPUs of that family, matched in phases:
    assign, refuse what did not land, check where each landed (then the device map)."""

    __slots__ = ("dev_root", "here", "used")

    def __init__(self, used: list[tuple[Used, GpuId]], here: list[_HostGpu], dev_root: str) -> None:
        self.used = used
        self.here = here
        self.dev_root = dev_root

    def assign(self) -> dict[int, int]:
        """Index of each used GPU that lands -> index of its GPU here; every GPU here is
        taken at most once."""
        taken: set[int] = set()
        landing: dict[int, int] = {}
        # The same GPU, by UUID (a GPU of another model under that UUID is not the same GPU);
        # a compute partition by UUID and partition number (its GPU's partitions share it).
        for i, (_, want) in enumerate(self.used):
            for j, gpu in enumerate(self.here):
                if (
                    j not in taken
                    and want.uuid is not None
                    and gpu.uuid == want.uuid
                    and gpu.partition == want.partition
                    and (want.model is None or gpu.model is None or gpu.model == want.model)
                ):
                    taken.add(j)
                    landing[i] = j
                    break
        for preferred in _PREFERENCES:
            for i, (_, want) in enumerate(self.used):
                if i in landing or want.model is None:
                    continue
                for j, gpu in enumerate(self.here):
                    if (
                        j not in taken
                        and gpu.model == want.model
                        and (gpu.partition is None) == (want.partition is None)
                        and preferred(want, gpu)
                    ):
                        taken.add(j)
                        landing[i] = j
                        break
        return landing

    def refuse_unlanded(self, verdict: Verdict, landing: dict[int, int]) -> None:
        """What did not land: no GPU of that model here, or too few."""
        missing: dict[str, list[Used]] = {}
        for i, (used, want) in enumerate(self.used):
            if i in landing:
                continue
            if want.model is None:
                verdict.refuse(
                    "gpu-model",
                    f"{_who(used)} was GPU {shown(want.uuid)} (model unknown at dump), which is "
                    "not on this host",
                )
                continue
            missing.setdefault(want.model, []).append(used)
        inventory: dict[str, int] = {}
        for gpu in self.here:
            if gpu.model:
                inventory[gpu.model] = inventory.get(gpu.model, 0) + 1
        for model, lost in missing.items():
            of_model = [used.name for used, want in self.used if want.model == model]
            if not inventory.get(model):
                has = ", ".join(f"{count} x {shown(name)}" for name, count in inventory.items())
                verdict.refuse(
                    "gpu-model",
                    f"{_listing([used.name for used in lost])} used {shown(model)} GPU(s); this "
                    f"host has none of that model ({has or 'no GPU listed'})",
                )
            else:
                verdict.refuse(
                    "gpu-count",
                    f"the checkpoint used {len(of_model)} {shown(model)} GPU(s) "
                    f"({_listing(of_model)}); this host has {inventory[model]}",
                )

    def check_landed(
        self, verdict: Verdict, landing: dict[int, int], host: _HostMap
    ) -> list[tuple[Used, GpuId, _HostGpu]]:
        """Where each landed: its node must be here and valid. (used, recorded, here) each."""
        pairs: list[tuple[Used, GpuId, _HostGpu]] = []
        for i, (used, want) in enumerate(self.used):
            if i not in landing:
                continue
            gpu = self.here[landing[i]]
            pairs.append((used, want, gpu))
            who = _who(used)
            device = host.by_path.get(gpu.device) if gpu.device else None
            if device is None:
                verdict.refuse(
                    "device-absent",
                    f"{who} lands on GPU {gpu.label()} here, whose device node is absent "
                    f"(dev root {self.dev_root})",
                )
            elif host.usable(verdict, who, device):
                verdict.devices.append({"name": used.name, "path": used.path, "here": gpu.device})
        return pairs


def _device_map(
    verdict: Verdict,
    pairs: list[tuple[Used, GpuId, _HostGpu]],
    version_here: str | None,
    host: _HostMap,
) -> None:
    """The UUIDs, old and new, when a GPU moved; refused where the map cannot be made or
    this driver cannot take one."""
    # A GPU whose UUID this host does not know may be another GPU: it needs a map too.
    moved = [(used, gpu) for used, want, gpu in pairs if want.uuid and want.uuid != gpu.uuid]
    if not moved:
        return
    verdict.remap = True
    unknown = [used.name for used, want, gpu in pairs if not (want.uuid and gpu.uuid)]
    if unknown:
        verdict.refuse(
            "remap-unsupported",
            f"the checkpoint's GPUs land on GPUs with other UUIDs here, and the UUID of "
            f"{_listing(unknown)} is unknown: cuda-checkpoint --device-map must name every "
            "checkpointed GPU",
        )
        return
    major = _major(version_here)
    if major is None or major < DEVICE_MAP_SINCE:
        landed = ", ".join(
            f"{shown(used.name)} -> {shown(host.name_of(gpu))}" for used, gpu in moved
        )
        verdict.refuse(
            "remap-unsupported",
            f"the checkpoint's GPUs land on GPUs with other UUIDs here ({landed}), which needs "
            f"cuda-checkpoint --device-map: drivers {DEVICE_MAP_SINCE} and later have it, this "
            f"host has {shown(version_here or 'an unknown version')}",
        )
        return
    for _, want, gpu in pairs:
        if want.uuid and gpu.uuid:  # every one of them (checked above); says so to mypy
            verdict.device_map[want.uuid] = gpu.uuid
