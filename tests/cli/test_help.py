"""Every command's `--help` states the defaults the contract gives, and never "None"."""

from __future__ import annotations

import pytest

from watcher.cli import COMMANDS, main
from watcher.contract import CONFIG_ENV, DEFAULT_CONFIG, DEFAULT_SOCKET, SOCKET_ENV


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # The help is wrapped to the terminal's width; a narrow one must not cut a path the
    # assertions look for.
    monkeypatch.setenv("COLUMNS", "200")


def help_text(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    # argparse wraps at the terminal width; compare words, not line breaks.
    return " ".join(captured.out.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_help_says_none(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = help_text(capsys, command)
    assert "None" not in text


@pytest.mark.parametrize("command", ["serve", "scan"])
def test_host_view_defaults(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = help_text(capsys, command)
    assert f"--config FILE TOML config (default {DEFAULT_CONFIG}, if present)" in text
    assert "--root DIR where the host filesystem is visible (default /)" in text
    assert "(default /proc)" in text
    assert "(default /sys" in text
    assert "(default /proc/self/mountinfo)" in text


def test_serve_log_level_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "serve")
    assert "(default info" in text
    assert f"default ${SOCKET_ENV}, the config's socket, or {DEFAULT_SOCKET}" in text


@pytest.mark.parametrize("command", ["get", "path", "watch", "status", "restore-check"])
def test_client_socket_default(capsys: pytest.CaptureFixture[str], command: str) -> None:
    text = help_text(capsys, *([command, "/"] if command == "restore-check" else [command]))
    assert f"daemon socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})" in text


@pytest.mark.parametrize(
    ("command", "default"),
    [("scan", "json"), ("get", "json"), ("watch", "text"), ("restore-check", "text")],
)
def test_format_default(capsys: pytest.CaptureFixture[str], command: str, default: str) -> None:
    text = help_text(capsys, *(["restore-check", "/"] if command == "restore-check" else [command]))
    assert f"output format (default {default})" in text


def test_restore_check_config_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "restore-check", "/")
    assert f"(default ${CONFIG_ENV} or {DEFAULT_CONFIG}, if present)" in text


def test_paths_are_not_cut_at_hyphens(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # argparse's own wrapping cut /etc/gpu-device-watcher/config.toml after "gpu-device-".
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    out = capsys.readouterr().out
    assert f"{DEFAULT_CONFIG}," in out  # whole, on one line


@pytest.mark.parametrize("command", ["scan", "get", "restore-check"])
def test_an_unknown_option_points_to_the_commands_own_help(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    arguments = [command, *(["/"] if command == "restore-check" else []), "--bogus"]
    assert main(arguments) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (
        f"gpu-device-watcher: unrecognized arguments: --bogus "
        f"(see `gpu-device-watcher {command} --help`)"
    )
