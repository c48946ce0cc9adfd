"""``--debug`` / FEDLORA_DEBUG=1: the one-line error, then the traceback it normally hides."""

from __future__ import annotations

import pytest

from fedlora.cli.deploy import _client_parser, client_main, server_main
from fedlora.cli.main import build_parser, main

pytestmark = pytest.mark.unit

MISSING = "/nonexistent/fedlora-preset.toml"


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDLORA_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def _error(capsys, prog, needle):
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith(f"{prog}: error: ") and needle in first, err
    return err


def test_without_debug_one_line_no_traceback(capsys):
    assert main(["simulate", MISSING]) == 2
    err = _error(capsys, "fedlora", "preset not found")
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "simulate", MISSING],
        ["simulate", "--debug", MISSING],
        ["simulate", MISSING, "--debug"],
        ["--debug", "simulate", "--debug", MISSING],
    ],
)
def test_debug_flag_before_or_after_the_subcommand(capsys, argv):
    assert main(argv) == 2
    err = _error(capsys, "fedlora", "preset not found")
    assert "Traceback (most recent call last)" in err
    assert "ConfigError: preset not found" in err.splitlines()[-1]


@pytest.mark.parametrize("value", ["1", "true"])
def test_debug_environment_variable(capsys, monkeypatch, value):
    monkeypatch.setenv("FEDLORA_DEBUG", value)
    assert main(["simulate", MISSING]) == 2
    err = _error(capsys, "fedlora", "preset not found")
    assert "Traceback" in err


@pytest.mark.parametrize("value", ["0", ""])
def test_debug_environment_variable_off(capsys, monkeypatch, value):
    monkeypatch.setenv("FEDLORA_DEBUG", value)
    assert main(["simulate", MISSING]) == 2
    assert "Traceback" not in _error(capsys, "fedlora", "preset not found")


def test_other_subcommands_accept_debug(capsys, tmp_path):
    assert main(["report", str(tmp_path / "no-run"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "certs", "--out", str(tmp_path / "c"), "--server-host", "http://x:1"]) == 2
    err = _error(capsys, "fedlora", "--server-host")
    assert "Traceback" in err
    parser = build_parser()
    assert parser.parse_args(["presets"]).debug is False
    assert parser.parse_args(["presets", "--debug"]).debug is True
    assert parser.parse_args(["--debug", "presets"]).debug is True
    assert parser.parse_args(["--debug", "partition", "--out", "x"]).debug is True


def test_debug_is_in_the_help(capsys):
    for argv in (["--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--debug" in capsys.readouterr().out
    assert "FEDLORA_DEBUG" in _client_parser().format_help()


def test_server_debug(capsys):
    assert server_main([MISSING]) == 2
    assert "Traceback" not in _error(capsys, "fedlora-server", "preset not found")
    assert server_main([MISSING, "--debug"]) == 2
    assert "Traceback" in _error(capsys, "fedlora-server", "preset not found")


def test_client_debug(capsys, tmp_path):
    argv = ["--server", "127.0.0.1:9092", "--data", str(tmp_path / "local.csv")]  # no --ca, no --insecure
    assert client_main(argv) == 2
    err = _error(capsys, "fedlora-client", "--ca")
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert client_main(argv + ["--debug"]) == 2
    assert "Traceback" in _error(capsys, "fedlora-client", "--ca")


def test_unexpected_errors_still_propagate(monkeypatch):
    import fedlora.cli.main as cli

    def boom(args):
        raise RuntimeError("bug")

    monkeypatch.setattr(cli, "cmd_presets", boom)
    with pytest.raises(RuntimeError, match="bug"):
        main(["presets", "--debug"])
