"""Server optimizers, FedProx and the learning-rate schedule (issue 16, item 3).

The optimizer steps are checked against values worked out by hand below (not by the module's
own code); the checkpoint test stops a 4-round simulation after round 2 and resumes it, which
must end bit for bit where an uninterrupted run ends: the moments travel in
``round_NNNN.server.safetensors``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.client.client_app import proximal_penalty, with_proximal
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterSpec
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server.rounds import RoundLoop
from fedlora.simulations.runtime import simulate
from fedlora.strategies import create, get_strategy_class
from fedlora.strategies.server_opt import DEFAULT_SERVER_LR, ServerOptimizer
from fedlora.train.local import round_lr
from fedlora.wire import protocol as P

pytestmark = pytest.mark.unit

KEY = "m.lora_A.weight"


def quiet() -> Progress:
    return Progress(quiet=True)


def run_steps(opt: ServerOptimizer, deltas: list[float]) -> list[torch.Tensor]:
    """Step ``opt`` from x = [0, 0] with aggregates x + [d, -d] for each d; the x after each step."""
    x = torch.zeros(1, 2)
    xs = []
    for d in deltas:
        x = opt.step({KEY: x}, {KEY: x + torch.tensor([[d, -d]])})[KEY]
        xs.append(x)
    return xs


def assert_close(t: torch.Tensor, value: float) -> None:
    """``t`` is ``[[value, -value]]`` to float32 precision."""
    torch.testing.assert_close(t, torch.tensor([[value, -value]]), rtol=1e-6, atol=1e-7)


# -- the optimizers against hand-worked steps ---------------------------------------------------
# Pseudo-gradients 2, 2, 1 (and their negatives in the second coordinate); beta1 = beta2 = 0.5,
# tau = 1 (so v starts at tau^2 = 1), lr = 1. First moments for adam, yogi, adagrad alike:
# m1 = 0.5*0 + 0.5*2 = 1, m2 = 0.5*1 + 0.5*2 = 1.5, m3 = 0.5*1.5 + 0.5*1 = 1.25.
HAND = {"beta1": 0.5, "beta2": 0.5, "tau": 1.0}


def test_avgm_matches_hand_steps():
    # m1 = 2, x1 = 2; m2 = 0.5*2 + 2 = 3, x2 = 5; m3 = 0.5*3 + 1 = 2.5, x3 = 7.5
    opt = ServerOptimizer("avgm", 1.0, momentum=0.5)
    xs = run_steps(opt, [2.0, 2.0, 1.0])
    for x, want in zip(xs, [2.0, 5.0, 7.5]):
        assert_close(x, want)
    assert_close(opt.m[KEY], 2.5)
    # lr scales the step: lr 0.1, momentum 0 is x + 0.1 * delta
    assert_close(run_steps(ServerOptimizer("avgm", 0.1, momentum=0.0), [2.0])[0], 0.2)


def test_adam_matches_hand_steps():
    # v1 = 0.5*1 + 0.5*4 = 2.5, v2 = 0.5*2.5 + 0.5*4 = 3.25, v3 = 0.5*3.25 + 0.5*1 = 2.125
    opt = ServerOptimizer("adam", 1.0, **HAND)
    xs = run_steps(opt, [2.0, 2.0, 1.0])
    x1 = 1 / (math.sqrt(2.5) + 1)
    x2 = x1 + 1.5 / (math.sqrt(3.25) + 1)
    x3 = x2 + 1.25 / (math.sqrt(2.125) + 1)
    for x, want in zip(xs, [x1, x2, x3]):
        assert_close(x, want)
    torch.testing.assert_close(opt.m[KEY], torch.tensor([[1.25, -1.25]]))
    torch.testing.assert_close(opt.v[KEY], torch.tensor([[2.125, 2.125]]))
    assert opt.steps == 3


def test_yogi_matches_hand_steps_on_both_signs():
    # delta^2 = 4: v0 = 1 < 4, so v1 = 1 + 0.5*4 = 3; v1 = 3 < 4, so v2 = 3 + 2 = 5;
    # delta^2 = 1: v2 = 5 > 1, so v3 = 5 - 0.5*1 = 4.5 (Yogi's additive, sign-driven update)
    opt = ServerOptimizer("yogi", 1.0, **HAND)
    xs = run_steps(opt, [2.0, 2.0, 1.0])
    x1 = 1 / (math.sqrt(3) + 1)
    x2 = x1 + 1.5 / (math.sqrt(5) + 1)
    x3 = x2 + 1.25 / (math.sqrt(4.5) + 1)
    for x, want in zip(xs, [x1, x2, x3]):
        assert_close(x, want)
    torch.testing.assert_close(opt.v[KEY], torch.tensor([[4.5, 4.5]]))


def test_adagrad_matches_hand_steps():
    # v1 = 1 + 4 = 5, v2 = 9, v3 = 10
    opt = ServerOptimizer("adagrad", 1.0, **HAND)
    xs = run_steps(opt, [2.0, 2.0, 1.0])
    x1 = 1 / (math.sqrt(5) + 1)
    x2 = x1 + 1.5 / (math.sqrt(9) + 1)
    x3 = x2 + 1.25 / (math.sqrt(10) + 1)
    for x, want in zip(xs, [x1, x2, x3]):
        assert_close(x, want)


def test_defaults_and_initial_second_moment():
    assert ServerOptimizer("adam").lr == DEFAULT_SERVER_LR["adam"] == 1e-2
    assert ServerOptimizer("avgm").lr == 1.0 and ServerOptimizer("avgm").momentum == 0.9
    # A zero pseudo-gradient: v = beta2 * tau^2 (v starts at tau^2), x stays exactly where it was
    opt = ServerOptimizer("adam", tau=1e-3)
    x = torch.tensor([[0.25, -3.0]])
    assert torch.equal(opt.step({KEY: x}, {KEY: x.clone()})[KEY], x)
    torch.testing.assert_close(opt.v[KEY], torch.full((1, 2), 0.99 * 1e-6))


def test_state_dict_round_trip_continues_identically():
    a = ServerOptimizer("yogi", 0.1, **HAND)
    run_steps(a, [2.0, 1.0])
    saved = a.state_dict()
    assert {"m/" + KEY, "v/" + KEY, "steps"} == set(saved) and int(saved["steps"]) == 2
    b = ServerOptimizer("yogi", 0.1, **HAND)
    b.load_state_dict(saved)
    x = torch.tensor([[0.5, 0.5]])
    new = {KEY: x + 0.3}
    assert torch.equal(a.step({KEY: x}, new)[KEY], b.step({KEY: x}, new)[KEY])
    assert ServerOptimizer("none").state_dict() == {} and ServerOptimizer("adam").state_dict() == {}


# -- the strategy side ---------------------------------------------------------------------------


def strategy(name: str = "fedavg", **options):
    cfg = RunConfig.from_dict({"lora": {"rank": 2}, "strategy": {"name": name, **options}})
    return create(cfg, AdapterSpec.from_config(cfg.lora, cfg.model.task))


def test_none_returns_the_aggregate_bit_for_bit():
    s = strategy()
    old = {KEY: torch.randn(2, 3)}
    aggregated = {KEY: torch.randn(2, 3)}
    out = s.server_step(old, aggregated)
    assert out is aggregated and out[KEY] is aggregated[KEY]
    assert ServerOptimizer("none").step(old, aggregated)[KEY] is aggregated[KEY]
    assert s.tensor_state() == {}


def test_server_step_skips_base_delta_and_reshaped_tensors():
    s = strategy(server_optimizer="avgm", server_momentum=0.0, server_lr=0.5)
    delta_key, grown, fresh = "m.base_delta_A", "n.lora_A.weight", "o.lora_B.weight"
    old = {KEY: torch.zeros(1, 2), delta_key: torch.zeros(1, 2), grown: torch.zeros(1, 2)}
    aggregated = {KEY: torch.ones(1, 2), delta_key: torch.ones(1, 2), grown: torch.ones(2, 2), fresh: torch.ones(1)}
    out = s.server_step(old, aggregated)
    assert torch.equal(out[KEY], torch.full((1, 2), 0.5))  # x + 0.5 * (1 - 0)
    for key in (delta_key, grown, fresh):  # not a pseudo-gradient: taken as aggregated
        assert out[key] is aggregated[key]
    assert set(s.tensor_state()) == {"m/" + KEY, "steps"}


@pytest.mark.parametrize("name", ["hetlora", "flora", "fedex"])
def test_strategies_without_a_pseudo_gradient_refuse_a_server_optimizer(name):
    cls = get_strategy_class(name)
    cfg = RunConfig.from_dict({"lora": {"rank": 2}, "strategy": {"name": name, "server_optimizer": "adam"}})
    with pytest.raises(ConfigError) as err:
        cls.check_setup(cfg, [])
    line = str(err.value)
    assert "\n" not in line and "config key 'strategy.server_optimizer'" in line and f"'{name}'" in line
    assert cls.server_optimizer_refusal in line
    cls.check_setup(RunConfig.from_dict({"lora": {"rank": 2}, "strategy": {"name": name}}), [])


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsa", "federa", "dpdylora", "fltac"])
def test_strategies_with_a_pseudo_gradient_take_one(name):
    cfg = RunConfig.from_dict({"lora": {"rank": 2}, "strategy": {"name": name, "server_optimizer": "yogi"}})
    get_strategy_class(name).check_setup(cfg, ["a", "b"])


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"server_optimizer": "adamw"}, "server_optimizer"),
        ({"server_optimizer": "adam", "server_lr": 0.0}, "server_lr"),
        ({"server_optimizer": "adam", "server_lr": float("inf")}, "server_lr"),
        ({"server_lr": 0.1}, "server_lr"),  # no effect without an optimizer
        ({"server_optimizer": "avgm", "server_momentum": 1.0}, "server_momentum"),
        ({"beta1": -0.1}, "beta1"),
        ({"beta2": 1.0}, "beta2"),
        ({"tau": 0.0}, "tau"),
        ({"server_optimizer": 3}, "server_optimizer"),
    ],
)
@pytest.mark.parametrize("name", ["fedavg", "hetlora"])  # hetlora: options with their own __post_init__
def test_option_errors_name_the_key(name, options, key):
    with pytest.raises(ConfigError) as err:
        get_strategy_class(name).parse_options(options)
    assert f"config key 'strategy.{key}'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("federation", "key"),
    [
        ({"lr_schedule": "linear"}, "federation.lr_schedule"),
        ({"lr": 1e-3, "lr_min": 2e-3}, "federation.lr_min"),
        ({"lr_min": -1e-6}, "federation.lr_min"),
        ({"proximal_mu": -0.1}, "federation.proximal_mu"),
        ({"proximal_mu": float("nan")}, "federation.proximal_mu"),
    ],
)
def test_federation_errors_name_the_key(federation, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunConfig.from_dict({"federation": federation})


# -- learning-rate schedule ----------------------------------------------------------------------


def test_cosine_schedule_values():
    # FlowerTune's baseline: 5e-5 -> 1e-6 over 200 rounds
    assert round_lr(5e-5, 1, 200, "cosine", 1e-6) == 5e-5
    assert round_lr(5e-5, 200, 200, "cosine", 1e-6) == pytest.approx(1e-6, rel=1e-12)
    assert round_lr(1.0, 3, 5, "cosine", 0.2) == pytest.approx(0.6)  # the middle: (lr + lr_min) / 2
    assert round_lr(1.0, 2, 5, "cosine", 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert round_lr(1.0, 1, 1, "cosine", 0.5) == 1.0  # one round: lr
    assert round_lr(1e-3, 7, 10, "constant", 0.0) == 1e-3
    lrs = [round_lr(1.0, r, 9, "cosine", 0.1) for r in range(1, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_round_config_carries_scheduled_lr_and_proximal_mu():
    cfg = RunConfig.from_dict(
        {"rounds": 5, "federation": {"lr": 1e-3, "lr_schedule": "cosine", "lr_min": 1e-4, "proximal_mu": 0.25}}
    )
    s = create(cfg, AdapterSpec.from_config(cfg.lora, cfg.model.task))
    assert [s.base_client_config(1, r)[P.LR] for r in (1, 3, 5)] == pytest.approx([1e-3, 5.5e-4, 1e-4])
    assert s.base_client_config(1, 1)[P.PROXIMAL_MU] == 0.25


# -- FedProx -------------------------------------------------------------------------------------


def test_proximal_gradient_is_mu_times_the_drift():
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(5))}
    anchor = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in params.items()}
    mu = 0.3
    penalty = proximal_penalty(params, anchor, mu)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for (key, p), g in zip(params.items(), grads):
        torch.testing.assert_close(g, mu * (p.detach() - anchor[key]))
    drift = sum(float(((p.detach() - anchor[k]) ** 2).sum()) for k, p in params.items())
    assert float(penalty.detach()) == pytest.approx(0.5 * mu * drift, rel=1e-6)


def test_proximal_term_composes_with_a_strategy_regularizer():
    params = {"a": torch.nn.Parameter(torch.ones(2))}
    base = lambda: params["a"].sum()  # noqa: E731 - a stand-in for HetLoRA's tail penalty
    assert with_proximal(base, params, ["a"], 0.0) is base and with_proximal(None, params, ["a"], 0.0) is None
    reg = with_proximal(base, params, ["a"], 2.0)  # anchored at the values now: ones
    with torch.no_grad():
        params["a"].add_(torch.tensor([1.0, -2.0]))
    assert float(reg()) == pytest.approx(float(params["a"].sum()) + 0.5 * 2.0 * (1 + 4))


def global_drift(out, initial: dict[str, torch.Tensor]) -> float:
    state = RunDirectory(out).load_checkpoint()[1]
    return sum(float(((state[k] - initial[k]) ** 2).sum()) for k in initial)


@pytest.mark.simulation
def test_clients_apply_the_proximal_term(tmp_path, tiny_bert, make_config, monkeypatch):
    """A round with a strong proximal term moves the global adapter less from where it started."""
    starts: list[dict[str, torch.Tensor]] = []
    original = RoundLoop.start

    def keep_start(self, resume):
        state, result, first = original(self, resume)
        starts.append({k: v.clone() for k, v in state.items()})
        return state, result, first

    monkeypatch.setattr(RoundLoop, "start", keep_start)
    drift = {}
    for mu in (0.0, 50.0):
        cfg = make_config(tiny_bert, sets=("rounds=1", "federation.local_steps=8", f"federation.proximal_mu={mu}"))
        simulate(cfg, out=tmp_path / f"mu{mu}", progress=quiet(), report=False)
        drift[mu] = global_drift(tmp_path / f"mu{mu}", starts[-1])
    assert 0 < drift[50.0] < 0.5 * drift[0.0], drift


# -- checkpoint and resume -----------------------------------------------------------------------


class Killed(Exception):
    """Stands for the process dying right after a round's checkpoint was written."""


