"""The CRIU action never runs code from the image directory or from CRIU's environment.

CRIU runs the action as root from its work directory, the image directory by default, which
the checkpointed workload may be able to write. Here that directory holds a hostile
`watcher` package, a `__future__.py` (a standard module the action imports), and executables
named `python3`, `python3.11`, `readlink` and `stat`; CRIU's environment names it in
`PYTHONPATH`, `PYTHONSTARTUP` and as an empty and an explicit `PATH` entry, and (in the
stage-by-stage test) `PYTHONHOME`. Each planted thing, if it ever runs, appends its name to a
marker file outside the image directory. The action is named by its path and through a
link (the pip-installed script then resolves the link).

Both forms of the action: the pip-installed script and the `install-action` file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from watcher.criu import shfront
from watcher.criu.actionfile import ZIP_PROGRAM

from .harness import ACTION, REPO, Criu, Tree, alive
from .simhost import SimHost

RECORD = "gpu-device-watcher.json"
TIMEOUT = 30.0
STAGES = (
    "pre-dump",
    "network-lock",
    "post-dump",
    "pre-restore",
    "setup-namespaces",
    "post-setup-namespaces",
    "post-restore",
    "network-unlock",
    "pre-resume",
    "post-resume",
)


def plant(directory: Path, marker: Path) -> None:
    """Everything a workload could leave in its checkpoint directory to be run as root."""
    code = (
        f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
        # What an attacker wants CRIU to read: "go on".
        "import sys\nprint('gpu-device-watcher: restore may go on')\nsys.exit(0)\n"
    )
    package = directory / "watcher"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(code)
    (package / "criu.py").write_text(code)
    (directory / "__future__.py").write_text(code)
    (directory / "startup.py").write_text(code)
    for name in ("python3", "python3.11", "readlink", "stat"):
        program = directory / name
        program.write_text(f"#!/bin/sh\necho {name} >>{marker}\nexit 0\n")
        program.chmod(0o755)


def hostile(env: Mapping[str, str], directory: Path) -> dict[str, str]:
    hostile_env = dict(env)
    hostile_env["PYTHONPATH"] = str(directory)
    hostile_env["PYTHONSTARTUP"] = str(directory / "startup.py")
    # An empty entry is the working directory (the image directory), then the same by name.
    hostile_env["PATH"] = f":{directory}:{env.get('PATH', '/usr/bin:/bin')}"
    return hostile_env


def ran(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


@pytest.fixture(params=["pip-script", "pip-script-link", "install-action-link"])
def action(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The action as CRIU's configuration names it: the installed file, or a link to it."""
    if request.param.startswith("pip-script"):
        shipped = REPO / "scripts" / ACTION.name
        assert ACTION.read_bytes() == shipped.read_bytes(), (
            f"{ACTION} is not {shipped}: reinstall the package (pip install -e .)"
        )
        target = ACTION
        if request.param == "pip-script":
            return target
    else:
        directory = tmp_path / "installed"
        directory.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "watcher", "install-action", str(directory)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        target = directory / ACTION.name
    links = tmp_path / "links"
    links.mkdir()
    link = links / ACTION.name
    link.symlink_to(target)
    return link


@pytest.mark.criu
def test_criu_runs_nothing_from_the_image_directory_at_any_stage(
    criu: Criu, host: SimHost, trees: Callable[..., Tree], tmp_path: Path, action: Path
) -> None:
    images = tmp_path / "images"
    marker = tmp_path / "ran"
    plant(images, marker)
    env = hostile(host.env(), images)
    tree = trees("/dev/zero")

    dumped = criu.dump(tree.root, images, env, action=action)
    assert ran(marker) == [], dumped.log
    assert dumped.ok, dumped.explain()
    tree.gone()
    # The real action ran: its record is there, naming the device the tree held.
    record = json.loads((images / RECORD).read_text())
    assert [used["name"] for used in record["used"]] == ["nvidia5"]

    restored = criu.restore(images, env, action=action)
    assert ran(marker) == [], restored.log
    assert restored.ok, restored.explain()
    assert alive(tree.root), restored.explain()
    assert "match this host: restore may go on" in restored.log, restored.log


@pytest.mark.parametrize(
    ("stage", "home"),
    [*((stage, False) for stage in STAGES), ("pre-dump", True), ("pre-restore", True)],
)
def test_no_stage_runs_code_from_the_working_directory_or_the_environment(
    *,
    host: SimHost,
    trees: Callable[..., Tree],
    tmp_path: Path,
    action: Path,
    stage: str,
    home: bool,
) -> None:
    """Each stage as CRIU starts it, from the image directory; with `home`, PYTHONHOME
    names it too (a Python that honoured it would not even start)."""
    images = tmp_path / "images"
    marker = tmp_path / "ran"
    plant(images, marker)
    env = {k: v for k, v in hostile(host.env(), images).items() if not k.startswith("CRTOOLS_")}
    if home:
        env["PYTHONHOME"] = str(images)
    env["CRTOOLS_SCRIPT_ACTION"] = stage
    tree = trees("/dev/zero")
    if stage == "pre-dump" or not stage.startswith(("pre-restore", "setup", "post-setup")):
        env["CRTOOLS_INIT_PID"] = str(tree.root)
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        env["CRTOOLS_IMAGE_DIR"] = f"/proc/{os.getpid()}/fd/{fd}"
        if stage == "pre-restore":
            # Give pre-restore a record to judge: the one a real pre-dump writes.
            env["CRTOOLS_SCRIPT_ACTION"] = "pre-dump"
            env["CRTOOLS_INIT_PID"] = str(tree.root)
            first = subprocess.run(
                [str(action)],
                env=env,
                cwd=images,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            assert first.returncode == 0, first.stderr
            env["CRTOOLS_SCRIPT_ACTION"] = "pre-restore"
            del env["CRTOOLS_INIT_PID"]
        done = subprocess.run(
            [str(action)],
            env=env,
            cwd=images,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(fd)
    assert ran(marker) == [], done.stdout + done.stderr
    assert done.returncode == 0, done.stderr
    if stage == "pre-dump":
        assert "recorded generation" in done.stdout + done.stderr
        assert (images / RECORD).exists()
    elif stage == "pre-restore":
        assert "match this host: restore may go on" in done.stdout
    else:
        assert done.stdout == done.stderr == ""


def test_the_pip_script_carries_the_shared_stage_filter_and_start() -> None:
    """One stage filter for every front: the pip script's copy is shfront.STAGES, verbatim;
    and its Python runs shfront.pip_program, isolated and without site."""
    script = (REPO / "scripts" / ACTION.name).read_text()
    assert shfront.STAGES in script
    assert f"""exec "$python" -I -S -c '{shfront.pip_program("watcher.criu")}' "$@"\n""" in script


def test_the_cuda_checkpoint_wrapper_finds_python_by_the_shared_rule() -> None:
    """The wrapper beside install-action's file starts the system's Python 3.11+ by absolute
    path (shfront.SYSTEM_PYTHON, verbatim), isolated and without site; pip's runs
    shfront.pip_program; its tools run through `command -p`."""
    wrapper = (REPO / "watcher" / "criu" / "wrapper.sh").read_text()
    assert shfront.SYSTEM_PYTHON in wrapper
    assert f"""exec "$gdw_python" -I -S -c '{ZIP_PROGRAM}' "$here/{ACTION.name}" \\\n""" in wrapper
    program = shfront.pip_program("watcher.criu.cudawrap")
    assert f"""exec "$python" -I -S -c '{program}' "$self" "$real" "$@"\n""" in wrapper
    assert "$(readlink" not in wrapper
