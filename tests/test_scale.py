"""Cross-device scale: costs follow the sampled clients, not the federation's size.

The node-state store (memory for the nodes served since the last checkpoint, files for the rest,
incremental checkpoints, a resume from the chain of files), the choice of clients that evaluate
and export, the in-process grid of a million nodes, sampling that is identical to the list-based
draw, and a personalized run whose start, evaluation and export touch the sampled clients only.
"""

from __future__ import annotations

import json
import random
import resource

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedlora.cli.main import main
from fedlora.config import EvaluationConfig
from fedlora.model.adapters import AdapterSpec
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.server.personal import evaluation_nodes, export_nodes
from fedlora.simulations.grid import FIRST_NODE_ID, InProcessGrid
from fedlora.simulations.node_store import FULL_MAGIC, NodeStateStore, scan
from fedlora.simulations.runtime import client_app, simulate
from fedlora.strategies import create

pytestmark = pytest.mark.unit


def state_of(value: int) -> RecordDict:
    return RecordDict({"kept": ConfigRecord({"value": value})})


def value(state: RecordDict) -> int:
    return int(state["kept"]["value"])


# -- the node-state store ----------------------------------------------------------------------------


def test_the_store_keeps_in_memory_only_the_nodes_served_since_the_last_checkpoint(tmp_path):
    store = NodeStateStore(range(10, 20))
    for node in (11, 12):
        store.put(node, state_of(node))
    first = tmp_path / "round_0001.nodes.pb"
    first.write_bytes(store.delta())
    store.saved(first)
    assert len(store) == 0  # written: out of memory
    assert value(store.state(12)) == 12 and len(store) == 1  # read back when the node is served again
    store.put(12, state_of(120))
    store.state(13)  # served, but left nothing: not written
    second = tmp_path / "round_0002.nodes.pb"
    second.write_bytes(store.delta())
    store.saved(second)
    assert sorted(scan(second)[1]) == [12]  # the second file holds what changed, not every node
    resumed = NodeStateStore(range(10, 20))
    resumed.restore([first, second])
    assert len(resumed) == 0  # nothing is read until a node is served
    assert value(resumed.state(11)) == 11 and value(resumed.state(12)) == 120 and len(resumed.state(14)) == 0
    only_first = NodeStateStore(range(10, 20))
    only_first.restore([first])  # resuming from round 1 sees round 1's states
    assert value(only_first.state(12)) == 12


def test_the_store_reads_the_earlier_full_format_and_refuses_foreign_nodes(tmp_path):
    from flwr.common.serde import recorddict_to_proto

    def entry(node: int, state: RecordDict) -> bytes:
        body = recorddict_to_proto(state).SerializeToString()
        return node.to_bytes(8, "little") + len(body).to_bytes(8, "little") + body

    old = tmp_path / "round_0003.nodes.pb"
    old.write_bytes(FULL_MAGIC + entry(1, state_of(7)) + entry(2, RecordDict()))
    store = NodeStateStore(range(1, 3))
    store.restore([old])
    assert value(store.state(1)) == 7 and len(store.state(2)) == 0
    with pytest.raises(Exception, match="saved for 2 node"):
        NodeStateStore(range(1, 4)).restore([old])
    (tmp_path / "cut.pb").write_bytes(old.read_bytes()[:-3])
    with pytest.raises(Exception, match="truncated"):
        store.restore([tmp_path / "cut.pb"])


# -- who evaluates and exports ---------------------------------------------------------------------


def test_evaluation_follows_the_trained_clients_and_covers_all_of_a_small_federation_last():
    trained = [7, 3]
    small, large = range(50), range(1_000_000)
    ev = EvaluationConfig()
    assert evaluation_nodes(ev, small, trained, 1, 3, 0) == [3, 7]
    assert evaluation_nodes(ev, small, trained, 3, 3, 0) == list(small)  # last round, <= 100 clients
    assert evaluation_nodes(ev, large, trained, 3, 3, 0) == [3, 7]  # a million: never all of them
    assert evaluation_nodes(ev.replace(clients="all"), small, trained, 1, 3, 0) == list(small)
    sample = evaluation_nodes(ev.replace(clients="sample", fraction=1e-5), large, trained, 1, 3, 0)
    assert len(sample) == 10 and sample == sorted(set(sample))
    assert sample == evaluation_nodes(ev.replace(clients="sample", fraction=1e-5), large, trained, 1, 3, 0)
    assert sample != evaluation_nodes(ev.replace(clients="sample", fraction=1e-5), large, trained, 2, 3, 0)


def test_exported_clients_are_the_ones_asked_for():
    grid = InProcessGrid(client_app, 1_000)
    ids = grid.get_node_ids()
    ev = EvaluationConfig()
    assert export_nodes(ev, ids, list(ids), grid) == list(ids)  # auto: everyone evaluated last
    assert export_nodes(ev, ids, [ids[3]], grid) == []  # auto, a sample evaluated: nobody
    assert export_nodes(ev.replace(export_clients=[5, 2, 5, 4000]), ids, [], grid) == [
        FIRST_NODE_ID + 2,
        FIRST_NODE_ID + 5,
    ]
    assert export_nodes(ev.replace(export_clients="none"), ids, list(ids), grid) == []


# -- a million nodes -------------------------------------------------------------------------------


