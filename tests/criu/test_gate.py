"""The restore gate as a table: records and maps built by hand, verdicts checked whole.

Pure: no daemon, no CRIU, no namespace. Each case names a situation an orchestrator meets
(the same host; another minor with another UUID; two GPUs of one model onto two others; fewer
GPUs; another model; a driver without --device-map; the "major" policy with and without
versioned libraries; a version 1 record) and the verdict it must get.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from watcher.core.record import Record as RecordModel
from watcher.criu import gate, recordfile
from watcher.criu.text import shown

H200, A100 = "NVIDIA H200", "NVIDIA A100-SXM4-80GB"
U = {n: f"GPU-{n:08x}-1111-2222-3333-444444444444" for n in range(16)}  # UUIDs by number


def host(
    gpus: list[tuple[int, str, str | None]],
    *,
    version: str = "580.95.05",
    loaded: bool = True,
    dev_root: str = "/run/nvidia/driver/dev",
    missing: tuple[str, ...] = (),
    invalid: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A map: nvidiactl, nvidia-uvm and one node per (minor, model, uuid) GPU."""
    names = ["nvidiactl", "nvidia-uvm", *(f"nvidia{minor}" for minor, _, _ in gpus)]
    devices = [
        {
            "name": name,
            "path": f"{dev_root}/{name}",
            "kind": "gpu" if name[6:].isdigit() else "control",
            "major": 195,
            "minor": int(name[6:]) if name[6:].isdigit() else 255,
            "mode": "0666",
            "valid": name not in invalid,
            "mount": None,
        }
        for name in names
        if name not in missing
    ]
    problems = [
        {
            "code": "wrong-minor",
            "severity": "error",
            "message": f"{name} has the wrong minor",
            "path": f"{dev_root}/{name}",
        }
        for name in invalid
    ]
    return {
        "generation": 3,
        "updated": "2026-11-30T10:00:00.000000Z",
        "driver": {
            "loaded": loaded,
            "version": version,
            "root": "/run/nvidia/driver",
            "dev_root": dev_root,
            "source": "detected",
            "cuda_checkpoint": None,
        },
        "devices": devices,
        "gpus": [
            {
                "minor": minor,
                "bus_id": f"0000:{minor + 16:02x}:00.0",
                "model": model,
                "uuid": uuid,
                "device": f"{dev_root}/nvidia{minor}" if f"nvidia{minor}" not in missing else None,
            }
            for minor, model, uuid in gpus
        ],
        "problems": problems,
    }


