"""``simulation.devices``: the in-process simulation on several devices of one machine.

Two CPU "devices" are two lanes (this process and one worker process, each with its own base
model): the same federation on them gives bit-identical adapters to one lane, because each
client's training is seeded per client and the server aggregates in sampling order. The GPU
tests skip cleanly without CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch
from conftest import process_alive
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.errors import ConfigError, RunFailed
from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.simulations import grid as G
from fedlora.simulations import runtime
from fedlora.simulations.runtime import simulate, simulation_devices
from fedlora.wire.protocol import NODE_DEVICE

pytestmark = pytest.mark.unit

PROFILES = "federation.profiles=[{name='phone',rank=1},{name='tablet',rank=2},{name='laptop',rank=4}]"
TWO_CPUS = "simulation.devices=['cpu','cpu']"


# -- the resolver ----------------------------------------------------------------------------------


def test_explicit_devices_are_resolved_as_given(tiny_bert, make_config):
    cfg = make_config(tiny_bert, sets=("simulation.devices=['cuda','cuda:1','cpu','cuda:1']",))
    assert simulation_devices(cfg, cuda_count=2) == ["cuda:0", "cuda:1", "cpu", "cuda:1"]
    assert simulation_devices(make_config(tiny_bert, sets=(TWO_CPUS,)), cuda_count=0) == ["cpu", "cpu"]


@pytest.mark.parametrize(
    ("cuda_count", "model_device", "expected"),
    [
        (0, "auto", ["cpu"]),
        (1, "auto", ["cuda:0"]),
        (2, "auto", ["cuda:0", "cuda:1"]),  # auto: every visible GPU
        (2, "cuda:1", ["cuda:1"]),  # a named device stays the only one
        (2, "cpu", ["cpu"]),
    ],
)
def test_default_devices(tiny_bert, make_config, cuda_count, model_device, expected):
    cfg = make_config(tiny_bert, sets=(f"model.device='{model_device}'",))
    assert simulation_devices(cfg, cuda_count=cuda_count) == expected


def test_a_device_that_is_not_there_is_one_line(tiny_bert, make_config, tmp_path):
    cfg = make_config(tiny_bert, sets=("simulation.devices=['cpu','cuda:99']",))
    with pytest.raises(ConfigError, match=r"simulation\.devices\[1\]") as err:
        simulation_devices(cfg, cuda_count=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"simulation\.devices\[1\]"):
        simulate(cfg, out=tmp_path / "run", progress=Progress(quiet=True), report=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_ray_refuses_explicit_devices(tiny_bert, make_config, tmp_path):
    cfg = make_config(tiny_bert, sets=(TWO_CPUS,))
    with pytest.raises(ConfigError, match=r"simulation\.devices.*in-process backend") as err:
        simulate(cfg, out=tmp_path / "run", backend="ray", progress=Progress(quiet=True), report=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_one_device_builds_the_grid_as_before(tiny_bert, make_config):
    """No ``simulation.devices`` on a machine with one device: no lanes, no device in node config."""
    assert runtime.grid_devices(make_config(tiny_bert, sets=("model.device='cpu'",))) == []
    assert runtime.grid_devices(make_config(tiny_bert, sets=(TWO_CPUS,))) == ["cpu", "cpu"]


# -- two CPU lanes give the adapter of one ---------------------------------------------------------


@pytest.fixture
def grids(monkeypatch):
    """The Grids the runtime builds, kept for inspection after the run. ``alternate`` (a list
    with one bool) makes each node's train messages take the two lanes in turn, so the state a
    node keeps must follow it from this process to the worker and back."""
    made: list[G.InProcessGrid] = []
    alternate = [False]

    class Recorded(G.InProcessGrid):
        def __init__(self, *args, **kwargs):
            self.turns: dict[int, int] = {}
            super().__init__(*args, **kwargs)
            made.append(self)

        def _choose_lane(self, msg, free):
            if not alternate[0] or msg.metadata.message_type != "train":
                return super()._choose_lane(msg, free)
            node = msg.metadata.dst_node_id
            lane = self.turns.get(node, node % 2) % len(self.devices)
            if lane not in free:
                return None
            self.turns[node] = lane + 1
            return lane

    monkeypatch.setattr(runtime, "InProcessGrid", Recorded)
    return made, alternate


def _adapter_files(out):
    from safetensors.torch import load_file

    return {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("adapter_model.safetensors"))}


def _per_client(out):
    """Each round's per-client numbers that depend on what was computed (not on timing)."""
    keep = ("node_id", "num_examples", "train_loss", "rank", "rank_trained", "rank_next", "eval_accuracy")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        (r.get("eval_accuracy"), sorted((tuple(c.get(k) for k in keep) for c in r["clients"]), key=str)) for r in rounds
    ]


