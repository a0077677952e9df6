"""Hand-built maps for the publish tests."""

from __future__ import annotations

from watcher.core.model import Device, DeviceMap, Driver, Gpu, Kind, Mount, Problem

DEV_ROOT = "/run/nvidia/driver/dev"
CUDA = "/run/nvidia/driver/usr/bin/cuda-checkpoint"


def device(name: str, kind: Kind, major: int, minor: int, *, valid: bool = True) -> Device:
    return Device(
        name=name,
        path=f"{DEV_ROOT}/{name}",
        kind=kind,
        major=major,
        minor=minor,
        mode="0666",
        valid=valid,
        mount=Mount(
            id=812,
            mount_point="/run/nvidia/driver",
            fstype="tmpfs",
            source="tmpfs",
            options=("rw",),
            nodev=False,
        ),
    )


def gpu(minor: int, model: str | None = "NVIDIA H200") -> Gpu:
    return Gpu(
        minor=minor,
        bus_id=f"0000:{0x3B + minor:02x}:00.0",
        model=model,
        uuid=f"GPU-{minor:08d}-0000-0000-0000-000000000000",
        device=f"{DEV_ROOT}/nvidia{minor}",
    )


NOT_IN_DEV = Problem(
    code="not-in-dev", severity="warning", message="nodes only outside /dev", path=DEV_ROOT
)


def operator_map(
    *,
    generation: int = 3,
    gpus: tuple[Gpu, ...] = (gpu(0),),
    problems: tuple[Problem, ...] = (NOT_IN_DEV,),
    version: str | None = "580.95.05",
    loaded: bool = True,
    dev_root: str | None = DEV_ROOT,
    devices: tuple[Device, ...] | None = None,
    cuda_checkpoint: str | None = CUDA,
) -> DeviceMap:
    if devices is None:
        devices = (
            device("nvidia-uvm", "uvm", 509, 0),
            device("nvidia-uvm-tools", "uvm-tools", 509, 1),
            device("nvidia0", "gpu", 195, 0),
            device("nvidiactl", "control", 195, 255),
        )
    return DeviceMap(
        generation=generation,
        updated="2026-11-30T10:00:00.000000Z",
        driver=Driver(
            loaded=loaded,
            version=version,
            root="/run/nvidia/driver" if dev_root else None,
            dev_root=dev_root,
            source="detected",
            cuda_checkpoint=cuda_checkpoint,
        ),
        devices=devices,
        gpus=gpus,
        problems=problems,
    )
