"""Quantized bases train on every architecture: the output head stays in higher precision."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.model.loading import load_model, output_heads
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate

pytestmark = pytest.mark.unit


def test_output_heads_name_the_lm_head_and_fresh_classifiers(tiny_gpt2, tiny_bert):
    assert "lm_head" in output_heads(tiny_gpt2, "causal_lm", 0)  # tied to the input embedding in GPT-2
    heads = output_heads(tiny_bert, "classification", 4)
    assert {"classifier", "score"} <= set(heads)


@pytest.mark.simulation
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


@pytest.mark.simulation
def test_a_run_that_fails_before_its_first_round_leaves_no_files(tmp_path, tiny_bert, make_config, monkeypatch):
    import fedlora.server.rounds as rounds

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(rounds, "evaluate_state", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="exploded"):
        simulate(make_config(tiny_bert), out=out, progress=Progress(quiet=True))
    assert not out.exists()


@pytest.mark.simulation
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


# -- model.device and model.dtype -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "cuda", "mps", "expected"),
    [
        ("auto", 2, False, "cuda:0"),
        ("auto", 0, True, "mps"),
        ("auto", 0, False, "cpu"),
        ("cuda", 1, False, "cuda:0"),
        ("cuda:1", 2, False, "cuda:1"),
        ("cpu", 4, True, "cpu"),
    ],
)
def test_device_rule(requested, cuda, mps, expected):
    from fedlora.model.devices import resolve_device

    assert resolve_device(requested, cuda_count=cuda, mps=mps) == expected


@pytest.mark.parametrize(
    ("requested", "cuda", "mps", "message"),
    [
        ("cuda", 0, False, "sees no CUDA device"),
        ("cuda:2", 2, False, "there are 2 CUDA device"),
        ("mps", 0, False, "no MPS backend"),
        ("tpu", 0, False, "must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_impossible_devices_are_one_line_errors(requested, cuda, mps, message):
    from fedlora.errors import ConfigError
    from fedlora.model.devices import resolve_device

    with pytest.raises(ConfigError, match=message):
        resolve_device(requested, cuda_count=cuda, mps=mps)


def test_dtype_rule():
    from fedlora.errors import ConfigError
    from fedlora.model.devices import resolve_dtype

    assert resolve_dtype("auto", "cuda:0", bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cuda:0", bf16=False) == "float32"
    assert resolve_dtype("auto", "cpu", bf16=True) == "float32"
    assert resolve_dtype("float16", "cuda:0", bf16=False) == "float16"
    assert resolve_dtype("bfloat16", "cpu", bf16=False) == "bfloat16"  # CPU autocast has it
    with pytest.raises(ConfigError, match="model.dtype.*no bfloat16"):
        resolve_dtype("bfloat16", "cuda:0", bf16=False)


def test_config_checks_device_and_dtype(make_config, tiny_bert):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="model.device"):
        make_config(tiny_bert, sets=("model.device=gpu",))
    with pytest.raises(ConfigError, match="model.dtype"):
        make_config(tiny_bert, sets=("model.dtype=int8",))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_for_and_absent_stops_before_any_file(tmp_path, tiny_bert, make_config):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="model.device.*no CUDA"):
        simulate(make_config(tiny_bert, sets=("model.device=cuda",)), out=tmp_path / "r", progress=Progress(quiet=True))
    assert not (tmp_path / "r").exists()


@pytest.mark.simulation
def test_bfloat16_base_trains_float32_masters(tmp_path, tiny_bert, make_config):
    """A bfloat16 base on the CPU (autocast): frozen weights bfloat16, what trains float32."""
    from fedlora.model.adapters import get_host

    cfg = make_config(
        tiny_bert,
        sets=("rounds=1", "model.device=cpu", "model.dtype=bfloat16", "federation.gradient_checkpointing=true"),
    )
    result = simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True))
    assert result.rounds[0]["clients_ok"] == 3
    loaded = load_model(cfg.model, num_labels=4, seed=cfg.seed, gradient_checkpointing=True)
    assert loaded.compute_dtype == torch.bfloat16
    assert loaded.model.bert.encoder.layer[0].attention.self.key.weight.dtype == torch.bfloat16
    host = get_host(loaded)
    assert host.specs  # the run's own cached base and adapters
    for name in host.specs:
        assert all(p.dtype == torch.float32 for p in host.params(name).values())


@pytest.mark.simulation
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_cuda_training(tmp_path, tiny_gpt2, make_config, quantization):
    cfg = make_config(
        tiny_gpt2,
        task="causal_lm",
        sets=("rounds=1", "model.device=cuda", f"model.quantization={quantization}"),
    )
    result = simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True))
    assert result.rounds[0]["clients_ok"] == 3
    assert load_model(cfg.model, seed=cfg.seed).placement.device == "cuda:0"


@pytest.mark.simulation
def test_4bit_code_is_nf4_or_fp4_with_double_quantization(tmp_path, tiny_bert, make_config):
    """``model.quant_type`` picks the 4-bit code; both keep QLoRA's double quantization, and a
    tiny model trains on each."""
    pytest.importorskip("bitsandbytes")
    from fedlora.errors import ConfigError
    from fedlora.model.loading import quantization_config

    for code in ("nf4", "fp4"):
        cfg = make_config(tiny_bert, sets=("rounds=1", "model.quantization='4bit'", f"model.quant_type='{code}'"))
        q = quantization_config(cfg.model)
        assert q.bnb_4bit_quant_type == code and q.bnb_4bit_use_double_quant
    result = simulate(cfg, out=tmp_path / "fp4", progress=Progress(quiet=True))
    assert result.rounds[0]["clients_ok"] == 3
    with pytest.raises(ConfigError, match="model.quant_type' must be one of nf4, fp4"):
        make_config(tiny_bert, sets=("model.quant_type='int4'",))
