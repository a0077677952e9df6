"""How the pip-installed action starts Python: without `site` where the install is a venv's.

The front runs `python -I -S -c shfront.pip_program(...)`: in a venv the program puts the
install's own site-packages (and an editable install's source tree) on `sys.path` itself, so
no `.pth` file's code runs as root at a dump; in any other layout it runs `site` as a normal
start would. Each test lays out a real venv (`python -m venv`) with this checkout installed
as pip installs it, plants a `.pth` file whose code leaves a marker when it runs, and does a
real `pre-dump` against the simulated host's daemon: the record is written either way, and
the marker tells which way Python started.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from .harness import ACTION, Tree, site_packages, stage_venv_install
from .simhost import SimHost

TIMEOUT = 30.0
RECORD = "gpu-device-watcher.json"


def plant_marker_pth(venv: Path, marker: Path, *, also_path: Path | None = None) -> None:
    """A `.pth` in the venv's site-packages whose `import` line creates `marker` when `site`
    processes it; with `also_path`, a second `.pth` naming that directory (a plain path
    line, as any non-editable `.pth`)."""
    packages = site_packages(venv)
    (packages / "zz_marker.pth").write_text(f"import os; os.mkdir({str(marker)!r})\n")
    if also_path is not None:
        (packages / "elsewhere.pth").write_text(f"{also_path}\n")


def pre_dump(bin_dir: Path, host: SimHost, tree: Tree, images: Path) -> dict[str, object]:
    images.mkdir()
    done = subprocess.run(
        [str(bin_dir / ACTION.name)],
        env=host.env(
            CRTOOLS_SCRIPT_ACTION="pre-dump",
            CRTOOLS_IMAGE_DIR=str(images),
            CRTOOLS_INIT_PID=str(tree.root),
        ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=images,
    )
    assert done.returncode == 0, done.stderr
    assert "recorded generation" in done.stdout, done.stdout
    record: dict[str, object] = json.loads((images / RECORD).read_text())
    return record


def test_a_wheel_install_in_a_venv_starts_without_site(
    host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    venv, marker = tmp_path / "venv", tmp_path / "site-ran"
    bin_dir = stage_venv_install(venv)
    plant_marker_pth(venv, marker)
    record = pre_dump(bin_dir, host, trees(), tmp_path / "images")
    assert [entry["name"] for entry in record["used"]] == ["nvidia5"]  # type: ignore[attr-defined]
    assert not marker.exists(), "site ran: the .pth file's code ran at pre-dump"


def test_an_editable_install_starts_without_site(
    host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """hatchling's editable `.pth` names the source tree: the program follows it itself."""
    venv, marker, source = tmp_path / "venv", tmp_path / "site-ran", tmp_path / "source"
    source.mkdir()
    bin_dir = stage_venv_install(venv, packages_at=source)
    plant_marker_pth(venv, marker)
    (site_packages(venv) / "_editable_impl_gpu_device_watcher.pth").write_text(f"{source}\n")
    pre_dump(bin_dir, host, trees(), tmp_path / "images")
    assert not marker.exists(), "site ran: the .pth file's code ran at pre-dump"


def test_any_other_layout_gets_site_as_a_normal_start(
    host: SimHost, trees: Callable[..., Tree], tmp_path: Path
) -> None:
    """The control: the package found only through a `.pth` of another name. The program
    cannot know that layout, so `site` runs (the marker shows it) and the action works."""
    venv, marker, elsewhere = tmp_path / "venv", tmp_path / "site-ran", tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = stage_venv_install(venv, packages_at=elsewhere)
    plant_marker_pth(venv, marker, also_path=elsewhere)
    pre_dump(bin_dir, host, trees(), tmp_path / "images")
    assert marker.is_dir(), "the fallback did not run site"
