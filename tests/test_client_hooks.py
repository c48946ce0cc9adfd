"""Each strategy's client half on its own: hooks called on small tensors, no Flower run, no model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import RecordDict

from fedlora.data import Encoded
from fedlora.model.adapters import delta_keys, lora_keys, seeded_lora_a
from fedlora.strategies import STRATEGIES, ClientHooks, NodeStore, TrainGroup
from fedlora.strategies.federa import SVD_RANK, FeDeRAClient
from fedlora.strategies.fedsa import FedSAClient
from fedlora.strategies.ffa import A_SEED, FFAClient
from fedlora.strategies.fltac import TASKS, FLTACClient
from fedlora.strategies.hetlora import MIN_RANK, PRUNE_GAMMA, PRUNE_LAMBDA, PRUNE_THRESHOLD, HetLoRAClient, tail_penalty

pytestmark = pytest.mark.unit

MOD = "base_model.model.bert.encoder.layer.0.attention.self.query"
A_KEY, B_KEY = lora_keys(MOD)
HEAD = "base_model.model.classifier.modules_to_save.weight"


def factors(rank: int = 4, d_in: int = 6, d_out: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A_KEY: torch.randn(rank, d_in, generator=g), B_KEY: torch.randn(d_out, rank, generator=g)}


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_every_registered_strategy_has_a_client_half():
    for cls in STRATEGIES.values():
        assert issubclass(cls.client_hooks, ClientHooks)


def test_default_hooks_train_and_return_what_was_received():
    """FedIT (and FLoRA, FedEx-LoRA, whose client half is the default)."""
    hooks = ClientHooks({})
    received = {**factors(), HEAD: torch.ones(2, 6)}
    data = Encoded(input_ids=[[1, 2]] * 3, labels=[0, 1, 0])
    (group,) = hooks.groups(received, data, {})
    assert group.name == "" and group.data is data and set(group.tensors) == set(received)
    assert hooks.frozen(shapes_of(received), group) == {}
    assert hooks.kept(shapes_of(received), received, NodeStore(RecordDict())) == {}
    assert hooks.regularizer({}, 4) is None
    out, extra = hooks.after_train(received, 4)
    assert out is received and extra == {}


def test_default_hooks_fold_received_base_delta_factors():
    """FLoRA's merges and FedEx-LoRA's residual arrive as factors; the frozen base gets B_d @ A_d."""
    g = torch.Generator().manual_seed(3)
    da, db = delta_keys(MOD)
    sent = {da: torch.randn(3, 6, generator=g), db: torch.randn(5, 3, generator=g)}
    dense, token = ClientHooks({}).base_delta(None, [MOD], sent)
    assert torch.allclose(dense[MOD], sent[db] @ sent[da])
    assert token and token == ClientHooks({}).base_delta(None, [MOD], dict(sent))[1]
    assert ClientHooks({}).base_delta(None, [MOD], {}) == ({}, "")


def test_ffa_rebuilds_the_shared_frozen_a_and_trains_only_b():
    hooks = FFAClient({A_SEED: 11})
    shapes = shapes_of(factors())
    group = TrainGroup(name="", tensors={B_KEY: torch.zeros(5, 4)}, data=None)
    frozen = hooks.frozen(shapes, group)
    assert set(frozen) == {A_KEY}  # B was sent: it is trained, not frozen
    assert torch.equal(frozen[A_KEY], seeded_lora_a(shapes, 11)[A_KEY])
    assert not torch.equal(frozen[A_KEY], FFAClient({A_SEED: 12}).frozen(shapes, group)[A_KEY])


def test_federa_makes_the_frozen_weight_its_svd_residual():
    from fedlora.process import process_state

    g = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 10, generator=g)
    host = SimpleNamespace(
        loaded=SimpleNamespace(key=("test-federa", id(weight))), base_weight=lambda m: weight.clone()
    )
    rank = 3
    dense, token = FeDeRAClient({SVD_RANK: rank}).base_delta(host, [MOD], {})
    residual = weight + dense[MOD]
    s_full = torch.linalg.svdvals(weight)
    s_res = torch.linalg.svdvals(residual)
    # The top-r singular directions moved into the adapter: what is left has W's tail spectrum.
    assert torch.allclose(s_res[: len(s_full) - rank], s_full[rank:], atol=1e-4)
    assert token.startswith(f"svd{rank}")
    process_state().clear("derived")


def test_hetlora_regularizer_penalises_only_the_tail():
    hooks = HetLoRAClient({PRUNE_GAMMA: 0.5, PRUNE_THRESHOLD: 0.05, PRUNE_LAMBDA: 0.1, MIN_RANK: 1})
    params = {k: v.clone().requires_grad_(True) for k, v in factors(rank=4).items()}
    penalty = hooks.regularizer(params, 4)
    value = penalty()
    assert torch.allclose(value, 0.1 * tail_penalty(params, 2))
    value.backward()
    assert float(params[A_KEY].grad[:2].abs().max()) == 0.0 and float(params[A_KEY].grad[2:].abs().max()) > 0
    assert (
        HetLoRAClient({PRUNE_GAMMA: 0.5, PRUNE_THRESHOLD: 0.05, PRUNE_LAMBDA: 0.0, MIN_RANK: 1}).regularizer(params, 4)
        is None
    )


def test_hetlora_prunes_a_weak_tail_and_reports_the_new_rank():
    hooks = HetLoRAClient({PRUNE_GAMMA: 0.5, PRUNE_THRESHOLD: 0.05, PRUNE_LAMBDA: 0.0, MIN_RANK: 1})
    weak = factors(rank=4)
    weak[A_KEY][2:] *= 1e-4
    out, extra = hooks.after_train(weak, 4)
    assert extra == {"rank": 2}
    assert float(out[A_KEY][2:].abs().max()) == 0 and float(out[B_KEY][:, 2:].abs().max()) == 0
    out, extra = hooks.after_train(factors(rank=4), 4)  # a strong tail stays
    assert extra == {"rank": 4} and torch.equal(out[A_KEY], factors(rank=4)[A_KEY])


def test_fltac_trains_one_group_per_task_on_that_tasks_rows():
    received = {f"{t}::{k}": v + i for i, t in enumerate(("news", "sst")) for k, v in factors().items()}
    data = Encoded(input_ids=[[i] for i in range(6)], labels=[0, 1, 2, 3, 4, 5])
    rows = {"sst": [0, 2, 4], "news": [1, 3, 5]}
    groups = FLTACClient({TASKS: json.dumps(["sst", "news"])}).groups(received, data, rows)
    assert [g.name for g in groups] == ["sst", "news"]
    assert set(groups[0].tensors) == {A_KEY, B_KEY}  # unqualified keys: one adapter, installed as is
    assert torch.equal(groups[0].tensors[A_KEY], received[f"sst::{A_KEY}"])
    assert groups[0].data.labels == [0, 2, 4] and groups[1].data.labels == [1, 3, 5]
    only = FLTACClient({TASKS: json.dumps(["news"])}).groups(received, data, rows)
    assert [g.name for g in only] == ["news"]


def test_fedsa_keeps_its_own_b_across_rounds_and_never_sends_it():
    hooks = FedSAClient({})
    store = NodeStore(RecordDict())
    full = factors()
    received = {A_KEY: full[A_KEY]}  # the server sends the shared A only
    first = hooks.kept(shapes_of(full), received, store)
    assert set(first) == {B_KEY} and float(first[B_KEY].abs().max()) == 0  # peft's zero init
    trained_b = {B_KEY: torch.full((5, 4), 0.25)}
    hooks.keep(store, trained_b)
    again = hooks.kept(shapes_of(full), received, store)
    assert torch.equal(again[B_KEY], trained_b[B_KEY])
    out, _ = hooks.after_train(received, 4)
    assert B_KEY not in out
    # A node whose rank changed (a new run) starts its B afresh rather than failing on a shape.
    other = hooks.kept({A_KEY: (2, 6), B_KEY: (5, 2)}, {A_KEY: torch.zeros(2, 6)}, store)
    assert tuple(other[B_KEY].shape) == (5, 2) and float(other[B_KEY].abs().max()) == 0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_hooks_build_from_the_servers_config(name):
    """Every strategy's client half reads only what its server half puts in the round config."""
    from fedlora.config import RunConfig
    from fedlora.model.adapters import AdapterSpec
    from fedlora.strategies import NodeDirectory, create

    tasks = ["a", "b"] if name == "fltac" else []
    cfg = RunConfig.from_dict({"strategy": {"name": name}, "lora": {"rank": 4}})
    spec = AdapterSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("query",), task="classification")
    nodes = NodeDirectory()
    nodes.record(7, {"rank": 4, "tasks": json.dumps({"a": 3, "b": 2})})
    strategy = create(cfg, spec, tasks=tasks, nodes=nodes)
    config = {**strategy.base_client_config(7, 1), **strategy.client_config(7, 1)}
    hooks = strategy.client_hooks(config)
    received = factors()
    if name == "fltac":
        received = {f"{t}::{k}": v for t in tasks for k, v in received.items()}
    data = Encoded(input_ids=[[1]] * 5, labels=[0] * 5)
    groups = hooks.groups(received, data, {"a": [0, 1, 2], "b": [3, 4]})
    assert groups and all(len(g.data) > 0 for g in groups)
    for group in groups:
        hooks.frozen(shapes_of(factors()), group)
        hooks.kept(shapes_of(factors()), group.tensors, NodeStore(RecordDict()))
        out, extra = hooks.after_train(group.tensors, 4)
        assert set(out) <= set(group.tensors) and set(extra) <= {"rank"}


def test_the_client_app_knows_no_strategy():
    """client/ holds no strategy's name, wire key or module: those live in the strategy's module."""
    import inspect
    from pathlib import Path

    import fedlora.client as client_pkg
    import fedlora.strategies as strategies_pkg
    from fedlora.wire import protocol

    source = "\n".join(p.read_text() for p in Path(client_pkg.__file__).parent.glob("*.py"))
    for cls in STRATEGIES.values():
        module = inspect.getmodule(cls)
        assert f'"{cls.name}"' not in source and f"'{cls.name}'" not in source, cls.name
        assert f"strategies.{module.__name__.rsplit('.', 1)[-1]}" not in source, module.__name__
        assert cls.__name__ not in source
        assert cls.client_hooks is ClientHooks or cls.client_hooks.__name__ not in source
        own_keys = {
            v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and not hasattr(protocol, k)
        }  # not shared wire keys
        for key in own_keys:
            assert f'"{key}"' not in source and f"'{key}'" not in source, (module.__name__, key)
    assert Path(strategies_pkg.__file__).parent.name == "strategies"
