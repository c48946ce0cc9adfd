"""DP-DyLoRA: the server's per-round rank, the slice aggregation, the client's rank mask on a live
peft model (also under Opacus), truncating a saved adapter, and end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.config import LoRAConfig, ModelConfig, RunConfig
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterSpec, get_host, is_lora_a, is_lora_b, lora_keys, lora_modules
from fedlora.model.loading import load_model
from fedlora.strategies import DPDyLoRA, create, dylora_aggregate, get_strategy_class, sample_round_rank
from fedlora.strategies.base import ClientUpdate
from fedlora.strategies.dpdylora import (
    DPDyLoRAClient,
    lora_b_modules,
    rank_mask,
    truncate_adapter,
    truncate_adapter_dir,
    truncated_spec,
)
from fedlora.wire import protocol as P

pytestmark = pytest.mark.unit

MODS = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
HEAD = "base_model.model.classifier.modules_to_save.weight"


def global_state(rank=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {HEAD: torch.randn(3, d, generator=g)}
    for mod in MODS:
        a, b = lora_keys(mod)
        state[a], state[b] = torch.randn(rank, d, generator=g), torch.randn(d, rank, generator=g)
    return state


def strategy_for(rank=6, alpha=12.0, min_rank=1, seed=0):
    cfg = RunConfig.from_dict(
        {"seed": seed, "lora": {"rank": rank, "alpha": alpha}, "strategy": {"name": "dpdylora", "min_rank": min_rank}}
    )
    spec = AdapterSpec(rank=rank, alpha=alpha, dropout=0.0, target_modules=("query", "value"), task="classification")
    return create(cfg, spec)


# -- the server half ---------------------------------------------------------------------------


def test_round_rank_is_a_pure_function_of_seed_and_round():
    for seed in (0, 1, 7):
        ranks = [sample_round_rank(seed, t, 2, 6) for t in range(1, 201)]
        assert ranks == [sample_round_rank(seed, t, 2, 6) for t in range(1, 201)]
        assert set(ranks) == {2, 3, 4, 5, 6}  # uniform over the whole range
    assert [sample_round_rank(0, t, 1, 8) for t in range(1, 30)] != [
        sample_round_rank(1, t, 1, 8) for t in range(1, 30)
    ]
    assert sample_round_rank(3, 5, 4, 4) == 4
    with pytest.raises(ValueError):
        sample_round_rank(0, 1, 0, 4)


def test_every_node_of_a_round_gets_the_same_rank_and_scaling():
    strategy = strategy_for(rank=6, alpha=12.0, min_rank=2)
    assert isinstance(strategy, DPDyLoRA)
    state = global_state()
    seen = set()
    for server_round in range(1, 13):
        configs = {n: strategy.base_client_config(n, server_round) for n in (11, 42)}
        payloads = {n: strategy.payload(n, state) for n in (11, 42)}
        b_t = strategy.round_rank(server_round)
        seen.add(b_t)
        assert 2 <= b_t <= 6 and b_t == sample_round_rank(0, server_round, 2, 6)
        assert strategy.round_metrics() == {"round_rank": b_t}
        for n in (11, 42):
            spec = strategy.node_spec(n)
            assert spec.rank == b_t == configs[n][P.RANK] == strategy.node_rank(n)
            assert spec.scaling == pytest.approx(strategy.spec.scaling)  # alpha_t / b_t == alpha / r
            assert configs[n][P.ALPHA] == pytest.approx(12.0 * b_t / 6)
            for key, value in payloads[n].items():
                if is_lora_a(key):
                    assert torch.equal(value, state[key][:b_t])
                elif is_lora_b(key):
                    assert torch.equal(value, state[key][:, :b_t])
                else:
                    assert torch.equal(value, state[key])
        assert payloads[11] is payloads[42]  # one truncation, one record for the whole round
        hooks = strategy.client_hooks({**configs[11], **strategy.client_config(11, server_round)})
        assert isinstance(hooks, DPDyLoRAClient)
    assert len(seen) > 1


def test_aggregation_updates_the_rounds_slice_only_and_stays_exact():
    rank, alpha, b_t = 6, 12.0, 3
    state = global_state(rank)
    updates = [truncate_adapter(global_state(rank, seed=s), b_t) for s in (1, 2, 3)]
    weights = [10, 30, 60]
    new = dylora_aggregate(state, updates, weights, b_t)
    w = torch.tensor(weights, dtype=torch.float64) / 100
    for key, value in new.items():
        mean = sum(wi * u[key].to(torch.float64) for wi, u in zip(w, updates)).to(torch.float32)
        if is_lora_a(key):
            assert torch.allclose(value[:b_t], mean, atol=1e-6)
            assert torch.equal(value[b_t:], state[key][b_t:])  # untouched above b_t
        elif is_lora_b(key):
            assert torch.allclose(value[:, :b_t], mean, atol=1e-6)
            assert torch.equal(value[:, b_t:], state[key][:, b_t:])
        else:
            assert torch.allclose(value, mean, atol=1e-6)  # the head is averaged whole
    # Exactness under the common scaling: the rank-b_t adapter (alpha_t = alpha * b_t / r)
    # computes exactly the leading part of the global update, and the rest is the old tail.
    alpha_t = alpha * b_t / rank
    sliced = truncate_adapter(new, b_t)
    for mod in lora_modules(new):
        a, b = lora_keys(mod)
        part = (alpha_t / b_t) * sliced[b] @ sliced[a]
        assert torch.allclose(part, (alpha / rank) * new[b][:, :b_t] @ new[a][:b_t], atol=1e-5)
        tail = (alpha / rank) * state[b][:, b_t:] @ state[a][b_t:]
        assert torch.allclose(part + tail, (alpha / rank) * new[b] @ new[a], atol=1e-5)
    # The strategy does the same with the round's own rank, and refuses a reply of another rank.
    strategy = strategy_for(rank, alpha)
    r1 = strategy.round_rank(1)
    replies = [
        ClientUpdate(node_id=i, state=truncate_adapter(global_state(rank, seed=i), r1), num_examples=5) for i in (1, 2)
    ]
    out = strategy.aggregate(1, dict(state), replies)
    assert torch.equal(out[lora_keys(MODS[0])[0]][r1:], state[lora_keys(MODS[0])[0]][r1:])
    with pytest.raises(ValueError, match="rank"):
        dylora_aggregate(state, [truncate_adapter(state, 2)], [1], 3)


def test_bad_min_rank_is_a_one_line_config_error():
    cls = get_strategy_class("dpdylora")
    zero = RunConfig.from_dict({"lora": {"rank": 4}, "strategy": {"name": "dpdylora", "min_rank": 0}})
    with pytest.raises(ConfigError, match="strategy.min_rank") as err:
        cls.check_setup(zero, [])
    assert "\n" not in str(err.value)
    big = RunConfig.from_dict({"lora": {"rank": 4}, "strategy": {"name": "dpdylora", "min_rank": 5}})
    with pytest.raises(ConfigError, match="strategy.min_rank") as err:
        cls.check_setup(big, [])
    assert "\n" not in str(err.value) and "lora.rank" in str(err.value)
    cls.check_setup(RunConfig.from_dict({"lora": {"rank": 4}, "strategy": {"name": "dpdylora", "min_rank": 4}}), [])


# -- the client half on a live peft model --------------------------------------------------------


@pytest.fixture
def host_setup(tiny_bert):
    """A tiny BERT with a rank-4 LoRA (random A and B, so every component matters)."""
    loaded = load_model(ModelConfig(name=tiny_bert, max_length=16), num_labels=4, seed=0)
    host = get_host(loaded)
    spec = AdapterSpec.from_config(LoRAConfig(rank=4, alpha=8, target_modules=["query", "value"]), "classification")
    g = torch.Generator().manual_seed(5)
    with host.lock:
        name = host.ensure(spec, seed=0)
        state = {k: torch.randn(s, generator=g) * 0.3 for k, s in host.shapes(name).items()}
        host.load_state(name, state)
    input_ids = torch.randint(5, 200, (3, 10), generator=g)
    return host, spec, state, input_ids


def logits_of(host, spec, state, input_ids):
    """Logits of the adapter ``spec`` holding ``state`` (made active)."""
    name = host.ensure(spec, seed=0)
    host.load_state(name, state)
    host.peft_model.eval()
    with torch.no_grad():
        return host.peft_model(input_ids=input_ids).logits.clone()


def test_rank_mask_computes_the_truncated_adapter(host_setup):
    host, spec, state, input_ids = host_setup
    with host.lock:
        truncated = {
            b: logits_of(host, truncated_spec(spec, b), truncate_adapter(state, b), input_ids) for b in (1, 2, 3)
        }
        full = logits_of(host, spec, state, input_ids)
        model = host.peft_model
        modules = lora_b_modules(model)
        assert len(modules) == 4 and all(m.in_features == 4 for m in modules)
        hooks = DPDyLoRAClient({P.SEED: 123})
        drawn = []
        with hooks.training(model, spec) as before_step:
            for step in range(12):
                b = before_step(step)
                drawn.append(b)
                with torch.no_grad():
                    got = model(input_ids=input_ids).logits
                assert torch.allclose(got, truncated[b] if b < 4 else full, atol=1e-5), b
        assert set(drawn) <= {1, 2, 3, 4} and len(set(drawn)) > 1
        with DPDyLoRAClient({P.SEED: 123}).training(model, spec) as again:  # seeded: same ranks
            assert [again(s) for s in range(12)] == drawn
        assert all(not m._forward_pre_hooks for m in modules)  # removed on exit
        with torch.no_grad():
            assert torch.allclose(model(input_ids=input_ids).logits, full, atol=1e-6)
        with pytest.raises(RuntimeError, match="boom"), hooks.training(model, spec) as before_step:
            before_step(0)
            raise RuntimeError("boom")
        assert all(not m._forward_pre_hooks for m in modules)  # removed on an exception too
        assert all(not torch.allclose(truncated[b], full, atol=1e-4) for b in truncated)  # the ranks matter


def test_masked_components_get_no_gradient_with_and_without_dp(host_setup):
    from fedlora.data import Encoded, collate
    from fedlora.train.dpsgd import DPSGD, DPSettings

    host, spec, state, input_ids = host_setup
    with host.lock:
        name = host.ensure(spec, seed=0)
        host.load_state(name, state)
        params = host.params(name)
        data = Encoded(input_ids=input_ids.tolist() * 3, labels=[0, 1, 2] * 3, task_ids=None)
        batch = collate(data, list(range(9)), 0, False)
        b = 2
        for p in params.values():
            p.requires_grad_(True)
        try:
            with rank_mask(host.peft_model) as cell:
                cell[0] = b
                host.peft_model.train()
                host.peft_model(**batch).loss.backward()
                for key, p in params.items():
                    if is_lora_a(key):
                        assert float(p.grad[b:].abs().max()) == 0 and float(p.grad[:b].abs().max()) > 0
                    elif is_lora_b(key):
                        assert float(p.grad[:, b:].abs().max()) == 0 and float(p.grad[:, :b].abs().max()) > 0
                    p.grad = None
                # Opacus records the masked input: per-example gradients of the tail are zero.
                opt = torch.optim.SGD(list(params.values()), lr=0.1)
                settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=9)
                with DPSGD(host.peft_model, list(params.values()), opt, settings, seed=0) as engine:
                    engine.module(**batch).loss.backward()
                    for key, p in params.items():
                        if is_lora_a(key):
                            assert float(p.grad_sample[:, b:].abs().max()) == 0
                            assert float(p.grad_sample[:, :b].abs().max()) > 0
                        elif is_lora_b(key):
                            assert float(p.grad_sample[:, :, b:].abs().max()) == 0
                            assert float(p.grad_sample[:, :, :b].abs().max()) > 0
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
        assert all(not m._forward_pre_hooks for m in lora_b_modules(host.peft_model))


# -- end to end ----------------------------------------------------------------------------------


def peft_logits(model_dir, adapter_dir, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    meta = json.loads((adapter_dir / "fedlora.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=meta["num_labels"])
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def run_rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.simulation
def test_run_exports_an_adapter_that_truncates_to_any_rank(tmp_path, tiny_bert, make_config):
    from fedlora.run.directory import RunDirectory
    from fedlora.run.progress import Progress
    from fedlora.server import prepare
    from fedlora.simulations.runtime import simulate

    cfg = make_config(tiny_bert, strategy="dpdylora", sets=("rounds=3",))
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=Progress(quiet=True))
    lines = run_rounds(out)
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert [r["round_rank"] for r in lines] == [sample_round_rank(cfg.seed, t, 1, 4) for t in (1, 2, 3)]
    for line in lines:
        assert line["clients_ok"] == line["clients_sampled"] > 0
        assert all(c["rank"] == line["round_rank"] for c in line["clients"])
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    _, state, _ = RunDirectory(out).load_checkpoint()
    prepared = prepare(cfg)
    host = prepared.host
    input_ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    with host.lock:
        full = logits_of(host, prepared.spec, state, input_ids)
        assert torch.allclose(peft_logits(tiny_bert, adapter, input_ids), full, atol=1e-5)
        for k in (1, 3):
            cut = truncate_adapter_dir(adapter, k, tmp_path / f"r{k}")
            config = json.loads((cut / "adapter_config.json").read_text())
            assert config["r"] == k and config["lora_alpha"] == pytest.approx(cfg.lora.alpha * k / cfg.lora.rank)
            assert json.loads((cut / "fedlora.json").read_text())["rank"] == k
            expected = logits_of(host, truncated_spec(prepared.spec, k), truncate_adapter(state, k), input_ids)
            assert torch.allclose(peft_logits(tiny_bert, cut, input_ids), expected, atol=1e-5)
    with pytest.raises(ValueError):
        truncate_adapter_dir(adapter, 5, tmp_path / "r5")

    # The command line: the default output folder, a one-line error for a rank too large.
    from fedlora.cli.main import main

    assert main(["truncate", str(adapter), "--rank", "2"]) == 0
    assert json.loads((out / "adapter-rank2" / "adapter_config.json").read_text())["r"] == 2
    assert main(["truncate", str(adapter), "--rank", "9", "--out", str(tmp_path / "r9")]) == 2
    assert not (tmp_path / "r9").exists()


@pytest.mark.simulation
def test_run_under_local_dp(tmp_path, tiny_bert, make_config):
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    cfg = make_config(tiny_bert, strategy="dpdylora", sets=("privacy.mode=local", "privacy.noise_multiplier=1.0"))
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=Progress(quiet=True))
    lines = run_rounds(out)
    assert [r["round_rank"] for r in lines] == [sample_round_rank(cfg.seed, t, 1, 4) for t in (1, 2)]
    assert all(r["clients_ok"] == r["clients_sampled"] > 0 for r in lines)
    input_ids = torch.randint(5, 200, (2, 8), generator=torch.Generator().manual_seed(1))
    logits = peft_logits(tiny_bert, out / "adapter", input_ids)
    assert torch.isfinite(logits).all()
