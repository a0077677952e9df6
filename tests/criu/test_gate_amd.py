"""The restore gate for AMD GPUs: used render nodes land by unique_id, else by model.

Pure, as tests/criu/test_gate.py. The situation of criu#2723: the checkpoint's process used
renderD144, and the host (or container) it goes back to has another render node of a GPU
of the same model; the gate tells which node it lands on instead of letting the amdgpu plugin
fail on /dev/dri/renderD144. No device map: that is cuda-checkpoint's, NVIDIA's alone.
"""

from __future__ import annotations

from typing import Any

import msgspec

from watcher.core.record import Record as RecordModel
from watcher.criu import gate, recordfile

from .test_gate import H200, U, codes, host, landed, record

MI210, MI300X = "AMD Instinct MI210", "AMD Instinct MI300X"
A, B, C = "592c190172fd5d40", "c6f220c172dc76bb", "2ae088c172fd5d13"  # unique ids


def amd_here(
    gpus: list[tuple[int, str | None, str | None]],
    *,
    loaded: bool = True,
    kfd: bool = True,
    nvidia: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A map with AMD's kfd and one render node per (minor, model, unique_id) GPU, on top of
    `nvidia` (an NVIDIA map from test_gate.host) or of a host without NVIDIA."""
    base = nvidia or {
        "generation": 3,
        "updated": "2026-11-30T10:00:00.000000Z",
        "driver": {
            "loaded": False,
            "version": None,
            "root": None,
            "dev_root": None,
            "source": "detected",
            "cuda_checkpoint": None,
        },
        "devices": [],
        "gpus": [],
        "problems": [],
    }
    devices = [
        {
            "name": f"dri/renderD{minor}",
            "path": f"/dev/dri/renderD{minor}",
            "kind": "render",
            "major": 226,
            "minor": minor,
            "mode": "0666",
            "valid": True,
            "mount": None,
            "family": "amd",
        }
        for minor, _, _ in gpus
    ]
    if kfd:
        devices.append(
            {
                "name": "kfd",
                "path": "/dev/kfd",
                "kind": "kfd",
                "major": 235,
                "minor": 0,
                "mode": "0666",
                "valid": True,
                "mount": None,
                "family": "amd",
            }
        )
    return {
        **base,
        "devices": sorted([*base["devices"], *devices], key=lambda d: d["name"]),
        "gpus": [
            *base["gpus"],
            *(
                {
                    "minor": minor,
                    "bus_id": f"0000:{minor - 0x40:02x}:00.0",
                    "model": model,
                    "uuid": uuid,
                    "device": f"/dev/dri/renderD{minor}",
                    "family": "amd",
                }
                for minor, model, uuid in gpus
            ),
        ],
        "amd": {"loaded": loaded, "dev_root": "/dev"},
    }


def amd_record(
    used: list[tuple[int, str | None, str | None]],
    *,
    at: dict[str, Any] | None = None,
    nvidia: list[tuple[int, str, str | None]] | None = None,
    families: bool = True,
) -> dict[str, Any]:
    """A record of a tree that held kfd and the render nodes of `used` (and, with `nvidia`,
    those NVIDIA GPUs too)."""
    at = at if at is not None else amd_here(used)
    rec = record(nvidia or [], at=at, others=("nvidiactl",) if nvidia else ())
    entries: list[dict[str, Any]] = [
        {
            "name": "kfd",
            "path": "/dev/kfd",
            "kind": "kfd",
            "major": 235,
            "minor": 0,
            "valid": True,
            "pids": [4242],
            "via": ["fd"],
            "family": "amd",
        }
    ]
    for minor, model, uuid in used:
        entries.append(
            {
                "name": f"dri/renderD{minor}",
                "path": f"/dev/dri/renderD{minor}",
                "kind": "render",
                "major": 226,
                "minor": minor,
                "valid": True,
                "pids": [4242],
                "via": ["fd", "maps"],
                "family": "amd",
                "gpu": {
                    "uuid": uuid,
                    "bus_id": f"0000:{minor - 0x40:02x}:00.0",
                    "model": model,
                    "minor": minor,
                },
            }
        )
    if not families:
        for entry in entries:
            del entry["family"]
    rec["used"] = sorted([*rec["used"], *entries], key=lambda e: e["name"])
    return rec


def check(rec: dict[str, Any], here: dict[str, Any]) -> gate.Verdict:
    return gate.check(recordfile.validate(rec), here, "exact")


def test_an_amd_record_is_the_published_model() -> None:
    decoded = msgspec.convert(amd_record([(128, MI210, A)]), RecordModel, strict=True)
    assert [(u.name, u.kind, u.family) for u in decoded.used] == [
        ("dri/renderD128", "render", "amd"),
        ("kfd", "kfd", "amd"),
    ]


def test_the_same_host_takes_it_back() -> None:
    verdict = check(amd_record([(128, MI210, A)]), amd_here([(128, MI210, A)]))
    assert codes(verdict) == []
    assert (verdict.remap, verdict.device_map) == (False, {})
    assert landed(verdict) == {"dri/renderD128": "/dev/dri/renderD128", "kfd": "/dev/kfd"}


def test_criu_2723_another_render_node_of_the_same_model() -> None:
    verdict = check(amd_record([(144, MI210, A)]), amd_here([(136, MI210, B)]))
    assert codes(verdict) == []
    assert (verdict.remap, verdict.device_map) == (False, {})
    assert landed(verdict)["dri/renderD144"] == "/dev/dri/renderD136"


def test_unique_id_wins_over_the_same_minor() -> None:
    verdict = check(amd_record([(128, MI210, A)]), amd_here([(128, MI210, B), (129, MI210, A)]))
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD128"] == "/dev/dri/renderD129"


def test_without_unique_id_the_model_and_minor_decide() -> None:
    verdict = check(
        amd_record([(129, MI210, None)]), amd_here([(128, MI210, None), (129, MI210, None)])
    )
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD129"] == "/dev/dri/renderD129"


def test_another_model_or_too_few_gpus_refuse() -> None:
    other = check(amd_record([(128, MI210, A)]), amd_here([(128, MI300X, C)]))
    assert codes(other) == ["gpu-model"]
    assert "AMD Instinct MI210" in other.reasons[0][1]
    fewer = check(amd_record([(128, MI210, A), (129, MI210, B)]), amd_here([(130, MI210, C)]))
    assert codes(fewer) == ["gpu-count"]


def test_kfd_not_loaded_or_absent() -> None:
    unloaded = check(amd_record([(128, MI210, A)]), amd_here([(128, MI210, A)], loaded=False))
    assert codes(unloaded) == ["driver-not-loaded"]
    assert "kfd" in unloaded.reasons[0][1]
    absent = check(amd_record([(128, MI210, A)]), amd_here([(128, MI210, A)], kfd=False))
    assert codes(absent) == ["device-absent"]


def test_nvidia_not_loaded_does_not_matter_to_an_amd_checkpoint() -> None:
    here = amd_here([(128, MI210, A)])
    assert here["driver"]["loaded"] is False
    assert codes(check(amd_record([(128, MI210, A)]), here)) == []


def test_a_record_without_family_fields_is_read_by_kind() -> None:
    verdict = check(amd_record([(144, MI210, A)], families=False), amd_here([(136, MI210, B)]))
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD144"] == "/dev/dri/renderD136"


def test_nvidia_and_amd_gpus_in_one_checkpoint() -> None:
    nvidia_host = host([(3, H200, U[3])])
    here = amd_here([(136, MI210, B)], nvidia=nvidia_host)
    at = amd_here([(144, MI210, A)], nvidia=host([(7, H200, U[7])]))
    verdict = check(amd_record([(144, MI210, A)], at=at, nvidia=[(7, H200, U[7])]), here)
    assert codes(verdict) == []
    # The device map is cuda-checkpoint's: NVIDIA's GPUs only.
    assert (verdict.remap, verdict.device_map) == (True, {U[7]: U[3]})
    assert landed(verdict) == {
        "dri/renderD144": "/dev/dri/renderD136",
        "kfd": "/dev/kfd",
        "nvidia7": "/run/nvidia/driver/dev/nvidia3",
        "nvidiactl": "/run/nvidia/driver/dev/nvidiactl",
    }
    # A used AMD GPU never lands on an NVIDIA one, whatever its identity says.
    crossed = check(
        amd_record([(144, H200, U[7])], at=amd_here([(144, H200, U[7])])),
        amd_here([(136, MI210, B)], nvidia=host([(7, H200, U[7])])),
    )
    assert codes(crossed) == ["gpu-model"]


def test_two_render_nodes_under_one_unique_id_are_read() -> None:
    # NVIDIA UUIDs must be unique in a record (--device-map); AMD's unique_id enters no map.
    verdict = check(
        amd_record([(128, MI210, A), (129, MI210, A)]),
        amd_here([(128, MI210, A), (129, MI210, A)]),
    )
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD128"] == "/dev/dri/renderD128"
    assert landed(verdict)["dri/renderD129"] == "/dev/dri/renderD129"


# --------------------------------------------------------------------- compute partitions
# An MI300X split into partitions (CPX): its own render node (a whole-GPU entry) and one
# entry per partition render node, each with "partition": K and the physical GPU's unique id
# and model (docs/map.md, "AMD compute partitions").


def split(value: dict[str, Any], partitions: dict[int, int]) -> dict[str, Any]:
    """`value` (a map from amd_here, or a record from amd_record) with the GPUs of the render
    minors in `partitions` marked as compute partitions (minor -> K)."""
    for gpu in value.get("gpus", []):
        if gpu.get("family") == "amd" and gpu["minor"] in partitions:
            gpu["partition"] = partitions[gpu["minor"]]
    for entry in value.get("used", []):
        if entry.get("gpu") is not None and entry["minor"] in partitions:
            entry["gpu"]["partition"] = partitions[entry["minor"]]
    if "map" in value:
        split(value["map"], partitions)
    return value


# One MI300X (unique id A) in CPX on each host: renderD128 whole, 129..131 partitions 0..2.
CPX_A = [(128, MI300X, A), (129, MI300X, A), (130, MI300X, A), (131, MI300X, A)]
CPX_B = [(136, MI300X, B), (137, MI300X, B), (138, MI300X, B), (139, MI300X, B)]
PARTS_A = {129: 0, 130: 1, 131: 2}
PARTS_B = {137: 7, 138: 8, 139: 9}


def partition_record(minor: int, at: dict[str, Any] | None = None) -> dict[str, Any]:
    here = split(amd_here(CPX_A), PARTS_A)
    [used] = [gpu for gpu in CPX_A if gpu[0] == minor]
    return split(amd_record([used], at=at or here), PARTS_A)


def test_a_partition_record_is_the_published_model() -> None:
    decoded = msgspec.convert(partition_record(130), RecordModel, strict=True)
    [render] = [u for u in decoded.used if u.kind == "render"]
    assert render.gpu is not None and render.gpu.partition == 1


def test_a_used_partition_lands_on_the_same_partition_of_the_same_gpu() -> None:
    here = split(amd_here(list(reversed(CPX_A))), PARTS_A)  # map order must not matter
    verdict = check(partition_record(130), here)
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD130"] == "/dev/dri/renderD130"


def test_a_used_partition_lands_on_another_partition_of_its_gpu_before_another_gpu() -> None:
    """Partition 1 is gone here (the GPU was split another way): another partition of the
    same GPU is preferred to a partition of another GPU of the same model, even one with
    the same minor."""
    here = split(amd_here([*CPX_B[:2], (128, MI300X, A), (131, MI300X, A)]), {137: 7, 131: 2})
    here["gpus"].append({**here["gpus"][1], "minor": 130, "device": "/dev/dri/renderD130"})
    here["gpus"][-1]["partition"] = 8
    here["devices"].append({**here["devices"][0], "name": "dri/renderD130", "minor": 130})
    here["devices"][-1]["path"] = "/dev/dri/renderD130"
    verdict = check(partition_record(130), here)
    assert codes(verdict) == []
    assert landed(verdict)["dri/renderD130"] == "/dev/dri/renderD131"


def test_a_used_partition_moves_to_a_partition_of_another_gpu_of_the_model() -> None:
    here = split(amd_here(CPX_B), PARTS_B)
    verdict = check(partition_record(130), here)
    assert codes(verdict) == []
    # Not renderD136: that is a whole GPU, and a partition lands on a partition.
    assert landed(verdict)["dri/renderD130"] == "/dev/dri/renderD137"


def test_a_used_partition_never_lands_on_a_whole_gpu_nor_a_whole_gpu_on_a_partition() -> None:
    unsplit = amd_here([(128, MI300X, A)])  # the same GPU, not split here
    verdict = check(partition_record(130), unsplit)
    assert codes(verdict) == ["gpu-count"]
    only_partitions = split(amd_here(CPX_B[1:]), PARTS_B)
    whole = check(partition_record(128), only_partitions)
    assert codes(whole) == ["gpu-count"]


def test_a_used_partition_of_another_model_refuses() -> None:
    here = split(amd_here([(m, MI210, u) for m, _, u in CPX_B]), PARTS_B)
    assert codes(check(partition_record(130), here)) == ["gpu-model"]
