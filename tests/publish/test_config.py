"""The config keys of this feature: nfd_features_file and metrics_listen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from watcher.config import ConfigError, ListenAddressError, parse_listen, resolve_settings


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_defaults_are_off(tmp_path: Path) -> None:
    settings = resolve_settings({"config": str(config(tmp_path, ""))})
    assert settings.nfd_features_file is None
    assert settings.metrics_listen is None


def test_both_keys(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        'nfd_features_file = "/etc/kubernetes/node-feature-discovery/features.d/gdw"\n'
        'metrics_listen = "[::1]:9402"\n',
    )
    settings = resolve_settings({"config": str(path)})
    assert settings.nfd_features_file == "/etc/kubernetes/node-feature-discovery/features.d/gdw"
    assert settings.metrics_listen == ("::1", 9402)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:9402", ("127.0.0.1", 9402)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),  # noqa: S104 (a value under test, not a bind)
        ("localhost:65535", ("localhost", 65535)),
        ("node-7.example.com:9402", ("node-7.example.com", 9402)),
        ("[::]:9402", ("::", 9402)),
        ("[fe80::1]:80", ("fe80::1", 80)),
    ],
)
def test_listen_addresses(value: str, address: tuple[str, int]) -> None:
    assert parse_listen(value) == address


@pytest.mark.parametrize(
    "value",
    [
        "9402",
        ":9402",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "::1:9402",
        "[::1:9402",
        "[not-v6]:9402",
        "bad host:9402",
        "-host:9402",
        "host\n:9402",
    ],
)
def test_bad_listen_addresses(value: str) -> None:
    with pytest.raises(ListenAddressError):
        parse_listen(value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('metrics_listen = "localhost"\n', "metrics_listen"),
        ("metrics_listen = 9402\n", "metrics_listen"),
        ('nfd_features_file = "features.d/gdw"\n', "nfd_features_file"),
        ('nfd_features_file = "/etc/features.d/"\n', "nfd_features_file"),
        ('nfd_features_file = "/etc/features.d/.gdw"\n', "nfd_features_file"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        resolve_settings({"config": str(config(tmp_path, text))})


def test_a_bad_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = config(tmp_path, 'metrics_listen = "127.0.0.1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "scan", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpu-device-watcher: ")
    assert "metrics_listen" in lines[0]
    assert "HOST:PORT" in lines[0]
