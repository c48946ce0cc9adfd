"""pFedLoRA: clients of different base models sharing one homogeneous adapter.

The pure math on hand-made tensors (the adapter average, the alternating phases, what a node
keeps), a 2-round federation of two tiny BERTs of different widths and depths whose clients'
exported bundles reload on their own bases with the federation's logits, and bad values as
one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import RecordDict

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, FedLoraError
from fedlora.strategies import NodeStore, get_strategy_class, load_bundle, pfedlora_aggregate
from fedlora.strategies.pfedlora import (
    INIT_SEED,
    LOCAL_MODEL_STEPS,
    PFedLoRAClient,
    alternating,
    shared_adapter,
)
from fedlora.strategies.pfedlora_head import HeadSpec, initial_private, is_shared
from fedlora.wire import protocol as P

pytestmark = pytest.mark.unit

HEAD = "base_model.model.classifier.modules_to_save"
A_KEY, B_KEY = f"{HEAD}.pfedlora_A", f"{HEAD}.pfedlora_B"
LORA_B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
PROJECT = f"{HEAD}.project.weight"


def small_bert(directory, hidden: int, layers: int, seed: int) -> str:
    """A random BERT encoder of the given width and depth, with the tiny tokenizer, saved."""
    from transformers import BertConfig, BertModel

    from fedlora.data.synthetic import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def two_bases(make_config, big: str, small: str, *sets: str) -> RunConfig:
    profiles = f"federation.profiles=[{{name='big',rank=4}},{{name='small',rank=4,model='{small}'}}]"
    options = ("strategy.adapter_width=16", "strategy.adapter_rank=4")
    steps = ("strategy.local_model_steps=2", "strategy.adapter_steps=2")
    return make_config(big, strategy="pfedlora", sets=(profiles, *options, *steps, *sets))


def test_the_adapter_average_is_the_exact_weighted_mean():
    a1 = {A_KEY: torch.tensor([[1.0, 2.0]]), B_KEY: torch.tensor([[4.0], [0.0]])}
    a2 = {A_KEY: torch.tensor([[5.0, -2.0]]), B_KEY: torch.tensor([[0.0], [8.0]])}
    out = pfedlora_aggregate([a1, a2], [1, 3])
    assert torch.equal(out[A_KEY], torch.tensor([[4.0, -1.0]]))
    assert torch.equal(out[B_KEY], torch.tensor([[1.0], [6.0]]))
    with pytest.raises(ValueError, match="identical keys and shapes"):
        pfedlora_aggregate([a1, {A_KEY: torch.zeros(2, 2), B_KEY: a2[B_KEY]}], [1, 1])


def test_only_the_adapter_crosses_the_network():
    state = {A_KEY: torch.ones(2, 4), B_KEY: torch.zeros(4, 2), PROJECT: torch.ones(4, 8), LORA_A: torch.ones(2, 8)}
    assert set(shared_adapter(state)) == {A_KEY, B_KEY}
    assert is_shared(A_KEY) and not is_shared(PROJECT) and not is_shared(LORA_B)


def test_alternating_trains_the_local_model_then_the_adapter():
    """Steps 0-1 move the personal tensors alone, steps 2-3 the shared adapter alone."""
    model = torch.nn.Module()
    model.head = torch.nn.Module()
    model.head.pfedlora_A = torch.nn.Parameter(torch.ones(2))
    model.head.project = torch.nn.Parameter(torch.ones(2))
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    moved = []
    with alternating(model, 2) as before_step:
        for step in range(4):
            before_step(step)
            before = [p.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            sum((p**2).sum() for p in params if p.requires_grad).backward()
            optimizer.step()
            moved.append([not torch.equal(b, p.detach()) for b, p in zip(before, params)])
    assert moved == [[False, True], [False, True], [True, False], [True, False]]


def test_the_node_keeps_its_personal_part_and_starts_it_the_same_everywhere():
    shapes = {A_KEY: (4, 16), B_KEY: (16, 4), PROJECT: (16, 32), LORA_A: (8, 32), LORA_B: (32, 8)}
    received = {A_KEY: torch.ones(4, 16), B_KEY: torch.ones(16, 4)}
    hooks = PFedLoRAClient({INIT_SEED: 3, LOCAL_MODEL_STEPS: 2})
    store = NodeStore(RecordDict())
    first = hooks.kept(shapes, received, store)
    assert set(first) == {PROJECT, LORA_A, LORA_B}  # never the received adapter
    assert float(first[LORA_B].abs().max()) == 0 and float(first[PROJECT].abs().max()) > 0
    again = PFedLoRAClient({INIT_SEED: 3}).kept(shapes, received, NodeStore(RecordDict()))
    assert all(torch.equal(first[k], again[k]) for k in first)  # a function of the seed alone
    trained = {k: v + 1 for k, v in first.items()}
    hooks.keep(store, trained)
    kept = hooks.kept(shapes, received, store)
    assert all(torch.equal(kept[k], trained[k]) for k in trained)
    out, _ = hooks.after_train(dict(received), 8)
    assert set(out) == {A_KEY, B_KEY}
    assert set(initial_private(shapes, 0)) == set(shapes)


def test_the_head_has_the_same_adapter_shapes_on_bases_of_different_widths():
    from transformers import BertConfig, BertForSequenceClassification

    spec = HeadSpec(width=16, rank=4, alpha=8.0, seed=0)
    shapes = []
    for hidden in (32, 16):
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=50,
                hidden_size=hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=3,
            )
        )
        spec.install(model)
        shapes.append({n: tuple(p.shape) for n, p in model.classifier.named_parameters() if is_shared(n)})
        assert tuple(model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape) == (1, 3)
    assert shapes[0] == shapes[1] == {"pfedlora_A": (4, 16), "pfedlora_B": (16, 4)}


@pytest.mark.parametrize(
    "sets, key",
    [
        (("strategy.adapter_rank=32", "strategy.adapter_width=16"), "strategy.adapter_rank"),
        (("strategy.adapter_width=1",), "strategy.adapter_width"),
        (("strategy.local_model_steps=-1",), "strategy.local_model_steps"),
        (("strategy.local_model_steps=0", "strategy.adapter_steps=0"), "strategy.adapter_steps"),
        (("strategy.adapter_alpha=0",), "strategy.adapter_alpha"),
        (("strategy.bogus=1",), "strategy.bogus"),
        (("federation.local_epochs=1",), "federation.local_epochs"),
        (("privacy.mode='local'", "privacy.noise_multiplier=1.0"), "privacy.mode"),
        (
            ("federation.profiles=[{name='a',rank=4},{name='b',rank=4,model='./no/such'}]",),
            "federation.profiles[1].model",
        ),
    ],
)
def test_bad_values_are_one_line_errors(tiny_bert, make_config, sets, key):
    with pytest.raises(ConfigError) as err:
        cfg = make_config(tiny_bert, strategy="pfedlora", sets=sets)
        get_strategy_class("pfedlora").check_setup(cfg, [])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_other_strategies_refuse_a_profile_base_and_mixed_head_families(tiny_bert, tiny_gpt2, make_config):
    profiles = f"federation.profiles=[{{name='a',rank=4}},{{name='b',rank=4,model='{tiny_gpt2}'}}]"
    with pytest.raises(ConfigError, match=r"'federation.profiles\[1\].model'.*pfedlora"):
        get_strategy_class("fedavg").check_setup(make_config(tiny_bert, sets=(profiles,)), [])
    with pytest.raises(ConfigError, match="head's module path"):
        get_strategy_class("pfedlora").check_setup(make_config(tiny_bert, strategy="pfedlora", sets=(profiles,)), [])


def test_fedlora_client_checks_its_model_flag(tmp_path):
    from fedlora.client.launcher import ClientOptions, check_model_option, node_config

    for bad, why in (("it's", "no spaces or quotes"), ("./missing", "no such folder"), (str(tmp_path), "config.json")):
        with pytest.raises(FedLoraError, match=why):
            check_model_option(bad)
    check_model_option("sentence-transformers/all-MiniLM-L6-v2")
    (tmp_path / "config.json").write_text("{}")
    check_model_option(str(tmp_path))
    opts = ClientOptions(server="127.0.0.1:9092", data=tmp_path / "d.csv", model=str(tmp_path))
    assert f"{P.NODE_MODEL}='{tmp_path.resolve()}'" in node_config(opts)


@pytest.mark.simulation
def test_two_bases_federate_and_each_client_reloads_its_own_bundle(tmp_path, tiny_bert, make_config, monkeypatch):
    """A 2-layer width-32 and a 1-layer width-16 BERT in one 2-round federation: only the adapter
    is sent, of one shape for all; every client's bundle reloads on its own base and gives the
    logits its model had in the federation."""
    from fedlora.client import client_app
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    small = small_bert(tmp_path / "small", hidden=16, layers=1, seed=1)
    cfg = two_bases(make_config, tiny_bert, small)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    sent, logits = [], {}
    train, evaluate = client_app.handle_train, client_app.handle_evaluate

    def spy_train(msg, context):
        sent.append({k: tuple(v.shape) for k, v in client_app.from_record(msg.content[P.ARRAYS]).items()})
        return train(msg, context)

    def spy_evaluate(msg, context):
        reply = evaluate(msg, context)
        s = client_app.setup(msg, context)
        with s.host.lock, torch.no_grad():  # the node's model is still installed after its evaluation
            s.host.peft_model.eval()
            logits[client_app.node_index(context)] = s.host.peft_model(input_ids=ids).logits.clone()
        return reply

    monkeypatch.setattr(client_app, "handle_train", spy_train)
    monkeypatch.setattr(client_app, "handle_evaluate", spy_evaluate)
    out = tmp_path / "run"
    simulate(cfg, out=out, progress=Progress(quiet=True), report=False)
    assert sent and all(s == {A_KEY: (4, 16), B_KEY: (16, 4)} for s in sent)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(0 <= r["eval_accuracy"] <= 1 for r in records)
    for node in range(3):
        bundle = out / "clients" / str(node) / "adapter"
        meta = json.loads((bundle / "fedlora.json").read_text())
        assert meta["base_model"] == (tiny_bert if node % 2 == 0 else small)
        with torch.no_grad():
            reloaded = load_bundle(bundle)(input_ids=ids).logits
        torch.testing.assert_close(reloaded, logits[node], rtol=1e-5, atol=1e-6)
