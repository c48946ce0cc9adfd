"""Flower's own Ray simulation runs the same ServerApp and ClientApp (kept few: Ray starts slowly)."""

from __future__ import annotations

import json

import pytest

from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate

pytestmark = [pytest.mark.ray, pytest.mark.simulation]


PROFILES = "federation.profiles=[{name='phone',rank=1},{name='tablet',rank=2},{name='laptop',rank=4}]"


@pytest.mark.parametrize(
    ("task", "strategy", "sets"),
    [
        ("classification", "fedavg", ()),
        ("causal_lm", "ffa", ()),
        # Ranks come from the clients' query replies, whatever node ids Ray assigns.
        ("classification", "hetlora", (PROFILES,)),
    ],
)
def test_ray_backend_matches_inprocess(tmp_path, tiny_bert, tiny_gpt2, make_config, task, strategy, sets):
    import torch

    model_dir = tiny_bert if task == "classification" else tiny_gpt2
    cfg = make_config(model_dir, task=task, strategy=strategy, sets=sets)
    simulate(cfg, out=tmp_path / "ray", backend="ray", progress=Progress(quiet=True), ray_cpus_per_client=1.0)
    simulate(cfg, out=tmp_path / "local", progress=Progress(quiet=True))
    lines = [json.loads(x) for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and all(r["clients_ok"] == 3 for r in lines)
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").exists()
    # Same seed, full participation: the two runtimes compute the same federation.
    _, ray_state, _ = RunDirectory(tmp_path / "ray").load_checkpoint()
    _, local_state, _ = RunDirectory(tmp_path / "local").load_checkpoint()
    for key in local_state:
        assert torch.allclose(ray_state[key], local_state[key], atol=1e-5), key
