"""Robust aggregation against hostile clients: the pure math, and one hostile client of four
scaling its update by 1e4 against every strategy."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.errors import ConfigError, RunFailed
from fedlora.model.adapters import from_record, is_base_delta, module_of, to_record
from fedlora.privacy.central import global_norm
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server.rounds import RoundLoop
from fedlora.simulations.runtime import simulate
from fedlora.strategies import get_strategy_class
from fedlora.strategies.robust import (
    clip_bound,
    clip_states,
    coordinate_median,
    coordinate_trimmed_mean,
    first_non_finite,
    reducer,
)
from fedlora.wire import protocol as P

pytestmark = pytest.mark.simulation

SCALE = 1e4
FLTAC_DATA = (
    "data.max_train_examples=0",
    "data.max_eval_examples=0",
    "data.partition_column=task",
    "data.tasks=[{name='topics',path='synthetic:topics',max_train_examples=80,max_eval_examples=16},"
    "{name='sentiment',path='synthetic:sentiment',max_train_examples=80,max_eval_examples=16}]",
)
#: Every strategy at one rank (zero-padding of lower ranks moves the global by itself, which is
#: no client's update), with what it needs to run.
STRATEGIES = {
    "fedavg": (),
    "ffa": (),
    "federa": (),
    "fedsa": (),
    "hetlora": ("strategy.prune_gamma=1.0",),
    "flora": (),
    "fedex": (),
    "fltac": FLTAC_DATA,
    "dpdylora": (),
}


# -- the pure math -------------------------------------------------------------------------------


@pytest.mark.unit
def test_median_and_trimmed_mean_match_hand_computed_values():
    states = [{"x": torch.tensor([1.0, 10.0])}, {"x": torch.tensor([2.0, -5.0])}, {"x": torch.tensor([100.0, 0.0])}]
    assert torch.equal(coordinate_median(states)["x"], torch.tensor([2.0, 0.0]))
    four = [*states, {"x": torch.tensor([3.0, 1.0])}]
    assert torch.equal(coordinate_median(four)["x"], torch.tensor([2.5, 0.5]))  # mean of the two middle values
    # One value cut at each end of four: the mean of the middle two; of three at 0.1: nothing cut.
    assert torch.equal(coordinate_trimmed_mean(four, 0.25)["x"], torch.tensor([2.5, 0.5]))
    assert torch.allclose(coordinate_trimmed_mean(states, 0.1)["x"], torch.tensor([103 / 3, 5 / 3]))
    # The robust reducers ignore weights (a client claims its own count); "mean" is the strategy's.
    assert torch.equal(reducer("median", 0.1, None)(four, [1, 1, 1, 1e9])["x"], torch.tensor([2.5, 0.5]))
    mean = object()
    assert reducer("mean", 0.1, mean) is mean


@pytest.mark.unit
def test_clip_scales_only_updates_above_the_bound():
    ref = {"a": torch.ones(2), "b": torch.zeros(1)}
    states = [
        {"a": torch.tensor([2.0, 1.0]), "b": torch.zeros(1)},  # update norm 1
        {"a": torch.tensor([1.0, 3.0]), "b": torch.zeros(1)},  # 2
        {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0])},  # 3
        {"a": torch.tensor([1.0 + 3e4, 1.0]), "b": torch.tensor([4e4])},  # 5e4: the hostile one
    ]
    out, norms, bound = clip_states(states, [ref] * 4, mode="median_multiple", multiple=2.0)
    assert norms == pytest.approx([1.0, 2.0, 3.0, 5e4])
    assert bound == pytest.approx(2.0 * 2.5)  # k x the median (2.5) of the four norms
    for got, want in zip(out[:3], states[:3]):  # within the bound: untouched, bit for bit
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.allclose(out[3]["a"], torch.tensor([1.0 + 3.0, 1.0])) and torch.allclose(
        out[3]["b"], torch.tensor([4.0])
    )
    assert global_norm({k: out[3][k] - ref[k] for k in ref}) == pytest.approx(5.0, rel=1e-6)
    fixed, _, bound = clip_states(states, [ref] * 4, mode="fixed", fixed=0.5)
    assert bound == 0.5 and all(global_norm({k: s[k] - ref[k] for k in ref}) <= 0.5 + 1e-6 for s in fixed)
    assert clip_bound([1.0, 2.0], "none", 3.0, 1.0) is None
    assert first_non_finite({"b": torch.tensor([math.inf]), "a": torch.ones(1)}) == "b"
    assert first_non_finite({"a": torch.ones(1)}) is None


@pytest.mark.unit
def test_median_is_refused_where_the_math_does_not_allow_it(tiny_bert, make_config):
    for name in ("flora", "hetlora", "fedex"):
        cfg = make_config(tiny_bert, strategy=name, sets=("robustness.aggregator=median",))
        with pytest.raises(ConfigError, match="robustness.aggregator") as err:
            get_strategy_class(name).check_setup(cfg, [])
        assert "\n" not in str(err.value)
    get_strategy_class("fedavg").check_setup(make_config(tiny_bert, sets=("robustness.aggregator=median",)), [])


# -- one hostile client of four ------------------------------------------------------------------


class Attack:
    """Wraps the round loop: after validation, the last sampled node's reply becomes ``reference +
    SCALE x its update`` (or NaN); what every node trained and what aggregation did are recorded."""

    def __init__(self, monkeypatch, nan_round: int | None = None) -> None:
        self.honest: list[dict[str, torch.Tensor]] = []
        self.references: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.nan_round = nan_round
        check, aggregate = RoundLoop.check_reply, RoundLoop.aggregate
        attack = self

        def check_reply(loop, server_round, reply, count, total, book):
            check(loop, server_round, reply, count, total, book)
            node = reply.metadata.src_node_id
            if reply not in book.valid:
                return
            state, ref = from_record(reply.content[P.ARRAYS]), book.reference[node]
            if node != max(book.sent):
                attack.honest.append(state)
                attack.references[len(attack.honest) - 1] = ref
                return
            if attack.nan_round is None:
                hostile = {k: ref[k] + SCALE * (v - ref[k]) if k in ref else v for k, v in state.items()}
            elif server_round == attack.nan_round:
                hostile = {k: v * math.nan for k, v in state.items()}
            else:
                return
            reply.content[P.ARRAYS] = to_record(hostile)

        def aggregate_round(loop, server_round, state, book):
            attack.before = dict(state)
            new, loss = aggregate(loop, server_round, state, book)
            attack.after = dict(new)
            return new, loss

        monkeypatch.setattr(RoundLoop, "check_reply", check_reply)
        monkeypatch.setattr(RoundLoop, "aggregate", aggregate_round)

    def honest_update_norms(self) -> list[float]:
        return [global_norm({k: s[k] - self.references[i][k] for k in s}) for i, s in enumerate(self.honest)]

    def global_change(self) -> float:
        """Norm of what aggregation changed in the global adapter (base-delta factors aside)."""
        keys = [k for k in self.before if not is_base_delta(k)]
        return global_norm({k: self.after[k] - self.before[k] for k in keys})

    def base_change(self, scaling: float) -> tuple[float, float]:
        """(norm of the change of the merged base delta ``B_d @ A_d``, largest honest product norm
        ``||scaling * B_k @ A_k||``), both summed over modules as one Frobenius norm."""

        def dense(state):
            return {
                module_of(k): state[k[:-2] + "_B"] @ state[k] for k in state if is_base_delta(k) and k.endswith("_A")
            }

        old, new = dense(self.before), dense(self.after)
        change = global_norm({m: new[m] - old.get(m, torch.zeros_like(new[m])) for m in new})
        products = [
            global_norm({k: scaling * s[k.replace("lora_A", "lora_B")] @ s[k] for k in s if ".lora_A." in k})
            for s in self.honest
        ]
        return change, max(products)


def run_attacked(tmp_path, tiny_bert, make_config, monkeypatch, strategy: str, *sets: str, nan_round=None):
    cfg = make_config(
        tiny_bert,
        strategy=strategy,
        sets=("rounds=1", "federation.clients=4", "federation.local_steps=1", *STRATEGIES[strategy], *sets),
    )
    attack = Attack(monkeypatch, nan_round=nan_round)
    out = tmp_path / strategy
    return cfg, attack, out, (lambda: simulate(cfg, out=out, progress=Progress(quiet=True), report=False))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_clipped_hostile_client_stays_within_the_honest_range(tmp_path, tiny_bert, make_config, monkeypatch, strategy):
    """With ``median_multiple`` (k = 3) every update is at most k x the median norm, which three
    honest clients of four bound by their largest norm. Every strategy but FLoRA moves the global
    factors by an average (weighted, HetLoRA's weights summing to 1) of the clipped updates, so
    the global adapter moves by at most k x the largest honest update. FLoRA merges products
    ``s B_k A_k`` into the base: the clipped hostile product is ``c u_B (A_0 + c u_A)`` with ``c``
    about k, bounded here by 2k x the largest honest product (A moves little from its init)."""
    k = 3.0
    cfg, attack, _, run = run_attacked(
        tmp_path, tiny_bert, make_config, monkeypatch, strategy, "robustness.update_clip=median_multiple"
    )
    run()
    assert len(attack.honest) == 3
    honest = max(attack.honest_update_norms())
    assert honest > 0
    assert all(torch.isfinite(v).all() for v in attack.after.values())
    if strategy == "flora":
        change, product = attack.base_change(cfg.lora.alpha / cfg.lora.rank)
        assert 0 < change <= 2 * k * product
    else:
        assert 0 < attack.global_change() <= k * honest * (1 + 1e-4)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_unclipped_hostile_client_ruins_every_strategy(tmp_path, tiny_bert, make_config, monkeypatch, strategy):
    """Without the clip the hostile update passes into the global adapter: about SCALE / 4 x a
    typical update for the averaging strategies, all of it for HetLoRA (its norm weight ~ 1)."""
    cfg, attack, _, run = run_attacked(tmp_path, tiny_bert, make_config, monkeypatch, strategy)
    run()
    if strategy == "flora":
        change, product = attack.base_change(cfg.lora.alpha / cfg.lora.rank)
        assert change > 100 * product
    else:
        assert attack.global_change() > 100 * max(attack.honest_update_norms())


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_robust_aggregator_keeps_fedavg_within_the_honest_coordinates(
    tmp_path, tiny_bert, make_config, monkeypatch, aggregator
):
    """No clip: a coordinate-wise median (or a mean trimmed of one value at each end) of three
    honest values and one hostile lies, coordinate by coordinate, between the honest values."""
    _, attack, _, run = run_attacked(
        tmp_path,
        tiny_bert,
        make_config,
        monkeypatch,
        "fedavg",
        f"robustness.aggregator={aggregator}",
        "robustness.trim_fraction=0.25",
    )
    run()
    for key in attack.honest[0]:
        stacked = torch.stack([s[key] for s in attack.honest])
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert bool(((attack.after[key] >= low - 1e-6) & (attack.after[key] <= high + 1e-6)).all()), key


def test_non_finite_global_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_bert, make_config, monkeypatch):
    _, _, out, run = run_attacked(tmp_path, tiny_bert, make_config, monkeypatch, "fedavg", "rounds=2", nan_round=2)
    with pytest.raises(RunFailed, match=r"round 2/2: the aggregated global adapter is not finite") as err:
        run()
    assert "\n" not in str(err.value) and err.value.exit_code == 1
    last, state, _ = RunDirectory(out).load_checkpoint()
    assert last == 1 and all(torch.isfinite(v).all() for v in state.values())
