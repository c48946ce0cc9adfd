"""Heterogeneous clients: each its own precision, device and rank; what ``auto`` chooses; the
capability table the server prints and keeps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import federation_logits, peft_logits
from flwr.app import Context, RecordDict

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.run.progress import Progress
from fedlora.simulations.runtime import simulate
from fedlora.wire import protocol as P

pytestmark = pytest.mark.unit


def with_profiles(cfg: RunConfig, profiles: list[dict], **sections) -> RunConfig:
    raw = cfg.to_dict()
    raw["federation"]["profiles"] = profiles
    for section, values in sections.items():
        raw[section].update(values)
    return RunConfig.from_dict(raw)


def node_context(partition: int, **node_config) -> Context:
    config = {P.NODE_PARTITION_ID: partition, P.NODE_NUM_PARTITIONS: 3, **node_config}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


@pytest.mark.simulation
def test_one_federation_mixes_full_precision_8bit_and_4bit_clients(tmp_path, tiny_bert, make_config):
    """Each virtual client trains on its own base variant (loaded once each); the adapters
    aggregate together and the export loads on the full-precision base."""
    pytest.importorskip("bitsandbytes")
    from fedlora.model.loading import clear_cache, load_model
    from fedlora.process import MODEL, process_state

    clear_cache()

    profiles = [
        {"name": "server-gpu", "rank": 4, "quantization": "none"},
        {"name": "laptop", "rank": 4, "quantization": "8bit"},
        {"name": "phone", "rank": 4, "quantization": "4bit"},
    ]
    cfg = with_profiles(make_config(tiny_bert), profiles)
    out = tmp_path / "mixed"
    result = simulate(cfg, out=out, progress=Progress(quiet=True))

    assert [r["clients_ok"] for r in result.rounds] == [3, 3]
    nodes = json.loads((out / "nodes.json").read_text())
    assert sorted(n["quantization"] for n in nodes) == ["4bit", "8bit", "none"]
    assert {n["device"] for n in nodes} == {"cpu"} and {n["rank"] for n in nodes} == {4}
    # Three base variants in this process (each loaded once), really quantized as asked.
    assert process_state().count(MODEL) == 3
    for quantization, kind in (("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")):
        variant = load_model(cfg.model.replace(quantization=quantization), num_labels=4, seed=cfg.seed)
        assert kind in {type(m).__name__ for m in variant.model.modules()}
    assert process_state().count(MODEL) == 3
    tok_ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 22, 3, 0]])
    ours = federation_logits(cfg, out, tok_ids)
    theirs = peft_logits(tiny_bert, "classification", out / "adapter", tok_ids)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_node_takes_its_flag_then_its_profile_then_the_run(tiny_bert, make_config):
    from fedlora.client.node import node_model, node_rank

    cfg = with_profiles(
        make_config(tiny_bert, strategy="hetlora"),
        [{"name": "big", "rank": 4}, {"name": "small", "rank": 2, "quantization": "4bit", "device": "cpu"}],
    )
    assert node_model(cfg, node_context(0)).quantization == "none"  # profile leaves it empty: the run's
    assert node_model(cfg, node_context(1)).quantization == "4bit"
    assert node_model(cfg, node_context(1)).device == "cpu" and node_model(cfg, node_context(0)).device == "auto"
    assert node_rank(cfg, node_context(1)) == 2
    flagged = node_context(1, **{P.NODE_QUANTIZATION: "8bit", P.NODE_RANK: 3, P.NODE_DEVICE: "cpu"})
    assert node_model(cfg, flagged).quantization == "8bit" and node_rank(cfg, flagged) == 3


def test_auto_takes_the_least_quantized_then_largest_rank_that_fits_and_keeps_it(
    tiny_bert, make_config, monkeypatch, capsys
):
    import fedlora.client.node as node
    from fedlora.model.capacity import MARGIN, memory_needed
    from fedlora.model.loading import model_facts

    cfg = make_config(tiny_bert, strategy="hetlora", sets=("lora.rank=8",))
    facts = model_facts(cfg.model, list(cfg.lora.target_modules), batch=cfg.federation.batch_size, num_labels=4)
    auto = {P.NODE_QUANTIZATION: "auto", P.NODE_RANK: "auto", P.NODE_DATA_PATH: "/dev/null"}

    # Room for 8-bit at rank 4 but not for full precision, nor for 8-bit at rank 8.
    budget = int(memory_needed(facts, "8bit", 4) * (1 + MARGIN)) + 1
    assert memory_needed(facts, "none", 1) * (1 + MARGIN) > budget
    monkeypatch.setattr(node, "available_bytes", lambda device: budget)
    context = node_context(0, **auto)
    assert node.node_model(cfg, context, ["a", "b", "c", "d"]).quantization == "8bit"
    assert node.node_rank(cfg, context, ["a", "b", "c", "d"]) == 4
    assert "chose 8bit, rank 4 on cpu" in capsys.readouterr().out  # a device says what it chose

    # Measured once: the model it then loads (less memory free) does not change the answer.
    monkeypatch.setattr(node, "available_bytes", lambda device: 1)
    assert node.node_rank(cfg, context, ["a", "b", "c", "d"]) == 4
    with pytest.raises(ConfigError, match=r"nothing fits on cpu: 0\.00 GB free.*4bit, rank 1"):
        node.node_rank(cfg, node_context(0, **auto), ["a", "b", "c", "d"])

    # A strategy that trains every client at lora.rank only lets auto choose the precision.
    fedavg = make_config(tiny_bert, sets=("lora.rank=8",))
    monkeypatch.setattr(node, "available_bytes", lambda device: 1 << 40)
    assert node.node_rank(fedavg, node_context(0, **auto), ["a", "b", "c", "d"]) == 8


def test_strategies_that_fold_into_the_base_refuse_a_quantized_profile(tiny_bert, make_config):
    from fedlora.server import prepare

    cfg = with_profiles(make_config(tiny_bert, strategy="flora"), [{"rank": 4}, {"rank": 2, "quantization": "4bit"}])
    with pytest.raises(ConfigError, match=r"federation\.profiles\[1\]\.quantization': strategy 'flora'"):
        prepare(cfg)


def test_a_profile_that_cannot_fit_the_memory_it_declares_is_refused(tiny_bert, make_config):
    from fedlora.server import prepare
    from fedlora.server.server_app import check_profiles

    tiny = [{"name": "watch", "rank": 4, "quantization": "4bit", "memory_gb": 0.0001}]
    with pytest.raises(ConfigError, match=r"profiles\[0\]\.memory_gb': profile 'watch' \(4bit, rank 4.*0\.0001 GB"):
        prepare(with_profiles(make_config(tiny_bert), tiny))
    roomy = [{"name": "gpu", "rank": 4, "memory_gb": 1.0}]
    check_profiles(with_profiles(make_config(tiny_bert), roomy), 4, here=True)


def test_a_profile_device_this_machine_lacks_is_refused_in_simulation(tiny_bert, make_config):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    from fedlora.server.server_app import check_profiles

    cfg = with_profiles(make_config(tiny_bert), [{"rank": 4}, {"rank": 4, "device": "cuda:1"}])
    with pytest.raises(ConfigError, match=r"federation\.profiles\[1\]\.device': 'cuda:1' asked for"):
        check_profiles(cfg, 4, here=True)
    check_profiles(cfg, 4, here=False)  # a deployment's devices are not this machine


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("quantization", "2bit", "federation.profiles[0].quantization' must be one of"),
        ("device", "tpu", "federation.profiles[0].device' must be auto, cpu"),
        ("memory_gb", -1, "federation.profiles[0].memory_gb' must be >= 0"),
    ],
)
def test_profile_keys_are_checked(tiny_bert, make_config, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with_profiles(make_config(tiny_bert), [{"rank": 4, key: value}])


def test_the_capability_table():
    from fedlora.server.nodes import TABLE_ROWS, capability_table
    from fedlora.strategies import NodeInfo

    nodes = [
        NodeInfo(node_id=1, rank=8, device="cuda:0", memory_gb=80, num_examples=100, dtype="bfloat16"),
        NodeInfo(
            node_id=2,
            rank=2,
            device="cpu",
            memory_gb=8,
            num_examples=40,
            quantization="4bit",
            chosen={"auto": "quantization,rank", "quantization": "4bit", "rank": 2},
        ),
    ]
    lines = capability_table(nodes)
    assert lines[0] == "2 node(s):"
    assert lines[1].split() == ["node", "device", "precision", "dtype", "rank", "memory", "GB", "examples"]
    assert lines[2].split() == ["1", "cuda:0", "none", "bfloat16", "8", "80", "100"]
    assert lines[3].split() == ["2", "cpu", "4bit", "(auto)", "float32", "2", "(auto)", "8", "40"]
    # Beyond TABLE_ROWS nodes: a summary, one row per kind of node (largest group first).
    many = [NodeInfo(node_id=i, rank=4, num_examples=10 + i) for i in range(TABLE_ROWS + 5)]
    many += [NodeInfo(node_id=100 + i, rank=8, device="cuda:0", num_examples=7) for i in range(3)]
    lines = capability_table(many, total=1_000_000)
    assert lines[0] == f"{TABLE_ROWS + 8} node(s) of 1,000,000 (the others report when sampled):"
    assert lines[2].split() == [str(TABLE_ROWS + 5), "cpu", "none", "float32", "4", f"10-{10 + TABLE_ROWS + 4}"]
    assert lines[3].split() == ["3", "cuda:0", "none", "float32", "8", "7"]
    assert lines[-1].strip() == "every node: nodes.json" and len(lines) == 5
    assert capability_table([], total=5000) == ["5,000 node(s): capabilities are learnt as the nodes are sampled"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "--rank: must be an integer >= 1 or auto"),
        (["--quantization", "2bit"], "--quantization: invalid choice"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_client_capability_flags_are_checked_in_one_line(tmp_path, capsys, args, message):
    from fedlora.cli.deploy import client_main

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    with pytest.raises(SystemExit) as stop:
        code = client_main(["--server", "127.0.0.1:1", "--insecure", "--data", str(data), *args])
        raise SystemExit(code)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_client_asking_for_an_absent_gpu_is_told_in_one_line(tmp_path, capsys):
    from fedlora.cli.deploy import client_main

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\n")
    code = client_main(["--server", "127.0.0.1:1", "--insecure", "--data", str(data), "--device", "cuda"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device: 'cuda' asked for, but torch sees no CUDA device here" in err[0], err
