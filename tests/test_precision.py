"""Quantized bases train on every architecture: the output head stays in higher precision."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.models import load_model, output_heads
from fedlora.runlog import Progress
from fedlora.simulations.runtime import simulate


def test_output_heads_name_the_lm_head_and_fresh_classifiers(tiny_gpt2, tiny_bert):
    assert "lm_head" in output_heads(tiny_gpt2, "causal_lm", 0)  # tied to the input embedding in GPT-2
    heads = output_heads(tiny_bert, "classification", 4)
    assert {"classifier", "score"} <= set(heads)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_causal_lm_trains_and_exports(tmp_path, tiny_gpt2, make_config, quantization):
    """A tiny GPT-2 (tied lm_head) on a 4-bit or 8-bit base: it used to fail inside bitsandbytes
    (AssertionError / no attribute 'CB') because the head was quantized."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_config(tiny_gpt2, task="causal_lm", sets=("rounds=2", f"model.quantization={quantization}"))
    result = simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True))
    perplexities = [r["eval_perplexity"] for r in result.rounds]
    assert all(p == p and p < float("inf") for p in perplexities)
    head = load_model(cfg.model, seed=cfg.seed).model.get_output_embeddings()  # the run's cached base
    assert type(head.weight) is torch.nn.Parameter  # not bitsandbytes' Params4bit / Int8Params
    # The exported adapter loads on the full-precision base.
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
    assert torch.isfinite(logits).all()


def test_a_run_that_fails_before_its_first_round_leaves_no_files(tmp_path, tiny_bert, make_config, monkeypatch):
    import fedlora.server.rounds as rounds

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(rounds, "evaluate_state", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="exploded"):
        simulate(make_config(tiny_bert), out=out, progress=Progress(quiet=True))
    assert not out.exists()


def test_a_run_that_fails_later_keeps_its_finished_rounds(tmp_path, tiny_bert, make_config, monkeypatch):
    import fedlora.server.rounds as rounds

    real = rounds.RoundLoop.checkpoint
    calls = {"n": 0}

    def checkpoint(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rounds.RoundLoop, "checkpoint", checkpoint)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        simulate(make_config(tiny_bert), out=out, progress=Progress(quiet=True))
    assert (out / "checkpoints").is_dir() and json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
