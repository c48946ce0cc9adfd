"""The command line: user mistakes give one line on stderr, exit status 2, and write nothing."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from fedlora.cli.main import main

pytestmark = pytest.mark.unit


def _write_preset(path, model_dir, **sections):
    lines = [
        'name = "cli"',
        "rounds = 1",
        "seed = 0",
        "",
        "[model]",
        f'name = "{model_dir}"',
        "max_length = 16",
        "",
        "[lora]",
        "rank = 2",
        'target_modules = ["query", "value"]',
        "",
        "[data]",
        'path = "synthetic:topics"',
        "max_train_examples = 60",
        "max_eval_examples = 20",
        "",
        "[federation]",
        "clients = 3",
        "local_steps = 1",
        "batch_size = 4",
    ]
    text = "\n".join(lines) + "\n"
    for key, value in sections.items():
        text += f"{key} = {value}\n"
    path.write_text(text)
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_exit_2_and_write_nothing(in_tmp, capsys, tiny_bert):
    preset = _write_preset(in_tmp / "p.toml", tiny_bert)
    csv = in_tmp / "d.csv"
    pd.DataFrame({"text": ["good", "bad"] * 10, "label": [1, 0] * 10}).to_csv(csv, index=False)
    cases = [
        (["--set", "lora.rnk=3"], "lora.rnk"),
        (["--set", "lora.rank=0"], "lora.rank"),
        (["--set", "federation.clients=two"], "federation.clients"),
        (["--set", "lora.target_modules=['attention_q']"], "attention_q"),
        (["--set", "data.path=missing.csv"], "missing.csv"),
        (["--set", f"data.path={csv}", "--set", "data.label_column=sentiment"], "sentiment"),
        (["--set", f"data.path={csv}", "--set", "federation.clients=50"], "federation.clients"),
        (["--set", "strategy.name=nope"], "fedavg"),
        (["--set", "novalue"], "key=value"),
        # Strategy-specific mistakes, all before any training.
        (["--set", "strategy.name=nope"], "hetlora"),  # the known names are listed
        (["--set", "strategy.name=hetlora", "--set", "federation.profiles=[{rank=4}]"], "federation.profiles[0].rank"),
        (["--set", "strategy.name=fltac"], "data.task_column"),
        (["--set", "strategy.name=federa", "--set", "model.quantization='4bit'"], "model.quantization"),
        (["--set", "strategy.name=fedavg", "--set", "federation.profiles=[{rank=1},{rank=2}]"], "hetlora"),
        (["--set", "strategy.name=hetlora", "--set", "strategy.prune_gamma=2"], "strategy.prune_gamma"),
        (["--set", "strategy.name=ffa", "--set", "strategy.clusters=2"], "strategy.clusters"),
    ]
    for extra, needle in cases:
        _fails(capsys, ["simulate", str(preset), *extra], needle)
    _fails(capsys, ["simulate", "no-such-preset.toml"], "no-such-preset.toml")
    assert not (in_tmp / "runs").exists()


def test_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--rounds", "3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.simulation
def test_existing_run_dir_is_not_overwritten(in_tmp, capsys, tiny_bert):
    preset = _write_preset(in_tmp / "p.toml", tiny_bert)
    assert main(["simulate", str(preset), "--quiet", "--out", "out"]) == 0
    assert "eval_accuracy per round" in capsys.readouterr().out
    before = (in_tmp / "out" / "metrics.jsonl").read_text()
    _fails(capsys, ["simulate", str(preset), "--out", "out"], "already exists")
    assert (in_tmp / "out" / "metrics.jsonl").read_text() == before


@pytest.mark.simulation
def test_console_script_runs_and_reports(in_tmp, tiny_bert):
    preset = _write_preset(in_tmp / "p.toml", tiny_bert)
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", str(preset), "--set", "rounds=2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=in_tmp,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1/2  client 1/3" in proc.stdout
    assert "round 2:" in proc.stdout and "runs/cli" in proc.stdout
    assert (in_tmp / "runs" / "cli" / "adapter" / "adapter_config.json").exists()
