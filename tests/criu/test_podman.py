"""End to end through Podman: a checkpoint exported as an archive, asked where it can go back.

Debian's Podman 4.3.1 with runc 1.1.5 and CRIU 4.1.1 (the prepared `.criu/criu`, first on
PATH as `criu`), the installed action named in /etc/criu/runc.conf, all inside a private
mount namespace (tests/criu/podman_scenario.py: overlays on /etc and /run, a private storage
root in a scratch directory; the machine's configuration and Podman state are untouched).

Three simulated nodes (simhost.py), each a daemon: A holds the GPU the container uses (its
nvidia5, this machine's /dev/zero), B the same model under another UUID, C another model.
The container on A is exported with `podman container checkpoint --export` (zstd, Podman's
default); `restore-check` on the archive file says B fits with a device map and C does not
(`gpu-model`); `podman container restore --import` on C is stopped by the gate at
pre-restore, before any process exists, and on A it succeeds, the device held again. A
second export with `--compress none` is asked through every form of the contract's
"Checkpoint archives" (the file, gzip/xz/bzip2 copies, the unpacked directory, its
`checkpoint/`), and a kubelet-shaped archive (a plain tar with CRI-O's members) built from it:
every form gives the same verdicts.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.rootfs import copy_with_libraries

from .harness import Criu
from .simhost import SimHost
from .test_archives import compress
from .test_restore_check import UUID_A, UUID_C, other_minor_spec, restore_check

pytestmark = pytest.mark.criu

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600.0
RECORD = "checkpoint/gpu-device-watcher.json"


@pytest.fixture
def scratch() -> Iterator[Path]:
    for tool in ("podman", "runc", "conmon", "zstd", "ldd", "mount", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install podman runc zstd)")
    # Short: the nodes' socket paths must fit AF_UNIX's 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="gdw-pm-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def image_tar(scratch: Path) -> Path:
    """A root filesystem of copied binaries, as `podman import` takes it."""
    rootfs = scratch / "rootfs"
    for program in ("sh", "sleep"):
        copy_with_libraries(rootfs, program)
    for name in ("dev", "proc", "sys", "tmp"):
        (rootfs / name).mkdir(exist_ok=True)
    target = scratch / "image.tar"
    with tarfile.open(target, "w") as archive:
        archive.add(rootfs, arcname=".")
    return target


def verdict(checkpoint: Path, node: SimHost) -> dict[str, Any]:
    done = restore_check(checkpoint, "--socket", str(node.socket), "--format", "json")
    assert done.returncode in (0, 1), done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def kubelet_archive(unpacked: Path, target: Path) -> None:
    """A plain tar as the kubelet's checkpoint API leaves it (CRI-O's layout): the CRIU
    images under checkpoint/, then the engine's dumps and the root filesystem's changes."""
    with tarfile.open(target, "w") as archive:
        archive.add(unpacked / "checkpoint", arcname="checkpoint")
        for name, data in (
            ("config.dump", b'{"id": "0123", "name": "gpu-worker"}'),
            ("spec.dump", b'{"ociVersion": "1.0.2"}'),
            ("bind.mounts", b"[]"),
            ("rootfs-diff.tar", bytes(10240)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _installed_action_directory(scratch: Path) -> Path:
    """The action as `install-action` writes it, in SCRATCH/libexec."""
    actions = scratch / "libexec"
    actions.mkdir()
    installed = subprocess.run(
        [sys.executable, "-m", "watcher", "install-action", str(actions)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    return actions


def _every_form_of(plain: Path, scratch: Path) -> list[Path]:
    """The plain export unpacked, its checkpoint/ directory, compressed four ways, and as
    the kubelet's archive."""
    unpacked = scratch / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(plain), "-C", str(unpacked)], check=True, timeout=60)
    forms = [unpacked, unpacked / "checkpoint"]
    for compression in ("gzip", "xz", "bzip2", "zstd"):
        copy = scratch / f"ck-{compression}.bin"
        copy.write_bytes(compress(plain.read_bytes(), compression))
        forms.append(copy)
    kubelet = scratch / "checkpoint-gpu-worker_default-worker-2026-12-06T04:00:00Z.tar"
    kubelet_archive(unpacked, kubelet)
    forms.append(kubelet)
    return forms


def test_podman_export_restore_check_and_the_gate(
    criu: Criu, make_host: Callable[..., SimHost], scratch: Path
) -> None:
    node_a = make_host(name="a")
    node_b = make_host(other_minor_spec(), name="b")
    node_c = make_host(other_minor_spec("NVIDIA A100-SXM4-80GB"), name="c")
    actions = _installed_action_directory(scratch)
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    (bin_dir / "criu").symlink_to(criu.binary)
    archives = {"zstd": str(scratch / "ck.tar.zst"), "plain": str(scratch / "ck.tar")}
    result = scratch / "result.json"
    spec = {
        "scratch": str(scratch),
        "action": str(actions / "gpu-device-watcher-criu-action"),
        "sockets": {"A": str(node_a.socket), "C": str(node_c.socket)},
        # CRIU first; the system's python3 runs the installed action.
        "path": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "image_tar": str(image_tar(scratch)),
        "archives": archives,
        "result": str(result),
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "--"),
            *(sys.executable, "-m", "tests.criu.podman_scenario", str(scratch / "spec.json")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    steps: dict[str, Any] = json.loads(result.read_text())

    def ok(name: str) -> None:
        assert name in steps, f"{name} did not run: {json.dumps(steps, indent=1)[-4000:]}"
        assert steps[name]["rc"] == 0, steps[name]

    for name in ("import", "run", "checkpoint_zstd"):
        ok(name)
    assert steps["held_before"] == [1, 5]

    # The exported archive: zstd by its first bytes, the record inside it.
    zstd_archive = Path(archives["zstd"])
    assert zstd_archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    on_b = verdict(zstd_archive, node_b)
    assert (on_b["fits"], on_b["device_map"]) == (True, {UUID_A: UUID_C})
    on_c = verdict(zstd_archive, node_c)
    assert not on_c["fits"]
    assert [reason["code"] for reason in on_c["reasons"]] == ["gpu-model"]

    # On C the gate stops the import at pre-restore: nothing runs.
    assert steps["restore_on_c"]["rc"] != 0
    assert steps["held_on_c"] is None
    logs_c = "\n".join(steps["restore_logs_c"]) + steps["restore_on_c"]["stderr"]
    assert "gpu-device-watcher: gpu-model:" in logs_c, logs_c[-4000:]
    assert "gpu-device-watcher: restore stopped" in logs_c
    # Podman created the container from the archive; CRIU never made its process.
    assert steps["ps_after_c"]["stdout"].split() == ["gdw-podman-e2e", "Created"]

    # On A the same archive comes back, holding its device again.
    ok("restore_on_a")
    assert steps["held_on_a"] == [1, 5]
    ok("checkpoint_plain")

    # The plain export through every form: the same verdicts.
    plain = Path(archives["plain"])
    assert plain.read_bytes()[257:262] == b"ustar"
    expected = {"b": verdict(plain, node_b), "c": verdict(plain, node_c)}
    assert expected["b"]["device_map"] == {UUID_A: UUID_C}
    assert [reason["code"] for reason in expected["c"]["reasons"]] == ["gpu-model"]
    forms = _every_form_of(plain, scratch)
    for form in forms:
        assert verdict(form, node_b) == expected["b"], form
        assert verdict(form, node_c) == expected["c"], form
