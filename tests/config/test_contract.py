"""The config file as the contract states it, through the real command line.

Every key is validated; a wrong type or value is one line on stderr starting
`gpu-device-watcher: `, naming the key and what to write instead, and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.cli import main

TIMEOUT = 30.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> str:
    config = write(tmp_path, text)
    code = main(["scan", "--config", str(config), "--proc", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    [line] = captured.err.splitlines()
    assert line.startswith("gpu-device-watcher: ")
    return line


@pytest.mark.parametrize("key", ["allowed_uids", "allowed_gids"])
@pytest.mark.parametrize("value", [-1, 4294967295, 99999999999])
def test_ids_out_of_range_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: int
) -> None:
    line = refused(tmp_path, capsys, f"{key} = [0, {value}]\n")
    assert f"key '{key}'" in line
    assert str(value) in line


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("log_level", '"debug", "info", "warning" or "error"'),
        ("restore_version_match", '"exact" or "major"'),
        ("dump_checks", '"warn" or "refuse"'),
    ],
)
def test_a_wrong_choice_names_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, choices: str
) -> None:
    line = refused(tmp_path, capsys, f'{key} = "loud"\n')
    assert f"key '{key}'" in line
    assert f"must be {choices}, got 'loud'" in line


def test_an_integer_socket_mode_says_to_quote_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(tmp_path, capsys, "socket_mode = 0o660\n")
    assert "key 'socket_mode'" in line
    assert '"0660"' in line


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("socket = 5", "socket"),
        ("driver_roots = '/'", "driver_roots"),
        ("debounce_ms = 1.5", "debounce_ms"),
        ("max_clients = '3'", "max_clients"),
        ("socket_group = []", "socket_group"),
        ("allowed_uids = ['root']", "allowed_uids[0]"),
        ("nfd_features_file = true", "nfd_features_file"),
        ("metrics_listen = 9402", "metrics_listen"),
    ],
)
def test_a_wrong_type_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    assert f"key '{key}'" in refused(tmp_path, capsys, text + "\n")


def test_valid_ids_are_taken(tmp_path: Path) -> None:
    from watcher.config import resolve_settings

    config = write(tmp_path, "allowed_uids = [0, 4294967294]\nallowed_gids = [100]\n")
    settings = resolve_settings({"config": str(config)})
    assert settings.allowed_uids == frozenset({0, 4294967294})
    assert settings.allowed_gids == frozenset({100})


def test_python_m_watcher_refuses_the_same_way(tmp_path: Path) -> None:
    config = write(tmp_path, "allowed_uids = [-1]\n")
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "scan", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: ") and "allowed_uids" in line


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("root", "not a directory"),
        ("proc", "not a directory"),
        ("sys", "not a directory"),
        ("mountinfo", "no such file"),
    ],
)
@pytest.mark.parametrize("command", ["scan", "serve"])
def test_a_host_view_key_naming_nothing_is_refused_like_its_option(
    tmp_path: Path, key: str, kind: str, command: str
) -> None:
    # `--proc /nonexistent` is exit 2; the same value from the config must not scan an empty
    # host instead (a map saying "driver not loaded" for a typo).
    missing = tmp_path / "nonexistent"
    config = write(tmp_path, f'{key} = "{missing}"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            command,
            "--config",
            str(config),
            *(["--socket", str(tmp_path / "s.sock")] if command == "serve" else []),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: config ")
    assert f"key '{key}': {missing}: {kind}" in line
    assert not (tmp_path / "s.sock").exists()


def test_host_view_keys_that_exist_are_taken(tmp_path: Path) -> None:
    from watcher.config import resolve_settings

    (tmp_path / "proc").mkdir()
    (tmp_path / "mountinfo").write_text("")
    config = write(
        tmp_path,
        f'root = "{tmp_path}"\nproc = "{tmp_path}/proc"\nmountinfo = "{tmp_path}/mountinfo"\n',
    )
    view = resolve_settings({"config": str(config)}).view
    assert (view.root, view.proc, view.mountinfo) == (
        os.path.realpath(tmp_path),
        f"{tmp_path}/proc",
        f"{tmp_path}/mountinfo",
    )


def test_a_socket_group_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    # Found at start, before anything is bound: exit 2 (systemd does not retry it), naming
    # the key, like every other wrong value in the file.
    config = write(tmp_path, 'socket_group = "no-such-group-here"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "watcher",
            "serve",
            "--config",
            str(config),
            "--socket",
            str(tmp_path / "run" / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("gpu-device-watcher: config ")
    assert "key 'socket_group': no such group 'no-such-group-here'" in line
    assert not (tmp_path / "run").exists()


def test_a_socket_group_by_name_or_number_is_taken(tmp_path: Path) -> None:
    from watcher.config import resolve_settings

    for value in ('"root"', "4242", '"4242"'):
        config = write(tmp_path, f"socket_group = {value}\n")
        assert resolve_settings({"config": str(config)}).socket_group is not None
