"""The strategies' pure math on small random tensors: each check is a property the paper states."""

from __future__ import annotations

import pytest
import torch

from fedlora.model.adapters import delta_keys, lora_keys
from fedlora.model.lowrank import compact, stack, svd_init
from fedlora.strategies.federa import federa_init
from fedlora.strategies.fedex import fedex_aggregate
from fedlora.strategies.flora import flora_aggregate
from fedlora.strategies.fltac import cluster_purity, fltac_aggregate, kmeans, task_clusters
from fedlora.strategies.hetlora import hetlora_aggregate, self_prune, sparsity_weights, update_norm
from fedlora.strategies.ranks import pad, truncate

pytestmark = pytest.mark.unit

MOD = "base_model.model.enc.layer.0.query"
MOD2 = "base_model.model.enc.layer.0.value"


def adapter(rank: int, out: int = 12, inp: int = 10, seed: int = 0, modules=(MOD, MOD2)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        a_key, b_key = lora_keys(module)
        state[a_key] = torch.randn(rank, inp, generator=gen)
        state[b_key] = torch.randn(out, rank, generator=gen)
    return state


def product(state, module, scaling=1.0):
    a_key, b_key = lora_keys(module)
    return scaling * state[b_key].double() @ state[a_key].double()


def base_delta(state, module):
    da, db = delta_keys(module)
    return state[db].double() @ state[da].double() if da in state else torch.zeros(1, dtype=torch.float64)


# -- FeDeRA ---------------------------------------------------------------------------------------


def test_federa_init_is_the_rank_r_svd_and_keeps_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(12, 10)
    rank, alpha = 3, 6.0
    a, b, residual = svd_init(weight, rank, alpha)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose((alpha / rank) * b.double() @ a.double(), best, atol=1e-5)
    assert torch.allclose(residual + (alpha / rank) * b @ a, weight, atol=1e-5)

    state = federa_init({MOD: weight}, rank, alpha)
    a_key, b_key = lora_keys(MOD)
    assert torch.allclose(
        weight.double() + base_delta(state, MOD) + product(state, MOD, alpha / rank), weight.double(), atol=1e-5
    )
    assert torch.allclose(weight.double() + base_delta(state, MOD), residual.double(), atol=1e-5)


def test_svd_init_rejects_a_rank_above_the_matrix():
    with pytest.raises(ValueError):
        svd_init(torch.randn(4, 3), 4, 8.0)


# -- HetLoRA --------------------------------------------------------------------------------------


def test_hetlora_pad_truncate_round_trip():
    state = adapter(4)
    small = truncate(state, 2)
    assert small[lora_keys(MOD)[0]].shape == (2, 10) and small[lora_keys(MOD)[1]].shape == (12, 2)
    back = truncate(pad(small, 4), 2)
    for key in small:
        assert torch.equal(back[key], small[key])
    padded = pad(small, 4)
    assert torch.allclose(product(padded, MOD), product(small, MOD))


def test_hetlora_weights_sum_to_one_and_follow_the_norms():
    updates = [adapter(2, seed=1), adapter(4, seed=2), {k: 3 * v for k, v in adapter(4, seed=3).items()}]
    weights = sparsity_weights(updates, 0.5)
    assert sum(weights) == pytest.approx(1.0)
    norms = [update_norm(u, 0.5) for u in updates]
    assert [w / weights[0] for w in weights] == pytest.approx([n / norms[0] for n in norms])
    assert weights[2] == max(weights)

    new, used = hetlora_aggregate(adapter(4, seed=9), updates, 0.5)
    assert used == pytest.approx(weights)
    a_key = lora_keys(MOD)[0]
    expected = sum(w * pad(u, 4)[a_key] for w, u in zip(weights, updates))
    assert torch.allclose(new[a_key], expected, atol=1e-6)
    assert new[a_key].shape == (4, 10)


def test_hetlora_self_pruning_lowers_the_rank_only_when_the_tail_is_small():
    state = adapter(8, seed=4)
    for module in (MOD, MOD2):
        a_key, b_key = lora_keys(module)
        state[a_key][6:] *= 1e-4
    pruned, rank = self_prune(state, 8, gamma=0.75, threshold=0.05, min_rank=1)
    assert rank == 6
    assert float(pruned[lora_keys(MOD)[0]][6:].abs().max()) == 0.0
    assert pruned[lora_keys(MOD)[0]].shape == (8, 10)  # shapes stay what was sent

    unchanged, rank = self_prune(adapter(8, seed=5), 8, gamma=0.75, threshold=0.05, min_rank=1)
    assert rank == 8
    # min_rank bounds the pruned rank: floor(0.75 * 8) = 6 < 7, so it keeps 7 (whose tail is small too).
    _, rank = self_prune(state, 8, gamma=0.75, threshold=0.05, min_rank=7)
    assert rank == 7
    _, rank = self_prune(state, 8, gamma=0.75, threshold=0.05, min_rank=8)
    assert rank == 8


# -- FLoRA and FedEx-LoRA: exact means for mixed ranks -------------------------------------------


@pytest.mark.parametrize("aggregate", [flora_aggregate, fedex_aggregate])
def test_exact_strategies_give_the_mean_of_the_products(aggregate):
    scaling = 0.5
    updates = [adapter(2, seed=1), adapter(4, seed=2), adapter(3, seed=3)]
    weights = [10.0, 30.0, 60.0]
    state = adapter(4, seed=7)
    # An existing delta must be kept and added to.
    da, db = delta_keys(MOD)
    state[da], state[db] = torch.randn(2, 10), torch.randn(12, 2)
    before = base_delta(state, MOD)
    new = aggregate(state, updates, weights, scaling)
    for module in (MOD, MOD2):
        mean = sum(w * product(u, module, scaling) for w, u in zip(weights, updates)) / sum(weights)
        model = base_delta(new, module) + (product(new, module, scaling) if aggregate is fedex_aggregate else 0)
        old = before if module == MOD else 0
        assert torch.allclose(model - old, mean, atol=1e-5)


def test_compact_keeps_the_product_and_caps_the_rank():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 20, generator=gen), torch.randn(20, 5, generator=gen)
    nb, na = compact(b, a)
    assert na.shape[0] <= 5
    assert torch.allclose(nb @ na, b @ a, atol=1e-4)
    b1, a1 = stack([(torch.randn(6, 2), torch.randn(2, 5), 1.0)] * 3)  # the same term three times
    nb, na = compact(b1, a1)
    assert na.shape[0] == 2 and torch.allclose(nb @ na, b1 @ a1, atol=1e-4)