def test_a_million_node_grid_costs_nothing_and_samples_as_before(tiny_bert, make_config):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grid = InProcessGrid(client_app, 1_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KB: no per-node objects
    assert isinstance(grid.get_node_ids(), range) and FIRST_NODE_ID + 999_999 in grid.get_node_ids()
    cfg = make_config(tiny_bert, sets=("federation.clients=1000000", "federation.fraction=0.00002"))
    strategy = create(cfg, AdapterSpec.from_config(cfg.lora, cfg.model.task))
    drawn = strategy.draw(grid, 4)
    # The draw of the list of node ids it replaced, with the same seed: bit-identical sampling.
    listed = sorted(random.Random(cfg.seed * 100_003 + 4).sample(list(grid.get_node_ids()), 20))
    assert drawn == listed and len(drawn) == 20
    small = InProcessGrid(client_app, 5)
    three = make_config(tiny_bert, sets=("federation.clients=5", "federation.fraction=0.6"))
    assert create(three, AdapterSpec.from_config(three.lora, three.model.task)).draw(small, 2) == sorted(
        random.Random(2).sample(list(small.get_node_ids()), 3)
    )


# -- a personalized run at a scale where every node would be too many -------------------------------


def fedsa_at_scale(tiny_bert, make_config, *sets: str):
    return make_config(
        tiny_bert,
        strategy="fedsa",
        sets=(
            "federation.clients=300",
            "federation.fraction=0.02",
            "federation.local_steps=1",
            "data.partitioner=iid",
            "data.max_train_examples=600",
            *sets,
        ),
    )


@pytest.mark.simulation
def test_a_large_fedsa_run_touches_the_sampled_clients_only(tmp_path, tiny_bert, make_config, capsys):
    cfg = fedsa_at_scale(tiny_bert, make_config)
    lines: list[str] = []
    progress = Progress(quiet=True)
    progress.line = lines.append
    result = simulate(cfg, out=tmp_path / "run", progress=progress, report=False)
    run = tmp_path / "run"
    sampled = [{c["node_id"] for c in r["clients"] if "train_loss" in c or "seconds" in c} for r in result.rounds]
    nodes = json.loads((run / "nodes.json").read_text())
    assert 0 < len(nodes) <= sum(len(s) for s in sampled) and len(nodes) < 300  # not every node reported
    assert any("of 300 (the others report when sampled)" in line for line in lines)
    for record in result.rounds:  # each round evaluates the clients that trained, not all 300
        evaluated = [c for c in record["clients"] if "eval_accuracy" in c]
        assert 0 < len(evaluated) == record["clients_ok"] <= 6
    assert not (run / "clients").exists()  # no folder per client by default
    # Each checkpoint holds the nodes its round served, not every node.
    for r in (1, 2):
        assert 0 < len(scan(run / "checkpoints" / f"round_{r:04d}.nodes.pb")[1]) <= 6
    # One client's adapter on request, from its own kept B; it loads in peft.
    partition = next(iter(sampled[-1])) - FIRST_NODE_ID
    assert main(["export", str(run), "--client", str(partition)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["round"] == 2 and (run / "clients" / str(partition) / "adapter" / "adapter_config.json").is_file()
    assert 0.0 <= out["metrics"]["eval_accuracy"] <= 1.0
    assert main(["export", str(run), "--client", "300"]) == 2
    assert "--client must be a partition id in [0, 299], got 300" in capsys.readouterr().err


@pytest.mark.simulation
def test_a_large_fedsa_run_resumes_bit_exact_from_its_incremental_node_files(tmp_path, tiny_bert, make_config):
    from fedlora.server.rounds import RoundLoop

    cfg = fedsa_at_scale(tiny_bert, make_config, "rounds=3", "evaluation.export_clients=[0, 7]")
    simulate(cfg, out=tmp_path / "whole", progress=Progress(quiet=True), report=False)
    original = RoundLoop.round

    class Killed(Exception):
        pass

    def round_then_die(self, server_round, state, result):
        if server_round == 3:
            raise Killed
        return original(self, server_round, state, result)

    RoundLoop.round = round_then_die
    try:
        with pytest.raises(Killed):
            simulate(cfg, out=tmp_path / "cut", progress=Progress(quiet=True), report=False)
    finally:
        RoundLoop.round = original
    simulate(cfg, out=tmp_path / "cut", resume=True, progress=Progress(quiet=True), report=False)
    whole, cut = (
        RunDirectory(tmp_path / "whole").load_checkpoint()[1],
        RunDirectory(tmp_path / "cut").load_checkpoint()[1],
    )
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    for partition in (0, 7):  # asked for by evaluation.export_clients; their kept B survived the resume
        rel = f"clients/{partition}/adapter/adapter_model.safetensors"
        assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "cut" / rel).read_bytes()
    assert sorted(p.name for p in (tmp_path / "whole" / "clients").iterdir()) == ["0", "7"]


@pytest.mark.simulation
def test_export_refuses_a_strategy_without_per_client_adapters(tmp_path, tiny_bert, make_config, capsys):
    simulate(
        make_config(tiny_bert, sets=("rounds=1",)), out=tmp_path / "avg", progress=Progress(quiet=True), report=False
    )
    assert main(["export", str(tmp_path / "avg"), "--client", "0"]) == 2
    assert "strategy 'fedavg' trains one global adapter, no per-client ones" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--client", "0"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
