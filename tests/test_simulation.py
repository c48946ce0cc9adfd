"""End to end in one process: tiny random BERT and GPT-2, each backbone strategy, 3 clients,
2 rounds; the exported adapter reloads in peft and reproduces the federation's predictions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STRATEGY_RUNS as ALL_STRATEGY_RUNS
from conftest import federation_logits, peft_logits

from fedlora.config import load_config
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server import prepare
from fedlora.simulations.runtime import simulate

pytestmark = pytest.mark.simulation

ROUND_KEYS = {"round", "train_loss", "eval_loss", "bytes_down", "bytes_up", "seconds", "clients", "dropped"}


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_inprocess_run_and_export(tmp_path, tiny_bert, tiny_gpt2, make_config, task, strategy):
    model_dir = tiny_bert if task == "classification" else tiny_gpt2
    cfg = make_config(model_dir, task=task, strategy=strategy)
    out = tmp_path / "run"
    result = simulate(cfg, out=out, progress=Progress(quiet=True))

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for record in lines:
        assert ROUND_KEYS <= set(record)
        assert ("eval_accuracy" in record) == (task == "classification")
        assert ("eval_perplexity" in record) == (task == "causal_lm")
        assert len(record["clients"]) == 3 and record["dropped"] == []
        for client in record["clients"]:
            assert client["bytes_down"] > 0 and client["bytes_up"] > 0 and client["num_examples"] > 0
    assert load_config(out / "config.toml") == cfg
    assert (out / "checkpoints" / "round_0001.safetensors").exists()
    assert (out / "checkpoints" / "round_0002.safetensors").exists()
    assert result.rounds[-1]["round"] == 2

    tok_ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 22, 3, 0]])
    ours = federation_logits(cfg, out, tok_ids)
    theirs = peft_logits(model_dir, task, out / "adapter", tok_ids)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_ffa_sends_half_the_lora_bytes(tmp_path, tiny_gpt2, make_config):
    """Causal LM has no trained head, so the payload is LoRA factors alone: FFA sends B only.
    (Half exactly when A and B have equal size, i.e. a square target such as attn.c_proj.)
    bytes_up is the whole message Flower moves (metrics, framing): the difference is A's bytes
    plus A's entries in the packed index."""
    from fedlora.model.adapters import is_lora_a

    up = {}
    for strategy in ("fedavg", "ffa"):
        cfg = make_config(
            tiny_gpt2, task="causal_lm", strategy=strategy, sets=("rounds=1", "lora.target_modules=['attn.c_proj']")
        )
        result = simulate(cfg, out=tmp_path / strategy, progress=Progress(quiet=True))
        up[strategy] = result.rounds[0]["bytes_up"]
        assert result.rounds[0]["bytes_down"] > up[strategy]  # the message also carries the run's config
    _, state, _ = RunDirectory(tmp_path / "fedavg").load_checkpoint()
    a_bytes = sum(v.numel() * 4 for k, v in state.items() if is_lora_a(k)) * cfg.federation.clients
    assert a_bytes <= up["fedavg"] - up["ffa"] < 1.3 * a_bytes


def test_ffa_keeps_a_frozen(tmp_path, tiny_bert, make_config):
    from fedlora.model.adapters import is_lora_b, seeded_lora_a

    cfg = make_config(tiny_bert, strategy="ffa")
    simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True))
    _, state, _ = RunDirectory(tmp_path / "r").load_checkpoint()
    expected = seeded_lora_a({k: tuple(v.shape) for k, v in state.items()}, cfg.seed)
    assert expected and all(torch.equal(state[k], v) for k, v in expected.items())
    assert all(v.abs().sum() > 0 for k, v in state.items() if is_lora_b(k))  # B trained away from zero


def test_same_seed_same_adapter(tmp_path, tiny_bert, make_config):
    cfg = make_config(tiny_bert, sets=("rounds=1",))
    simulate(cfg, out=tmp_path / "a", progress=Progress(quiet=True))
    simulate(cfg, out=tmp_path / "b", progress=Progress(quiet=True))
    _, a, _ = RunDirectory(tmp_path / "a").load_checkpoint()
    _, b, _ = RunDirectory(tmp_path / "b").load_checkpoint()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_bert, make_config):
    out = tmp_path / "run"
    simulate(make_config(tiny_bert, sets=("rounds=1",)), out=out, progress=Progress(quiet=True))
    result = simulate(make_config(tiny_bert, sets=("rounds=3",)), out=out, resume=True, progress=Progress(quiet=True))
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3] and [r["round"] for r in result.rounds] == [1, 2, 3]


