"""A strategy written outside the package, in one module (this one): server half, client hooks,
options; registered once and run for 2 rounds by the unchanged runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate
from fedlora.strategies import (
    ClientHooks,
    LoRAStrategy,
    StrategyOptions,
    get_strategy_class,
    option,
    register,
    unregister,
)

pytestmark = pytest.mark.unit

SHRINK = "toy-shrink"  # this strategy's own round-config key: only its two halves know it
CALLS = {"regularizer": 0, "after_train": 0}
SEEN: list[list[dict[str, torch.Tensor]]] = []


class ToyOptions(StrategyOptions):
    shrink: float = option(0.5, "factor every client applies to its trained tensors before replying", ge=0, le=1)


class ToyClient(ClientHooks):
    def regularizer(self, params, rank):
        def penalty():
            CALLS["regularizer"] += 1
            return 1e-4 * sum(p.pow(2).sum() for k, p in params.items() if ".lora_" in k)

        return penalty

    def after_train(self, trained, rank):
        CALLS["after_train"] += 1
        return {k: v * float(self.config[SHRINK]) for k, v in trained.items()}, {}


class ToyMedian(LoRAStrategy):
    """Coordinate-wise median of the replies (a robust aggregate), shrunk on the clients."""

    name = "toy-median"
    options_class = ToyOptions
    client_hooks = ToyClient

    def client_config(self, node_id, server_round):
        return {SHRINK: self.options.shrink}

    def aggregate(self, server_round, state, updates):
        SEEN.append([u.state for u in updates])
        for key in updates[0].state:
            state[key] = torch.stack([u.state[key] for u in updates]).median(dim=0).values
        return state


@pytest.fixture
def toy():
    register(ToyMedian)
    CALLS.update(regularizer=0, after_train=0)
    SEEN.clear()
    yield ToyMedian
    unregister(ToyMedian.name)


def test_registry_refuses_a_taken_name(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(ToyMedian)
    clash = type("Clash", (ToyMedian,), {"name": "fedavg"})
    with pytest.raises(ValueError, match="'fedavg' is already registered"):
        register(clash)
    assert get_strategy_class("toy-median") is ToyMedian
    with pytest.raises(ValueError, match="ClientHooks"):
        register(type("NoHooks", (ToyMedian,), {"name": "toy-bad", "client_hooks": object}))


def test_registry_refuses_a_strategy_without_aggregate():
    from fedlora.strategies.base import LoRAStrategy

    half = type("NoAggregate", (LoRAStrategy,), {"name": "toy-no-aggregate"})
    with pytest.raises(ValueError, match="NoAggregate does not define aggregate"):
        register(half)
    with pytest.raises(ConfigError, match="unknown strategy 'toy-no-aggregate'"):
        get_strategy_class("toy-no-aggregate")


def test_toy_options_are_checked_with_one_line(toy):
    with pytest.raises(ConfigError, match=r"config key 'strategy.shrink' must be in \[0, 1\], got 2.0"):
        ToyMedian.parse_options({"shrink": 2})
    with pytest.raises(ConfigError, match="unknown config key 'strategy.bogus' for strategy 'toy-median'"):
        ToyMedian.parse_options({"bogus": 1})


@pytest.mark.simulation
def test_toy_strategy_runs_two_rounds(tmp_path: Path, tiny_bert, make_config, toy):
    cfg = make_config(tiny_bert, strategy="toy-median", sets=("strategy.shrink=0.5",))
    out = tmp_path / "run"
    result = simulate(cfg, out=out, progress=Progress(quiet=True))
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert all(r["clients_ok"] == 3 and r["dropped"] == [] for r in result.rounds)
    steps = cfg.federation.local_steps
    assert CALLS == {"regularizer": 2 * 3 * steps, "after_train": 2 * 3}  # both halves ran on every client
    _, state, _ = RunDirectory(out).load_checkpoint()
    last = SEEN[-1]
    for key in last[0]:
        assert torch.equal(state[key], torch.stack([u[key] for u in last]).median(dim=0).values)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    config = (out / "config.toml").read_text()
    assert 'name = "toy-median"' in config and "shrink = 0.5" in config  # re-runnable as a preset


@pytest.mark.simulation
def test_toy_client_half_shapes_every_reply(tmp_path: Path, tiny_bert, make_config, toy):
    """shrink = 0: every reply is zero, so the median global adapter is zero wherever clients trained."""
    cfg = make_config(tiny_bert, strategy="toy-median", sets=("strategy.shrink=0.0", "rounds=1"))
    simulate(cfg, out=tmp_path / "run", progress=Progress(quiet=True))
    _, state, _ = RunDirectory(tmp_path / "run").load_checkpoint()
    trained = SEEN[-1][0].keys()
    assert trained and all(float(state[k].abs().max()) == 0 for k in trained)
