"""The pure parts of doctor over hand-written text: CRIU's config, the tools' version lines
(as the real tools print them), systemd's Environment=, an ELF's interpreter, and the
checks' own rules, with no host at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.doctor import criu, cuda, node, runtimes
from watcher.doctor.host import HostTree, elf_interpreter
from watcher.doctor.model import Check, exit_code, summary
from watcher.doctor.services import parse_environment, read_service


def test_criu_config_lines() -> None:
    text = """\
# a comment
action-script /usr/local/libexec/a
--action-script=/b
action-script "/with space/c"\t
libdir /opt/criu # trailing comment
tcp-established
"""
    assert criu.parse_config(text) == [
        ("action-script", "/usr/local/libexec/a"),
        ("action-script", "/b"),
        ("action-script", "/with space/c"),
        ("libdir", "/opt/criu"),
        ("tcp-established", ""),
    ]


@pytest.mark.parametrize(
    ("text", "tool", "version"),
    [
        ("Version: 4.1.1\n", "criu", (4, 1, 1)),
        ("Version: 3.19\nGitID: v3.19\n", "criu", (3, 19)),
        (
            "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n",
            "runc",
            (1, 1, 5),
        ),
        ("crun version 1.8.1\ncommit: f8a096be\nrundir: /run/crun\n", "crun", (1, 8, 1)),
        (
            "containerd github.com/containerd/containerd v1.7.2 0cae528dd6cb\n",
            "containerd",
            (1, 7, 2),
        ),
        (
            "containerd containerd.io 1.6.20 2806fc1057397dbaeefbea0e4e17bddfbd388f38\n",
            "containerd",
            (1, 6, 20),
        ),
        ("crio version 1.28.1\nVersion:        1.28.1\n", "crio", (1, 28, 1)),
        ("no version here\n", "runc", None),
    ],
)
def test_tool_versions(text: str, tool: str, version: tuple[int, ...] | None) -> None:
    if tool == "criu":
        assert criu.parse_version(text) == version
    else:
        assert runtimes.parse_tool_version(text, tool) == version


def test_environment_values() -> None:
    assert parse_environment('"PATH=/a:/b" GOTRACEBACK=crash') == {
        "PATH": "/a:/b",
        "GOTRACEBACK": "crash",
    }
    assert parse_environment("'PATH=/x y' broken") == {"PATH": "/x y"}


def test_a_drop_in_of_higher_priority_wins(tmp_path: Path) -> None:
    def write(path: str, text: str) -> None:
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    write("/usr/lib/systemd/system/crio.service", '[Service]\nEnvironment="PATH=/unit"\n')
    write(
        "/usr/lib/systemd/system/crio.service.d/10-a.conf", '[Service]\nEnvironment="PATH=/lib-a"\n'
    )
    write("/etc/systemd/system/crio.service.d/10-a.conf", '[Service]\nEnvironment="PATH=/etc-a"\n')
    service = read_service(HostTree(str(tmp_path)), "crio")
    assert service.unit == "/usr/lib/systemd/system/crio.service"
    assert (service.path_env, service.path_from) == (
        "/etc-a",
        "/etc/systemd/system/crio.service.d/10-a.conf",
    )
    write("/etc/systemd/system/crio.service.d/20-b.conf", "[Service]\nEnvironment=\n")
    reset = read_service(HostTree(str(tmp_path)), "crio")
    assert reset.path_env == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
    assert read_service(HostTree(str(tmp_path)), "containerd").unit is None


def test_elf_interpreter() -> None:
    assert elf_interpreter(Path("/bin/sh").resolve().read_bytes()[:65536]) is not None
    assert elf_interpreter(b"#!/bin/sh\n" + b"\0" * 100) is None
    assert elf_interpreter(b"\x7fELF" + b"\xff" * 80) is None  # garbage: no answer, no error


def test_a_fix_goes_with_warn_and_fail_only() -> None:
    with pytest.raises(ValueError, match="a fix goes with warn and fail"):
        Check("criu", "fail", "found", None)
    with pytest.raises(ValueError, match="a fix goes with warn and fail"):
        Check("criu", "ok", "found", "a fix")
    with pytest.raises(ValueError, match="unknown status"):
        Check("criu", "bad", "found", None)
    checks = [Check("a", "ok", "x"), Check("b", "warn", "y", "z"), Check("c", "skip", "w")]
    assert summary(checks) == {"ok": 1, "warn": 1, "fail": 0, "skip": 1}
    assert exit_code(checks) == 0
    assert exit_code([*checks, Check("d", "fail", "v", "u")]) == 1


def test_labels_that_cannot_be_read_are_skipped_not_failed() -> None:
    facts = node.LabelFacts("/f", None, "Permission denied", {})
    assert node.check_labels(facts).status == "skip"
    assert node.check_labels(node.LabelFacts("/f", None, "No such file", {})).status == "fail"


def test_cuda_help_without_reading_it_is_a_skip() -> None:
    binary = "/usr/bin/cuda-checkpoint"
    lookup = cuda.Lookup("criu", "/usr/bin", binary, False, binary, None, "not run: writable")
    check = cuda.check_cuda_checkpoint(cuda.CudaFacts(True, "580.95.05", (lookup,)))
    assert check.status == "skip"
    assert "its -h not read: not run: writable" in check.found
