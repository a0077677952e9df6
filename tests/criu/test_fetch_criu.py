"""tests/criu/fetch_criu.sh takes its Debian mirror from this machine's apt sources only.

Each case runs the script in a private mount namespace with a tmpfs over /etc/apt holding
the sources under test, so the machine's own apt configuration is never touched.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import PRIVATE_MOUNTS, namespace_problem

SCRIPT = Path(__file__).with_name("fetch_criu.sh")
# Every script of this folder that downloads from Debian takes the mirror the same way.
DOWNLOADERS = (SCRIPT, Path(__file__).with_name("build_cuda_plugin.sh"))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@pytest.fixture(scope="module")
def private_etc_apt(tmp_path_factory: pytest.TempPathFactory) -> None:
    problem = namespace_problem(
        ("unshare", "mount", "apt-get", "dpkg-deb"),
        'mount -t tmpfs probe "$1"',
        tmp_path_factory.mktemp("fetch-probe"),
    )
    if problem is not None:
        pytest.skip(f"needs root, unshare -m, tmpfs mounts and apt-get: {problem}")


def _fetch_with_sources(
    sources: str, dest: Path, script: Path = SCRIPT
) -> subprocess.CompletedProcess[str]:
    """`script` DEST with /etc/apt holding only `sources` (a deb822 file, or none)."""
    stage = (
        "set -e; mount -t tmpfs apt /etc/apt; mkdir -p /etc/apt/sources.list.d; "
        'if [ -n "$1" ]; then printf "%s\\n" "$1" > /etc/apt/sources.list.d/test.sources; fi; '
        'exec bash "$2" "$3"'
    )
    return subprocess.run(
        [*PRIVATE_MOUNTS, "sh", "-c", stage, "sh", sources, str(script), str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("private_etc_apt")
@pytest.mark.parametrize("script", DOWNLOADERS, ids=lambda script: script.name)
def test_no_mirror_in_the_apt_sources_is_one_line_naming_the_fix(
    tmp_path: Path, script: Path
) -> None:
    done = _fetch_with_sources("", tmp_path / "criu", script)
    if script.name == "build_cuda_plugin.sh" and "not found" in done.stderr:
        pytest.skip(f"the plugin's build tools are missing here: {done.stderr.strip()}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{script.name}: no Debian mirror in this machine's apt sources (/etc/apt/sources.list, "
        "/etc/apt/sources.list.d/*.sources or *.list): add the mirror apt should use, "
        "then run again"
    ]
    assert not (tmp_path / "criu" / "criu").exists()
    assert not (tmp_path / "criu" / "cuda_plugin.so").exists()


@pytest.mark.usefixtures("private_etc_apt")
def test_the_mirror_is_the_one_the_apt_sources_name(tmp_path: Path) -> None:
    if not KEYRING.is_file():
        pytest.skip(f"{KEYRING} is missing (package debian-archive-keyring)")
    # A mirror nobody serves: the script must try exactly this one and say so.
    mirror = "http://127.0.0.1:9/debian"
    sources = f"Types: deb\nURIs: {mirror}\nSuites: bookworm\nComponents: main\n"
    done = _fetch_with_sources(sources, tmp_path / "criu")
    assert done.returncode == 1
    # apt-get update only warns about an unreachable mirror; its log says which one it tried.
    tried = (tmp_path / "criu" / "apt" / "log" / "update.log").read_text(encoding="utf-8")
    assert "127.0.0.1:9" in tried
    assert "deb.debian.org" not in tried


@pytest.mark.parametrize(
    "script", (*DOWNLOADERS, SCRIPT.with_name("apt_mirror.sh")), ids=lambda script: script.name
)
def test_the_scripts_name_no_mirror_of_their_own(script: Path) -> None:
    code = "\n".join(
        line
        for line in script.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    )
    assert re.search(r"[a-z]+://[A-Za-z0-9]", code) is None, (
        f"{script.name} must take its mirror from the machine's apt configuration"
    )