@pytest.mark.simulation
@pytest.mark.parametrize(
    ("strategy", "sets", "alternate"),
    [
        ("fedavg", (), False),  # the lanes as they come (lane 0 first when free)
        ("hetlora", (PROFILES, "strategy.prune_threshold=0.5"), True),  # the rank a node pruned to
        ("fedsa", (), True),  # each node's own B, kept in its state and evaluated at the end
    ],
)
def test_two_cpu_devices_give_the_adapter_of_one(tmp_path, tiny_bert, make_config, grids, strategy, sets, alternate):
    base = ("federation.clients=4", "model.device='cpu'", *sets)
    one = make_config(tiny_bert, strategy=strategy, sets=base)
    two = make_config(tiny_bert, strategy=strategy, sets=(*base, TWO_CPUS))
    simulate(one, out=tmp_path / "one", progress=Progress(quiet=True), report=False)
    made, alternating = grids
    alternating[0] = alternate
    simulate(two, out=tmp_path / "two", progress=Progress(quiet=True), report=False)

    sequential, lanes = made
    assert sequential.devices == [] and sequential.worker_pids == []
    assert lanes.devices == ["cpu", "cpu"]
    # Both lanes served clients: this process and the worker process.
    assert all(n > 0 for n in lanes.lane_deliveries), lanes.lane_deliveries
    if alternate:  # every node trained on both lanes
        for node in lanes.get_node_ids():
            assert {k for k, n, kind in lanes.lane_log if n == node and kind == "train"} == {0, 1}, lanes.lane_log
    assert len(lanes.worker_pids) == 1 and not process_alive(lanes.worker_pids[0])  # stopped with the run
    assert all(not os.path.exists(w.directory) for w in lanes._workers.values())

    _, a, extra_a = RunDirectory(tmp_path / "one").load_checkpoint()
    _, b, extra_b = RunDirectory(tmp_path / "two").load_checkpoint()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    exported_a, exported_b = _adapter_files(tmp_path / "one"), _adapter_files(tmp_path / "two")
    assert exported_a.keys() == exported_b.keys() and exported_a
    for name, tensors in exported_a.items():
        assert all(torch.equal(t, exported_b[name][k]) for k, t in tensors.items()), name
    assert _per_client(tmp_path / "one") == _per_client(tmp_path / "two")


# -- the lanes themselves --------------------------------------------------------------------------


@pytest.mark.simulation
def test_lane_errors_and_a_dead_worker(monkeypatch):
    """On a worker lane a client's exception is the error reply lane 0 would send; a worker that
    dies stops the run in one line; close() leaves nothing behind."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    import fedlora.client.client_app as client_module

    # Message() stamps the sender from TaskIdentity, which the runtime sets for a whole run.
    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)

    release, seen = threading.Event(), []
    app = ClientApp()

    @app.query()
    def blocked(msg, context):  # lane 0 holds this until released, so the worker lane takes the rest
        seen.append(dict(context.node_config))
        context.state["touched"] = ConfigRecord({"yes": True})
        release.wait(60)
        return Message(RecordDict(), reply_to=msg)

    grid = G.InProcessGrid(app, 3, devices=["cpu", "cpu"])
    try:
        nodes = sorted(grid.get_node_ids())
        hold = grid.push_messages([grid.create_message(RecordDict(), "query", nodes[0], "g")])
        bad = Message(RecordDict(), nodes[1], "train", group_id="g")
        ids = grid.push_messages([bad])
        replies = []
        for _ in range(600):
            replies += grid.pull_messages(ids)
            if replies:
                break
        assert len(replies) == 1 and replies[0].has_error()
        with pytest.raises(Exception) as direct:  # what the same message raises in this process
            client_module.handle_train(bad, grid._context(nodes[1]))
        assert replies[0].error.reason == f"{type(direct.value).__name__}: {direct.value}"
        assert grid.lane_deliveries == [0, 1]

        os.kill(grid.worker_pids[0], signal.SIGKILL)
        ids = grid.push_messages([grid.create_message(RecordDict(), "query", nodes[2], "g")])
        with pytest.raises(RunFailed, match=r"simulation\.devices\[1\] \(cpu\): its worker process stopped") as err:
            for _ in range(600):
                grid.pull_messages(ids)
        assert "\n" not in str(err.value)
    finally:
        release.set()
        grid.close()
    assert len(seen) == 1 and seen[0][NODE_DEVICE] == "cpu"  # lane 0 (preferred when free) ran node 0
    assert "touched" in grid.store.state(nodes[0])  # ... and the node kept the state it left
    assert NODE_DEVICE not in grid._context(nodes[0]).node_config  # the device is per delivery
    assert hold[0] in grid._replies  # lane 0 finished what it held once released
    assert all(not os.path.exists(w.directory) for w in grid._workers.values())


# -- GPUs --------------------------------------------------------------------------------------------


@pytest.mark.simulation
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_lanes_on_one_gpu_give_the_adapter_of_one(tmp_path, tiny_bert, make_config, grids):
    base = ("federation.clients=4", "model.device='cuda:0'")
    simulate(make_config(tiny_bert, sets=base), out=tmp_path / "one", progress=Progress(quiet=True), report=False)
    two = make_config(tiny_bert, sets=(*base, "simulation.devices=['cuda:0','cuda:0']"))
    simulate(two, out=tmp_path / "two", progress=Progress(quiet=True), report=False)
    assert all(n > 0 for n in grids[0][1].lane_deliveries)
    _, a, _ = RunDirectory(tmp_path / "one").load_checkpoint()
    _, b, _ = RunDirectory(tmp_path / "two").load_checkpoint()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.simulation
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_every_gpu_by_default_gives_the_adapter_of_one(tmp_path, tiny_bert, make_config, grids):
    """``model.device = auto`` on a machine with several GPUs uses all of them by default. The
    GPUs of one machine are assumed to be of one model (the same kernels, the same floats)."""
    base = ("federation.clients=4",)
    one = make_config(tiny_bert, sets=(*base, "simulation.devices=['cuda:0']"))
    simulate(one, out=tmp_path / "one", progress=Progress(quiet=True), report=False)
    simulate(make_config(tiny_bert, sets=base), out=tmp_path / "all", progress=Progress(quiet=True), report=False)
    assert grids[0][1].devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert sum(1 for n in grids[0][1].lane_deliveries if n > 0) >= 2
    _, a, _ = RunDirectory(tmp_path / "one").load_checkpoint()
    _, b, _ = RunDirectory(tmp_path / "all").load_checkpoint()
    assert all(torch.equal(a[k], b[k]) for k in a)
