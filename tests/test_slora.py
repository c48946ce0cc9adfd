"""SLoRA: the pure math on hand-made tensors, its options, and short runs across the stage boundary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import peft_logits
from test_resume import assert_same_run, run_interrupted
from test_simulation import view_logits

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterSpec, lora_keys
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate
from fedlora.strategies import create
from fedlora.strategies.fedavg import weighted_mean
from fedlora.strategies.slora import (
    SVD_ENERGY,
    SLoRA,
    densify,
    mask_digest,
    masks_for,
    sparse_mask,
    sparse_mean,
    stage_two,
    svd_start,
    values_key,
)

MOD = "base_model.model.enc.0.query"


@pytest.mark.unit
def test_svd_start_is_the_truncated_svd_with_the_values_split_evenly():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(7, 5, generator=g)
    rank, alpha = 2, 8.0
    a, b, energy = svd_start(delta, rank, alpha)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert a.shape == (rank, 5) and b.shape == (7, rank)
    assert torch.allclose((alpha / rank) * b @ a, best, atol=1e-5)
    # sqrt(S / scaling) on each side: B's columns and A's rows have the same norms.
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-5)
    assert torch.allclose(b.norm(dim=0) ** 2, s[:rank] / (alpha / rank), atol=1e-5)
    assert energy == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), abs=1e-5)


@pytest.mark.unit
def test_the_mask_is_the_same_on_every_client_at_the_asked_density():
    shapes = {MOD: (40, 30), MOD.replace("query", "value"): (40, 30)}
    server = masks_for(shapes, 0.05, seed=3)
    clients = [masks_for(dict(reversed(shapes.items())), 0.05, seed=3) for _ in range(3)]
    for masks in clients:  # drawn apart, in another order: the very same indices
        assert all(torch.equal(masks[m], server[m]) for m in shapes) and mask_digest(masks) == mask_digest(server)
    for index in server.values():
        assert index.numel() == 60 and torch.equal(index, index.unique())  # 5 % of 1200, sorted, distinct
        assert 0 <= int(index.min()) and int(index.max()) < 1200
    assert not torch.equal(*server.values())  # each module its own draw
    assert mask_digest(masks_for(shapes, 0.05, seed=4)) != mask_digest(server)
    assert torch.equal(sparse_mask(MOD, (4, 3), 1.0, seed=0), torch.arange(12))  # density 1: every entry
    assert sparse_mask(MOD, (4, 3), 1e-9, seed=0).numel() == 1


@pytest.mark.unit
def test_the_sparse_average_is_the_average_of_the_sparse_updates():
    index = sparse_mask(MOD, (6, 5), 0.3, seed=1)
    g = torch.Generator().manual_seed(2)
    values = [{MOD: torch.randn(index.numel(), generator=g)} for _ in range(3)]
    weights = [3, 1, 2]
    mean = sparse_mean(values, weights)
    dense = weighted_mean([{MOD: densify(v[MOD], index, (6, 5))} for v in values], weights)
    assert torch.equal(densify(mean[MOD], index, (6, 5)), dense[MOD])
    assert int((dense[MOD] != 0).sum()) <= index.numel()  # nothing outside the mask


@pytest.mark.unit
def test_the_boundary_turns_each_modules_values_into_its_svd_start():
    other = MOD.replace("query", "value")
    a_key, b_key = lora_keys(MOD)
    oa_key, ob_key = lora_keys(other)
    g = torch.Generator().manual_seed(5)
    init = {a_key: torch.randn(2, 5, generator=g), b_key: torch.zeros(6, 2)}
    init |= {oa_key: torch.randn(2, 5, generator=g), ob_key: torch.zeros(6, 2), "head.weight": torch.ones(2, 6)}
    masks = masks_for({MOD: (6, 5), other: (6, 5)}, 0.5, seed=0)
    state = dict(init) | {
        values_key(MOD): torch.randn(masks[MOD].numel(), generator=g),
        values_key(other): torch.zeros(masks[other].numel()),  # learnt nothing
    }
    out, energy = stage_two(state, rank=2, alpha=4.0, masks=masks)
    assert sorted(out) == sorted(state) and out["head.weight"] is init["head.weight"]
    assert all(float(out[values_key(m)].abs().max()) == 0 for m in masks)  # the sparse change is in B A now
    a, b, expected = svd_start(densify(state[values_key(MOD)], masks[MOD], (6, 5)), 2, 4.0)
    assert torch.equal(out[a_key], a) and torch.equal(out[b_key], b) and energy == pytest.approx(expected)
    assert torch.equal(out[oa_key], init[oa_key]) and torch.equal(out[ob_key], init[ob_key])  # peft's init kept


def strategy_for(sets: dict) -> SLoRA:
    cfg = RunConfig.from_dict({"strategy": {"name": "slora", **sets}, "lora": {"rank": 4, "alpha": 8}, "rounds": 3})
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("query",), task="classification")
    return create(cfg, spec)


@pytest.mark.unit
def test_stage_one_sends_about_density_of_the_dense_bytes():
    strategy = strategy_for({"density": 0.01})
    a_key, b_key = lora_keys(MOD)
    state = strategy.initialize({a_key: torch.randn(4, 384), b_key: torch.zeros(384, 4)})
    sent = strategy.payload(1, state)
    assert sorted(sent) == [values_key(MOD)]  # no LoRA factors, no mask indices
    assert sent[values_key(MOD)].numel() == round(0.01 * 384 * 384)
    strategy._global = state
    config = strategy.client_config(1, 1)
    assert config["slora-stage"] == 1 and config["slora-mask-digest"] == mask_digest(strategy.masks(state))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"density": 0}, r"^config key 'strategy\.density' must be in \(0, 1\], got 0"),
        ({"density": 1.5}, r"^config key 'strategy\.density' must be in \(0, 1\], got 1\.5"),
        ({"stage1_rounds": 0}, r"^config key 'strategy\.stage1_rounds' must be >= 1"),
        ({"mask_seed": "x"}, r"^config key 'strategy\.mask_seed' must be an integer"),
        ({"density": float("nan")}, r"^config key 'strategy\.density' must be a finite number"),
        ({"bogus": 1}, r"^unknown config key 'strategy\.bogus'"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_key(sets, message):
    with pytest.raises(ConfigError, match=message) as err:
        SLoRA.parse_options(sets)
    assert "\n" not in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": {"quantization": "4bit"}}, "model.quantization"),
        (
            {"federation": {"profiles": [{"name": "p", "quantization": "8bit"}]}},
            r"federation.profiles\[0\].quantization",
        ),
        ({"privacy": {"mode": "local", "target_epsilon": 8.0}}, "privacy.mode"),
    ],
)
def test_a_quantized_base_or_local_dp_is_refused_naming_the_key(raw, key):
    cfg = RunConfig.from_dict({"strategy": {"name": "slora"}, **raw})
    with pytest.raises(ConfigError, match=rf"^config key '{key}': strategy 'slora'") as err:
        SLoRA.check_setup(cfg, [])
    assert "\n" not in str(err.value)


def quiet() -> Progress:
    return Progress(quiet=True)


@pytest.mark.simulation
def test_a_run_across_the_boundary_exports_a_faithful_adapter_and_resumes_bit_exact(
    tmp_path, tiny_bert, make_config, monkeypatch
):
    """Round 1 sparse (10 % of query/value), round 2 FedIT from the SVD start; a run cut right
    after the last sparse round and resumed is the uninterrupted run, bit for bit."""
    cfg = make_config(tiny_bert, strategy="slora", sets=("strategy.stage1_rounds=1", "strategy.density=0.1"))
    whole = tmp_path / "whole"
    simulate(cfg, out=whole, progress=quiet())
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert SVD_ENERGY not in lines[0] and 0 < lines[1][SVD_ENERGY] <= 1  # the start, as round 2 begins
    assert all(r["clients_ok"] == r["clients_sampled"] > 0 for r in lines)
    # Stage 1 sends 10 % of each 32 x 32 weight (and the head); stage 2 rank-4 A and B (8 x 32 each).
    assert lines[0]["bytes_up"] < lines[1]["bytes_up"]
    input_ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    expected = view_logits(cfg, whole, input_ids)[""]
    assert torch.allclose(peft_logits(tiny_bert, "classification", whole / "adapter", input_ids), expected, atol=1e-5)
    cut = tmp_path / "cut"
    run_interrupted(cfg, cut, after=1, monkeypatch=monkeypatch)
    simulate(cfg, out=cut, resume=True, progress=quiet(), report=False)
    assert_same_run(whole, cut)


@pytest.mark.simulation
def test_a_run_that_ends_in_stage_one_exports_its_sparse_change(tmp_path, tiny_bert, make_config):
    cfg = make_config(tiny_bert, strategy="slora", sets=("rounds=1", "strategy.density=0.2"))
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=quiet(), report=False)
    input_ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    expected = view_logits(cfg, out, input_ids)[""]
    assert torch.allclose(peft_logits(tiny_bert, "classification", out / "adapter", input_ids), expected, atol=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {cfg.lora.rank + 32}  # the dense change as (D, I) factors