# -- FL-TAC ---------------------------------------------------------------------------------------


def test_fltac_recovers_well_separated_tasks_and_aggregates_within_clusters():
    adapters, tags = [], []
    for i in range(12):
        task = "sst2" if i % 3 else "news"
        base = adapter(2, seed=100 if task == "sst2" else 200)
        noise = adapter(2, seed=i)
        adapters.append({k: base[k] + 0.01 * noise[k] for k in base})
        tags.append(task)
    weights = [float(1 + i) for i in range(12)]
    per_task, labels, purity = fltac_aggregate(adapters, tags, weights, k=2, seed=0)
    assert purity == 1.0
    assert len(set(labels)) == 2
    for task in ("sst2", "news"):
        members = [i for i, t in enumerate(tags) if t == task]
        key = lora_keys(MOD)[0]
        expected = sum(weights[i] * adapters[i][key] for i in members) / sum(weights[i] for i in members)
        assert torch.allclose(per_task[task][key], expected, atol=1e-6)


def test_kmeans_purity_and_cluster_naming():
    x = torch.cat([torch.zeros(5, 3), torch.ones(5, 3) * 10]) + 0.01 * torch.randn(10, 3)
    labels, centres = kmeans(x, 2, seed=1)
    assert labels[:5].unique().numel() == 1 and labels[5:].unique().numel() == 1 and labels[0] != labels[5]
    assert centres.shape == (2, 3)
    assert cluster_purity([0, 0, 1, 1], ["a", "b", "b", "b"]) == 0.75
    assert task_clusters([0, 0, 1, 1], ["a", "a", "b", "a"]) == {"a": 0, "b": 1}


# -- FedSA-LoRA -----------------------------------------------------------------------------------


def test_fedsa_never_sends_b():
    from flwr.app import ConfigRecord
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.config import RunConfig
    from fedlora.model.adapters import AdapterSpec, from_record, to_record
    from fedlora.strategies import create

    cfg = RunConfig.from_dict({"strategy": {"name": "fedsa"}, "rounds": 2})
    strategy = create(
        cfg, AdapterSpec(rank=2, alpha=4.0, dropout=0.0, target_modules=("query",), task="classification")
    )
    state = {**adapter(2), "base_model.model.classifier.modules_to_save.weight": torch.randn(4, 12)}
    assert not [k for k in strategy.payload(1, state) if ".lora_B." in k]
    assert "base_model.model.classifier.modules_to_save.weight" in strategy.payload(1, state)

    class TwoNodes:
        def get_node_ids(self):
            return [7, 8]

    # Messages are stamped with the sender's identity, which a runtime sets; this test is the runtime.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    messages = list(
        strategy.configure_evaluate(2, to_record(state), ConfigRecord({"run": "{}", "labels": "[]"}), TwoNodes())
    )
    assert len(messages) == 2
    for msg in messages:
        assert not [k for k in from_record(msg.content["arrays"]) if ".lora_B." in k]
        assert msg.content["config"]["export"] is True  # the last round asks clients to export