def test_partial_participation_samples_a_fraction(tmp_path, tiny_bert, make_config):
    cfg = make_config(tiny_bert, sets=("federation.clients=4", "federation.fraction=0.5"))
    result = simulate(cfg, out=tmp_path / "r", progress=Progress(quiet=True))
    assert [r["clients_sampled"] for r in result.rounds] == [2, 2]


def test_a_failing_client_is_dropped_not_fatal(tmp_path, tiny_bert, make_config, monkeypatch):
    import fedlora.client.client_app as client_module

    real = client_module.handle_train
    calls = {"n": 0}

    def flaky(msg, context):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(msg, context)

    monkeypatch.setattr(client_module, "handle_train", flaky)
    result = simulate(make_config(tiny_bert, sets=("rounds=1",)), out=tmp_path / "r", progress=Progress(quiet=True))
    record = result.rounds[0]
    assert record["clients_ok"] == 2 and len(record["dropped"]) == 1
    assert "device lost" in record["dropped"][0]["reason"]


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_trains_and_exports(tmp_path, tiny_bert, make_config, quantization):
    """QLoRA through transformers' BitsAndBytesConfig; the fresh head stays unquantized."""
    pytest.importorskip("bitsandbytes")
    cfg = make_config(tiny_bert, sets=("rounds=1", f"model.quantization='{quantization}'"))
    result = simulate(cfg, out=tmp_path / "q", progress=Progress(quiet=True))
    assert result.rounds[0]["clients_ok"] == 3
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").exists()
    kinds = {type(m).__name__ for m in prepare(cfg).loaded.model.modules()}
    assert kinds & {"Linear4bit", "Linear8bitLt"}, kinds


def view_logits(cfg, run_dir, input_ids):
    """{view name: logits} of the final global model(s), as the server evaluates them."""
    from fedlora.server.server_app import _dense_deltas
    from fedlora.strategies import create

    _, state, extra = RunDirectory(run_dir).load_checkpoint()
    prepared = prepare(cfg)
    strategy = create(cfg, prepared.spec)
    strategy.tasks = list(prepared.data.tasks)
    strategy.load_state_dict(extra.get("strategy", {}))
    host = prepared.host
    out = {}
    for view in strategy.views(state):
        dense, token = _dense_deltas(view)
        with host.lock:
            name = host.ensure(view.spec, seed=cfg.seed)
            host.set_base_delta(dense, token)
            zeros = {k: torch.zeros(v) for k, v in host.shapes(name).items() if k not in view.state and ".lora_B." in k}
            host.load_state(name, {**view.state, **zeros})
            host.peft_model.eval()
            with torch.no_grad():
                out[view.name] = host.peft_model(input_ids=input_ids).logits.clone()
            host.set_base_delta({}, "")
    return out