@pytest.mark.simulation
@pytest.mark.parametrize("optimizer", ["adam", "avgm"])
def test_resume_keeps_the_moments_bit_exact(tmp_path, tiny_bert, make_config, monkeypatch, optimizer):
    cfg = make_config(tiny_bert, sets=("rounds=4", f"strategy.server_optimizer={optimizer}"))
    simulate(cfg, out=tmp_path / "whole", progress=quiet(), report=False)

    original = RoundLoop.round

    def round_then_die(self, server_round, state, result):
        state = original(self, server_round, state, result)
        if server_round == 2:
            raise Killed
        return state

    with monkeypatch.context() as patch:
        patch.setattr(RoundLoop, "round", round_then_die)
        with pytest.raises(Killed):
            simulate(cfg, out=tmp_path / "cut", progress=quiet(), report=False)
    ckpt = RunDirectory(tmp_path / "cut").load_round()
    assert ckpt.round == 2 and int(ckpt.server["steps"]) == 2
    assert any(k.startswith("m/") and bool(v.abs().sum() > 0) for k, v in ckpt.server.items())
    simulate(cfg, out=tmp_path / "cut", resume=True, progress=quiet(), report=False)

    whole, cut = RunDirectory(tmp_path / "whole").load_round(), RunDirectory(tmp_path / "cut").load_round()
    assert sorted(whole.state) == sorted(cut.state)
    assert all(torch.equal(whole.state[k], cut.state[k]) for k in whole.state)
    assert sorted(whole.server) == sorted(cut.server)
    assert all(torch.equal(whole.server[k], cut.server[k]) for k in whole.server)

    # The moments are checksummed like the rest of the round: a flipped byte makes it unusable.
    path = tmp_path / "cut" / "checkpoints" / "round_0004.server.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    lines: list[str] = []
    assert RunDirectory(tmp_path / "cut").load_round(report=lines.append).round == 3
    assert any("round_0004.server.safetensors does not match its checksum" in line for line in lines)
