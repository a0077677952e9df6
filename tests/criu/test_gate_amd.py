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