def record(
    used_gpus: list[tuple[int, str, str | None]],
    *,
    at: dict[str, Any] | None = None,
    version: int = 2,
    others: tuple[str, ...] = ("nvidiactl", "nvidia-uvm"),
    libraries: tuple[str, ...] = (),
    checks: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A record of a tree that used the given GPUs (and `others`) on host `at`."""
    at = at if at is not None else host(used_gpus)
    dev_root = at["driver"]["dev_root"]
    used: list[dict[str, Any]] = []
    for name in others:
        used.append(
            {
                "name": name,
                "path": f"{dev_root}/{name}",
                "kind": "control",
                "major": 195,
                "minor": 255,
                "valid": True,
                "pids": [4242],
                "via": ["fd"],
            }
        )
    for minor, model, uuid in used_gpus:
        entry: dict[str, Any] = {
            "name": f"nvidia{minor}",
            "path": f"{dev_root}/nvidia{minor}",
            "kind": "gpu",
            "major": 195,
            "minor": minor,
            "valid": True,
            "pids": [4242, 4243],
            "via": ["fd", "maps"],
        }
        if version >= 2:
            entry["gpu"] = {
                "uuid": uuid,
                "bus_id": f"0000:{minor + 16:02x}:00.0",
                "model": model,
                "minor": minor,
            }
        used.append(entry)
    used.sort(key=lambda entry: entry["name"])
    result: dict[str, Any] = {
        "version": version,
        "generation": 3,
        "hostname": "gpu-node-7",
        "kernel": "6.18.0",
        "created": "2026-11-30T10:00:00.000000Z",
        "pid": 4242,
        "map": at,
        "used": used,
    }
    if version >= 2:
        result.update(
            environment={"NVIDIA_VISIBLE_DEVICES": "all"},
            libraries=list(libraries),
            checks=[{"code": code, "severity": "error", "message": "..."} for code in checks],
        )
    return result


def verdict_of(rec: dict[str, Any], here: dict[str, Any], policy: str = "exact") -> gate.Verdict:
    return gate.check(recordfile.validate(rec), here, policy)


def codes(verdict: gate.Verdict) -> list[str]:
    return [code for code, _ in verdict.reasons]


def landed(verdict: gate.Verdict) -> dict[str, str | None]:
    return {str(device["name"]): device["here"] for device in verdict.devices}


def test_the_builders_make_records_the_published_model_accepts() -> None:
    rec = record([(0, H200, U[0])], libraries=("libcuda.so.580.95.05",))
    msgspec.convert(rec, RecordModel, strict=True)
    msgspec.convert(record([(0, H200, U[0])], version=1), RecordModel, strict=True)


# ------------------------------------------------------------------------------ the table


CASES: list[tuple[str, dict[str, Any], dict[str, Any], str, dict[str, Any]]] = [
    (
        "same host",
        record([(0, H200, U[0]), (1, H200, U[1])]),
        host([(0, H200, U[0]), (1, H200, U[1])]),
        "exact",
        {"codes": [], "remap": False, "map": {}, "landed": {"nvidia0": "nvidia0"}},
    ),
    (
        "another minor with another UUID",
        record([(7, H200, U[7])]),
        host([(3, H200, U[3])]),
        "exact",
        {"codes": [], "remap": True, "map": {U[7]: U[3]}, "landed": {"nvidia7": "nvidia3"}},
    ),
    (
        "two GPUs of one model onto two others",
        record([(0, H200, U[0]), (1, H200, U[1])]),
        host([(4, H200, U[4]), (5, H200, U[5])]),
        "exact",
        {
            "codes": [],
            "remap": True,
            "map": {U[0]: U[4], U[1]: U[5]},
            "landed": {"nvidia0": "nvidia4", "nvidia1": "nvidia5"},
        },
    ),
    (
        "one GPU stays by UUID, the other moves: the map names both",
        record([(0, H200, U[0]), (1, H200, U[1])]),
        host([(0, H200, U[9]), (1, H200, U[0])]),
        "exact",
        {
            "codes": [],
            "remap": True,
            "map": {U[0]: U[0], U[1]: U[9]},
            "landed": {"nvidia0": "nvidia1", "nvidia1": "nvidia0"},
        },
    ),
    (
        "the same minor is preferred among GPUs of the model",
        record([(2, H200, U[2])]),
        host([(0, H200, U[10]), (1, H200, U[11]), (2, H200, U[12])]),
        "exact",
        {"codes": [], "remap": True, "map": {U[2]: U[12]}, "landed": {"nvidia2": "nvidia2"}},
    ),
    (
        "fewer GPUs of the model",
        record([(0, H200, U[0]), (1, H200, U[1])]),
        host([(0, H200, U[0]), (1, A100, U[9])]),
        "exact",
        {"codes": ["gpu-count"], "remap": False, "map": {}},
    ),
    (
        "another model",
        record([(0, H200, U[0])]),
        host([(0, A100, U[9])]),
        "exact",
        {"codes": ["gpu-model"], "remap": False, "map": {}},
    ),
    (
        "a UUID that now names another model is not the same GPU",
        record([(0, H200, U[0])]),
        host([(0, A100, U[0])]),
        "exact",
        {"codes": ["gpu-model"], "remap": False, "map": {}},
    ),
    (
        "a driver without --device-map and a UUID change",
        record([(7, H200, U[7])], at=host([(7, H200, U[7])], version="570.86.10")),
        host([(3, H200, U[3])], version="570.86.10"),
        "exact",
        {"codes": ["remap-unsupported"], "remap": True, "map": {}},
    ),
    (
        "a driver without --device-map and the same GPU",
        record([(7, H200, U[7])], at=host([(7, H200, U[7])], version="570.86.10")),
        host([(7, H200, U[7])], version="570.86.10"),
        "exact",
        {"codes": [], "remap": False, "map": {}},
    ),
    (
        '"major" policy, another 580 driver, no versioned library',
        record([(0, H200, U[0])]),
        host([(0, H200, U[0])], version="580.105.08"),
        "major",
        {"codes": [], "remap": False, "map": {}},
    ),
    (
        '"major" policy, another 580 driver, the tree mapped libcuda.so.580.95.05',
        record([(0, H200, U[0])], libraries=("libcuda.so.580.95.05",)),
        host([(0, H200, U[0])], version="580.105.08"),
        "major",
        {"codes": ["driver-library"], "remap": False, "map": {}},
    ),
    (
        '"exact" policy, another 580 driver, with a versioned library',
        record([(0, H200, U[0])], libraries=("libcuda.so.580.95.05",)),
        host([(0, H200, U[0])], version="580.105.08"),
        "exact",
        {"codes": ["driver-version", "driver-library"], "remap": False, "map": {}},
    ),
    (
        '"major" policy does not cross majors',
        record([(0, H200, U[0])]),
        host([(0, H200, U[0])], version="590.44.01"),
        "major",
        {"codes": ["driver-version"], "remap": False, "map": {}},
    ),
    (
        "a version 1 record finds its GPUs' identity in its map",
        record([(7, H200, U[7])], version=1),
        host([(3, H200, U[3])]),
        "exact",
        {"codes": [], "remap": True, "map": {U[7]: U[3]}, "landed": {"nvidia7": "nvidia3"}},
    ),
    (
        "a version 1 record on its own host",
        record([(0, H200, U[0])], version=1),
        host([(0, H200, U[0])]),
        "exact",
        {"codes": [], "remap": False, "map": {}},
    ),
    (
        "the driver is not loaded: nothing else is judged",
        record([(0, H200, U[0])]),
        host([], loaded=False),
        "exact",
        {"codes": ["driver-not-loaded"], "remap": False, "map": {}},
    ),
    (
        "a used control node is absent",
        record([(0, H200, U[0])]),
        host([(0, H200, U[0])], missing=("nvidia-uvm",)),
        "exact",
        {"codes": ["device-absent"], "remap": False, "map": {}},
    ),
    (
        "the GPU is here but its node is invalid",
        record([(0, H200, U[0])]),
        host([(0, H200, U[0])], invalid=("nvidia0",)),
        "exact",
        {"codes": ["device-invalid"], "remap": False, "map": {}},
    ),
    (
        "the GPU is here but its node is absent",
        record([(0, H200, U[0])]),
        host([(0, H200, U[0])], missing=("nvidia0",)),
        "exact",
        {"codes": ["device-absent"], "remap": False, "map": {}},
    ),
    (
        "MIG was in use at dump",
        record([(0, H200, U[0])], checks=("mig-in-use",)),
        host([(0, H200, U[0])]),
        "exact",
        {"codes": ["mig-in-use"], "remap": False, "map": {}},
    ),
    (
        "cuda-checkpoint-missing at dump is not a restore reason",
        record([(0, H200, U[0])], checks=("cuda-checkpoint-missing",)),
        host([(0, H200, U[0])]),
        "exact",
        {"codes": [], "remap": False, "map": {}},
    ),
    (
        "no GPU used: any host, even without a driver",
        record([], others=()),
        host([], loaded=False),
        "exact",
        {"codes": [], "remap": False, "map": {}},
    ),
    (
        "a GPU whose UUID this host does not know cannot be remapped",
        record([(0, H200, U[0])]),
        host([(0, H200, None)]),
        "exact",
        {"codes": ["remap-unsupported"], "remap": True, "map": {}},
    ),
]


@pytest.mark.parametrize(
    ("rec", "here", "policy", "expect"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_the_gate(
    rec: dict[str, Any], here: dict[str, Any], policy: str, expect: dict[str, Any]
) -> None:
    verdict = verdict_of(rec, here, policy)
    assert codes(verdict) == expect["codes"], verdict.reasons
    assert verdict.fits is (not expect["codes"])
    assert verdict.remap is expect["remap"]
    assert verdict.device_map == expect["map"]
    dev_root = here["driver"]["dev_root"]
    for name, where in expect.get("landed", {}).items():
        assert landed(verdict)[name] == f"{dev_root}/{where}"
    assert set(codes(verdict)) <= set(gate.REASON_CODES)


def test_each_used_gpu_needs_a_gpu_of_its_own() -> None:
    # Two H200s used, one H200 here (which one of them could take): refused, never shared.
    verdict = verdict_of(record([(0, H200, U[0]), (1, H200, U[1])]), host([(5, H200, U[5])]))
    assert codes(verdict) == ["gpu-count"]
    assert (
        "the checkpoint used 2 NVIDIA H200 GPU(s) (nvidia0, nvidia1); this host has 1"
        in (verdict.reasons[0][1])
    )


def test_a_uuid_match_is_not_taken_by_a_model_match_first() -> None:
    # nvidia1 (U1) is here as nvidia0; nvidia0 (U0) is gone. U1 must keep its own GPU and U0
    # take the other H200, whatever the order in the record.
    verdict = verdict_of(
        record([(0, H200, U[0]), (1, H200, U[1])]), host([(0, H200, U[1]), (1, H200, U[8])])
    )
    assert verdict.device_map == {U[0]: U[8], U[1]: U[1]}


def test_the_device_map_line_lists_every_used_gpu_in_record_order() -> None:
    verdict = verdict_of(
        record([(0, H200, U[0]), (1, H200, U[1])]), host([(0, H200, U[1]), (1, H200, U[8])])
    )
    assert verdict.device_map_text() == f"{U[0]}={U[8]},{U[1]}={U[1]}"


def test_the_json_shape() -> None:
    verdict = verdict_of(record([(7, H200, U[7])]), host([(3, H200, U[3])]))
    dev_root = "/run/nvidia/driver/dev"
    assert verdict.as_json() == {
        "fits": True,
        "remap": True,
        "record": {
            "hostname": "gpu-node-7",
            "driver": "580.95.05",
            "created": "2026-11-30T10:00:00.000000Z",
        },
        "reasons": [],
        "devices": [
            {
                "name": "nvidia-uvm",
                "path": f"{dev_root}/nvidia-uvm",
                "here": f"{dev_root}/nvidia-uvm",
            },
            {"name": "nvidia7", "path": f"{dev_root}/nvidia7", "here": f"{dev_root}/nvidia3"},
            {"name": "nvidiactl", "path": f"{dev_root}/nvidiactl", "here": f"{dev_root}/nvidiactl"},
        ],
        "device_map": {U[7]: U[3]},
    }
    refused = verdict_of(record([(0, H200, U[0])]), host([(0, A100, U[9])])).as_json()
    assert refused["fits"] is False
    assert [reason["code"] for reason in refused["reasons"]] == ["gpu-model"]
    assert refused["reasons"][0]["message"].startswith("nvidia0 used NVIDIA H200 GPU(s)")


def test_driver_library_names_the_libraries_and_says_why() -> None:
    verdict = verdict_of(
        record(
            [(0, H200, U[0])],
            at=host([(0, H200, U[0])], version="560.35.03"),
            libraries=("libcuda.so.560.35.03", "libnvidia-ml.so.560.35.03"),
        ),
        host([(0, H200, U[0])], version="560.35.05"),
        "major",
    )
    [(code, message)] = verdict.reasons
    assert code == "driver-library"
    assert "libcuda.so.560.35.03, libnvidia-ml.so.560.35.03 (driver 560.35.03)" in message
    assert "this host's driver is 560.35.05" in message


def test_an_old_driver_refusal_says_where_each_gpu_would_land() -> None:
    verdict = verdict_of(
        record([(7, H200, U[7])], at=host([(7, H200, U[7])], version="570.86.10")),
        host([(3, H200, U[3])], version="570.86.10"),
    )
    [(code, message)] = verdict.reasons
    assert code == "remap-unsupported"
    assert "(nvidia7 -> nvidia3)" in message
    assert "drivers 580 and later have it, this host has 570.86.10" in message


def test_the_host_map_is_read_defensively() -> None:
    rec = recordfile.validate(record([(0, H200, U[0])]))
    for here in (
        {},
        {"driver": "x", "devices": "y", "gpus": 3},
        {"driver": {"loaded": True, "version": 580}, "gpus": [1, None, {"uuid": 5}]},
        {"driver": {"loaded": True}, "devices": [{"name": 1, "path": None}], "gpus": [{}]},
    ):
        verdict = gate.check(rec, here)
        assert not verdict.fits


# ------------------------------------------------------------------------------ shapes


def _without(rec: dict[str, Any], *path: str | int) -> dict[str, Any]:
    broken = copy.deepcopy(rec)
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return broken


def _with(rec: dict[str, Any], value: object, *path: str | int) -> dict[str, Any]:
    broken = copy.deepcopy(rec)
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return broken


GOOD = record([(0, H200, U[0])])
BAD_SHAPES = [
    ("not an object", [GOOD]),
    ("no version", _without(GOOD, "version")),
    ("version as text", _with(GOOD, "2", "version")),
    ("version as bool", _with(GOOD, True, "version")),
    ("no used", _without(GOOD, "used")),
    ("used as object", _with(GOOD, {}, "used")),
    ("a used entry as text", _with(GOOD, "nvidia0", "used", 0)),
    ("a name as number", _with(GOOD, 0, "used", 0, "name")),
    ("an empty name", _with(GOOD, "", "used", 0, "name")),
    ("pids as text", _with(GOOD, "4242", "used", 0, "pids")),
    ("a pid as bool", _with(GOOD, [True], "used", 0, "pids")),
    ("gpu as list", _with(GOOD, [], "used", 1, "gpu")),
    ("a uuid with a comma", _with(GOOD, "GPU-1=GPU-2,GPU-3", "used", 1, "gpu", "uuid")),
    ("a model as number", _with(GOOD, 5, "used", 1, "gpu", "model")),
    ("no map", _without(GOOD, "map")),
    ("driver as text", _with(GOOD, "580", "map", "driver")),
    ("driver version as number", _with(GOOD, 580, "map", "driver", "version")),
    ("libraries as text", _with(GOOD, "libcuda.so.1", "libraries")),
    ("a check without code", _with(GOOD, [{"severity": "error"}], "checks")),
    ("environment as list", _with(GOOD, ["A=B"], "environment")),
    ("hostname as number", _with(GOOD, 7, "hostname")),
]


@pytest.mark.parametrize("broken", [case[1] for case in BAD_SHAPES], ids=[c[0] for c in BAD_SHAPES])
def test_a_record_of_the_wrong_shape_is_unreadable(broken: object) -> None:
    with pytest.raises(recordfile.RecordError) as caught:
        recordfile.validate(broken)
    assert caught.value.code == "record-unreadable"


def test_an_unknown_record_version_is_record_version() -> None:
    with pytest.raises(recordfile.RecordError) as caught:
        recordfile.validate(_with(GOOD, 3, "version"))
    assert caught.value.code == "record-version"
    assert "upgrade it on this host" in caught.value.message


# ------------------------------------------------------------------------------ escaping


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("nvidia0", "nvidia0"),
        ("a\nb", "a\\x0ab"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[2J\x07", "\\x1b[2J\\x07"),
        ("back\\slash", "back\\\\slash"),
        ("caf\u00e9 \u2028 \u202e", "caf\\xe9 \\u2028 \\u202e"),
        ("\udcff", "\\udcff"),
        ("\U0001f600", "\\U0001f600"),
        (12345, "12345"),
        ("x" * 200, "x" * 160 + "..."),
    ],
)
def test_shown_is_one_run_of_printable_ascii(value: object, expected: str) -> None:
    assert shown(value) == expected
