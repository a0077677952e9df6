"""`restore-check --config F`: the file named is validated as every config is (exit 2).

The CRIU action itself cannot stop on a bad config (it says so in CRIU's log and keeps the
defaults); `restore-check` is a command a person or an orchestrator runs, and a config it is
told to use that is wrong is a usage error, named by key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.contract import CONFIG_ENV

TIMEOUT = 30.0


def restore_check(
    images: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watcher", "restore-check", str(images), *options],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )


def config(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    ("text", "mode", "says"),
    [
        ('restore_version_match = "minor"\n', 0o644, "key 'restore_version_match'"),
        ("restore_version_match = 5\n", 0o644, "key 'restore_version_match'"),
        ("bogus = 1\n", 0o644, "unknown key 'bogus'"),
        ("not toml [\n", 0o644, "is not valid TOML"),
        ('restore_version_match = "major"\n', 0o666, "writable by others"),
    ],
)
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_bad_config_is_a_usage_error(
    tmp_path: Path, text: str, mode: int, says: str, how: str
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    path = config(tmp_path, text, mode)
    if how == "option":
        done = restore_check(images, "--config", str(path))
    else:
        done = restore_check(images, env=dict(os.environ, **{CONFIG_ENV: str(path)}))
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: ") and says in line


def test_a_good_config_is_used(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "inventory.img").write_bytes(b"")  # CRIU's images, taken without the action
    path = config(tmp_path, 'restore_version_match = "major"\n')
    done = restore_check(images, "--config", str(path), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fits"] is True