# The strategies whose export differs from a plain adapter (fedavg/ffa are covered above).
STRATEGY_RUNS = {
    k: v for k, v in ALL_STRATEGY_RUNS.items() if k in ("federa", "fedsa", "hetlora", "flora", "fedex", "fltac")
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_RUNS))
def test_every_strategy_runs_and_exports_a_faithful_adapter(tmp_path, tiny_bert, make_config, strategy):
    cfg = make_config(tiny_bert, strategy=strategy, sets=STRATEGY_RUNS[strategy])
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=Progress(quiet=True))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["clients_ok"] == r["clients_sampled"] > 0 for r in lines)

    input_ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    expected = view_logits(cfg, out, input_ids)
    for name, logits in expected.items():
        adapter_dir = out / "adapter" / name if name else out / "adapter"
        assert torch.allclose(peft_logits(tiny_bert, "classification", adapter_dir, input_ids), logits, atol=1e-5)

    if strategy in ("hetlora", "flora", "fedex"):
        ranks = [c.get("rank_trained", c["rank"]) for c in lines[0]["clients"]]
        assert sorted(ranks) == [1, 2, 4]
        by_rank = {c.get("rank_trained", c["rank"]): c["bytes_up"] for c in lines[0]["clients"]}
        assert by_rank[1] < by_rank[2] < by_rank[4]  # bytes follow the rank
    if strategy == "hetlora":
        assert all("aggregation_weight" in c and "rank_next" in c for c in lines[0]["clients"])
        assert sum(c["aggregation_weight"] for c in lines[0]["clients"]) == pytest.approx(1.0, abs=1e-4)
        # A high threshold makes clients prune; the server then sends them the smaller rank.
        assert any(c["rank_next"] < c["rank_trained"] for c in lines[0]["clients"])
        pruned = {c["node_id"]: c["rank_next"] for c in lines[0]["clients"]}
        assert all(c["rank_trained"] == pruned[c["node_id"]] for c in lines[1]["clients"])
    if strategy == "fltac":
        assert sorted(expected) == ["sentiment", "topics"]
        assert all(0 < r["cluster_purity"] <= 1 for r in lines)
        assert {"eval_accuracy/topics", "eval_accuracy/sentiment"} <= set(lines[-1])
    if strategy == "fedsa":
        from safetensors.torch import load_file

        shared = load_file(out / "adapter" / "adapter_model.safetensors")
        personal = [load_file(out / "clients" / str(i) / "adapter" / "adapter_model.safetensors") for i in range(3)]
        b_keys = [k for k in shared if ".lora_B." in k]
        for tensors in personal:  # the shared A, each client's own B
            assert all(torch.equal(tensors[k], shared[k]) for k in shared if ".lora_A." in k)
        assert any(float(personal[0][k].abs().max()) > 0 for k in b_keys)
        assert any(not torch.equal(personal[0][k], personal[1][k]) for k in b_keys)
        assert all(float(shared[k].abs().max()) == 0 for k in b_keys)  # the server never saw a B
        peft_logits(tiny_bert, "classification", out / "clients" / "0" / "adapter", input_ids)
        assert {"eval_accuracy", "global_eval_accuracy"} <= set(lines[-1])
        assert all("eval_accuracy" in c for c in lines[-1]["clients"])
    if strategy == "federa":
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert set(config["rank_pattern"].values()) == {2 * cfg.lora.rank}  # the residual folded in


@pytest.mark.unit
def test_federa_round_zero_computes_what_the_pretrained_model_computes(tiny_bert, make_config):
    from fedlora.server.server_app import _dense_deltas
    from fedlora.strategies import create

    cfg = make_config(tiny_bert, strategy="federa")
    prepared = prepare(cfg)
    host = prepared.host
    strategy = create(cfg, prepared.spec)
    input_ids = torch.randint(5, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        plain = host.initial_state(name, cfg.seed)  # peft's init: B = 0, so the pretrained model
        view = strategy.views(strategy.initialize(plain, host))[0]
        assert all(float(v.abs().max()) > 0 for k, v in view.state.items() if ".lora_B." in k)
        host.peft_model.eval()
        host.set_base_delta({}, "")
        host.load_state(name, plain)
        with torch.no_grad():
            pretrained = host.peft_model(input_ids=input_ids).logits.clone()
        dense, token = _dense_deltas(view)
        host.set_base_delta(dense, token)
        host.load_state(name, view.state)
        with torch.no_grad():
            federa = host.peft_model(input_ids=input_ids).logits.clone()
        host.set_base_delta({}, "")
    assert torch.allclose(federa, pretrained, atol=1e-5)


@pytest.mark.parametrize("strategy", ["federa", "fedex"])
def test_base_changing_strategies_on_conv1d_targets(tmp_path, tiny_gpt2, make_config, strategy):
    """GPT-2 stores its attention weights transposed (Conv1D): the SVD and the folded residual
    must still reproduce the federation in peft."""
    cfg = make_config(tiny_gpt2, task="causal_lm", strategy=strategy)
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=Progress(quiet=True))
    input_ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    expected = view_logits(cfg, out, input_ids)[""]
    assert torch.allclose(peft_logits(tiny_gpt2, "causal_lm", out / "adapter", input_ids), expected, atol=1e-5)
