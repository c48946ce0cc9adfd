"""A fedlora strategy driven by Flower's own ``Strategy.start`` (server/flower.py), on the in-process
Grid with fedlora's ClientApp: it computes what fedlora's round loop computes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROFILES, peft_logits, tiny_config

from fedlora.errors import ConfigError
from fedlora.server import create_flower_strategy
from fedlora.server.flower import config_from_run_config

pytestmark = pytest.mark.simulation


@pytest.fixture
def grid_of():
    """``grid_of(n, app=None)``: an in-process Grid of ``n`` nodes running fedlora's ClientApp (or
    ``app``), with the message identity Flower's runtime would set; closed after the test."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client.client_app import app as client_app
    from fedlora.simulations.grid import InProcessGrid

    grids = []

    def make(n, app=None):
        grid = InProcessGrid(app or client_app, n)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
        grids.append(grid)
        return grid

    yield make
    for grid in grids:
        grid.close()


@pytest.mark.unit
def test_run_config_keys_set_fedlora_keys():
    rc = {
        "num-server-rounds": 2,  # the app's own: ignored
        "fedlora.lora.rank": 2,
        "fedlora.lora.target_modules": "['query', 'value']",  # a TOML list in a string
        "fedlora.federation.lr": 0.05,
        "fedlora.model.name": "/models/tiny",
        "fedlora.federation.gradient_checkpointing": True,
    }
    cfg = config_from_run_config(rc, {"rounds": 5})
    assert (cfg.rounds, cfg.lora.rank, list(cfg.lora.target_modules)) == (5, 2, ["query", "value"])
    assert (cfg.federation.lr, cfg.model.name, cfg.federation.gradient_checkpointing) == (0.05, "/models/tiny", True)
    with pytest.raises(ConfigError, match="lora.rnak"):
        config_from_run_config({"fedlora.lora.rnak": 2})
    with pytest.raises(ConfigError, match="lora.rank"):
        config_from_run_config({"fedlora.lora.rank": 0})


@pytest.mark.unit
def test_central_dp_is_refused_before_loading(tiny_bert):
    cfg = tiny_config(tiny_bert, sets=("privacy.mode='central'", "privacy.noise_multiplier=1.0"))
    with pytest.raises(ConfigError, match="privacy.mode"):
        create_flower_strategy(config=cfg)


@pytest.mark.parametrize(
    ("strategy", "sets"),
    [
        ("fedavg", ()),
        # Payloads shaped by each node's rank: nodes are queried first; uploads on a lossy wire
        # are relative to what each node was sent.
        ("hetlora", (PROFILES, "federation.transport_dtype='bfloat16'")),
    ],
)
def test_flower_start_computes_what_fedlora_computes(tmp_path, tiny_bert, grid_of, strategy, sets):
    from fedlora.run.directory import RunDirectory
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    cfg = tiny_config(tiny_bert, strategy=strategy, sets=sets)
    flower = create_flower_strategy(config=cfg)
    result = flower.start(
        grid=grid_of(3), initial_arrays=flower.initial_arrays(), num_rounds=2, evaluate_fn=flower.evaluate_global
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(m["clients-ok"] == 3 and m["clients-dropped"] == 0 for m in result.train_metrics_clientapp.values())
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert "eval_accuracy" in result.evaluate_metrics_serverapp[2]

    simulate(cfg, out=tmp_path / "fedlora", progress=Progress(quiet=True), report=False)
    _, expected, _ = RunDirectory(tmp_path / "fedlora").load_checkpoint()
    got = result.arrays.to_torch_state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key


def test_export_loads_with_peft(tmp_path, tiny_bert, grid_of):
    from fedlora.server import prepare

    cfg = tiny_config(tiny_bert)
    flower = create_flower_strategy("ffa", config=cfg)
    assert flower.strategy.name == "ffa"
    result = flower.start(grid=grid_of(3), num_rounds=1)  # initial arrays default to the strategy's
    assert flower.cfg.rounds == flower.strategy.settings.rounds == 1  # the strategy plans for the rounds it runs
    (out,) = flower.export(result.arrays, tmp_path / "adapter")
    assert json.loads((out / "fedlora.json").read_text())["num_labels"] >= 2
    ids = torch.tensor([[2, 5, 9, 11, 3]])
    prepared = prepare(cfg, check_partitions=False)
    host = prepared.host
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        host.load_state(name, result.arrays.to_torch_state_dict())
        host.peft_model.eval()
        with torch.no_grad():
            served = host.peft_model(input_ids=ids).logits.clone()
    assert torch.allclose(peft_logits(tiny_bert, "classification", out, ids), served, atol=1e-5)


def test_bad_reply_is_dropped_not_aggregated(tiny_bert, grid_of):
    from flwr.clientapp import ClientApp

    from fedlora.client.client_app import handle_train
    from fedlora.model.adapters import from_record, to_record

    app = ClientApp()
    poisoned = []

    @app.train()
    def train(msg, context):
        reply = handle_train(msg, context)
        if context.node_config["partition-id"] == 1:  # sends NaN in place of its trained tensors
            state = from_record(reply.content["arrays"])
            reply.content["arrays"] = to_record({k: torch.full_like(v, float("nan")) for k, v in state.items()})
            poisoned.append(msg.metadata.dst_node_id)
        return reply

    flower = create_flower_strategy(config=tiny_config(tiny_bert))
    result = flower.start(grid=grid_of(3, app), num_rounds=1)
    assert result.train_metrics_clientapp[1]["clients-ok"] == 2
    (drop,) = flower.dropped[1]
    assert drop["node_id"] == poisoned[0] and "non-finite" in drop["reason"]
    assert all(torch.isfinite(v).all() for v in result.arrays.to_torch_state_dict().values())
