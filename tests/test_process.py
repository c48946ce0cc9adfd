"""The per-process store: one base model and one adapter host serve every virtual client."""

from __future__ import annotations

import pytest

from fedlora.process import HOST, MODEL, NODE_DATA, TASK_DATA, ProcessState, process_state
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate

pytestmark = pytest.mark.unit


def test_store_builds_once_and_clears_by_kind():
    store = ProcessState()
    built = []
    assert store.get("a", 1, lambda: built.append(1) or "x") == "x"
    assert store.get("a", 1, lambda: built.append(2) or "y") == "x"  # built once
    store.get("b", 1, lambda: "z")
    assert built == [1] and store.count() == 2
    store.clear("a")
    assert store.peek("a", 1) is None and store.peek("b", 1) == "z"
    store.clear()
    assert store.count() == 0


@pytest.mark.simulation
def test_virtual_clients_share_one_base_model(tmp_path, tiny_bert, make_config):
    process_state().clear()
    cfg = make_config(tiny_bert, sets=("rounds=1", "federation.clients=4"))
    simulate(cfg, out=tmp_path / "run", progress=Progress(quiet=True))
    store = process_state()
    assert store.count(MODEL) == 1 and store.count(HOST) == 1  # server and 4 clients, one model
    assert store.count(TASK_DATA) == 1  # the data was read once
    assert store.count(NODE_DATA) == 4  # one partition per client
    process_state().clear()
    assert store.count() == 0
