"""Inputs a fuzzer found: each is one line on stderr and exit status 2, before any work."""

from __future__ import annotations

import time

import pytest

from fedlora.cli.main import main

pytestmark = pytest.mark.unit


def _preset(path, model_dir, extra=""):
    path.write_text(
        f'name = "fz"\nrounds = 1\nseed = 0\n{extra}\n[model]\nname = "{model_dir}"\nmax_length = 16\n\n'
        '[lora]\nrank = 2\ntarget_modules = ["query", "value"]\n\n'
        '[data]\npath = "synthetic:topics"\nmax_train_examples = 60\nmax_eval_examples = 20\n\n'
        "[federation]\nclients = 3\nlocal_steps = 1\nbatch_size = 4\n"
    )
    return path


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["seed=-1"], "config key 'seed' must be in [0, 4294967295]"),
        (["seed=9223372036854775807"], "config key 'seed' must be in [0, 4294967295]"),
        (["lora.target_modules=["], "--set lora.target_modules: '[' is not a valid TOML value"),
        (["federation.lr=inf"], "config key 'federation.lr' must be a finite number, got inf"),
        (["federation.lr=nan"], "config key 'federation.lr' must be a finite number"),
        (["data.max_train_examples=1000000000000"], "config key 'data.max_train_examples' must be <= 10,000,000"),
        (["name=1979-05-27T07:32:00Z"], "config key 'name' must not be a TOML date or time"),
        (["model.name=/no/such/model"], "model.name: no such directory: /no/such/model"),
    ],
)
def test_fuzzed_values_are_one_line_errors(tmp_path, monkeypatch, capsys, tiny_bert, sets, needle):
    monkeypatch.chdir(tmp_path)
    preset = _preset(tmp_path / "p.toml", tiny_bert)
    argv = ["simulate", str(preset), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_date_in_a_preset_and_an_empty_preset(tmp_path, capsys, tiny_bert):
    dated = _preset(tmp_path / "d.toml", tiny_bert, extra="when = 1979-05-27\n")
    assert main(["simulate", str(dated), "--out", str(tmp_path / "r1")]) == 2
    assert "config key 'when' must not be a TOML date or time" in capsys.readouterr().err
    empty = tmp_path / "e.toml"
    empty.write_text("# nothing here\n")
    assert main(["simulate", str(empty), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the preset is empty" in err, err


def test_an_unreachable_hub_fails_fast_not_after_a_minute_of_retries(tmp_path, monkeypatch, capsys, tiny_bert):
    import fedlora.model.hub as hub

    monkeypatch.setattr(hub, "_decided", None)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    preset = _preset(tmp_path / "p.toml", tiny_bert)
    started = time.monotonic()
    argv = ["simulate", str(preset), "--out", str(tmp_path / "r"), "--set", "model.name=someorg/not-cached-model"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.name: cannot load 'someorg/not-cached-model'" in err, err
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("one.csv", "text,label\nhello,a\n", "1 example(s); a run needs at least 2"),
        ("gap.csv", "text,label\nhello,a\n,b\nworld,a\nfoo,b\n", "row 2 has no 'text' (config key 'data.text_column')"),
        ("num.csv", "text,label\n1,a\n2,b\n3,a\n4,b\n", "row 1: 'text' is 1, not text"),
        ("nolabel.csv", "text,label\nhello,a\nworld,\nfoo,b\nbar,a\n", "row 2 has no 'label' (config key"),
        ("nested.jsonl", '{"text": ["a"], "label": "x"}\n{"text": "c", "label": "y"}\n', "cannot read its columns"),
    ],
)
def test_malformed_data_files_are_one_line_errors(tmp_path, capsys, tiny_bert, name, content, needle):
    data = tmp_path / name
    data.write_text(content)
    preset = _preset(tmp_path / "p.toml", tiny_bert)
    argv = ["simulate", str(preset), "--out", str(tmp_path / "r"), "--set", f"data.path={data}"]
    argv += ["--set", "federation.clients=1", "--set", "data.partitioner=iid"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.simulation
@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        ("federation.round_timeout=1e-9", "no reply before the round timeout"),
        ("federation.max_reply_mb=1e-9", "exceeds the limit"),
    ],
)
def test_a_run_that_trains_nothing_exits_1_with_the_reason(tmp_path, capsys, tiny_bert, sets, needle):
    preset = _preset(tmp_path / "p.toml", tiny_bert)
    assert main(["simulate", str(preset), "--out", str(tmp_path / "r"), "--set", sets]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "no client's reply was usable in any of the 1 round(s): nothing was trained" in err[-1], err
    assert needle in err[-1], err
