"""deploy/container: the image builds from this checkout and its command runs inside it.

Built with Debian's buildah, on a base made from Debian packages (mmdebstrap): no registry
is needed. The first build on a machine makes the base (~20 s for mmdebstrap, ~40 s in all);
later ones reuse it and the install layer (~7 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from watcher import __version__

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "container" / "build.sh"
IMAGE = f"localhost/gpu-device-watcher:{__version__}"
BASE = "localhost/gpu-device-watcher-base:bookworm"
BUILD_TIMEOUT = 900


def _base_exists() -> bool:
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", BASE],
            capture_output=True,
            timeout=60,
            check=False,
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0:
        pytest.skip("building an image with buildah needs root here")
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (apt-get install buildah; .ci/run does)")
    if shutil.which("mmdebstrap") is None and not _base_exists():
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap) and no base image")
    started = time.monotonic()
    done = subprocess.run(
        [str(BUILD)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == IMAGE
    # Seen with -s, and in the durations report: the build is most of this fixture.
    print(f"image built in {time.monotonic() - started:.1f} s")
    return IMAGE


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = subprocess.run(
        ["buildah", "from", "--pull=false", image],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120, check=False)


def _run(container: str, *command: str) -> subprocess.CompletedProcess[str]:
    # Chroot isolation, as build.sh builds: the image's files and entry points are what is
    # under test, not this machine's OCI runtime (crun refuses hybrid cgroups here).
    return subprocess.run(
        ["buildah", "run", "--isolation", "chroot", container, "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_scan_runs_inside_the_image(container: str) -> None:
    done = _run(container, "gpu-device-watcher", "scan", "--format", "json")
    assert done.returncode == 0, done.stderr
    device_map = json.loads(done.stdout)
    assert device_map["generation"] == 0
    assert {"driver", "devices", "problems"} <= set(device_map)
    # This build machine has no NVIDIA driver: the map says so rather than failing.
    assert "driver-not-loaded" in {problem["code"] for problem in device_map["problems"]}


def _daemon_args() -> list[str]:
    """The arguments the DaemonSet's daemon container runs the image with."""
    manifest = yaml.safe_load((REPO / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    (daemon,) = (
        container
        for container in manifest["spec"]["template"]["spec"]["containers"]
        if container["name"] == "gpu-device-watcher"
    )
    args: list[str] = daemon["args"]
    return args


def test_the_image_is_the_one_the_daemonset_runs(container: str) -> None:
    version = _run(container, "gpu-device-watcher", "--version")
    assert version.stdout.strip() == f"gpu-device-watcher {__version__}"
    inspected = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    config = json.loads(inspected.stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["gpu-device-watcher"]
    assert config["Cmd"] == _daemon_args()
    # install-action, as the init container runs it (the host directory is /host-action).
    installed = _run(
        container,
        "sh",
        "-c",
        "mkdir -p /host-action && gpu-device-watcher install-action /host-action"
        " && test -x /host-action/gpu-device-watcher-criu-action",
    )
    assert installed.returncode == 0, installed.stderr
