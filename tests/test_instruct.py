"""Instruction and chat data for causal LMs: templates, response-only loss masks checked token by
token with real (offline-trained, byte-level BPE) tokenizers, truncation from the prompt side,
one-line config errors, and a 2-round instruction-tuning federation through ``fedlora simulate``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.config import DataConfig, RunConfig, load_config
from fedlora.data import collate
from fedlora.data.instruct import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    VICUNA_SYSTEM,
    encode_pairs,
    encode_rows,
    render_prompt,
)
from fedlora.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

# A chat template in the ChatML layout (Qwen's): every turn ends with the EOS, <|im_end|>.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    ALPACA_WITH_INPUT,
    ALPACA_NO_INPUT,
    VICUNA_SYSTEM,
    "Give three tips for staying healthy. Eat a balanced diet, exercise, and sleep well.",
    "Translate the sentence into French. The cat sleeps on the mat. Le chat dort sur le tapis.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system USER: ASSISTANT: hello world",
]
ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, move, sleep."},
    {
        "instruction": "Translate the sentence into French.",
        "input": "The cat sleeps on the mat.",
        "output": "Le chat dort sur le tapis.",
    },
]


def _tokenizer(*, bos: bool, chat: bool):
    """A byte-level BPE tokenizer trained here on a few strings (lossless on any text): with a
    BOS it adds itself (Llama-like) or none (GPT-2/Qwen-like), with a ChatML template or none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>" if chat else "</s>", pad_token="<pad>"
    )
    if chat:
        out.chat_template = CHATML
    return out


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(bos=False, chat=False)


@pytest.fixture(scope="module")
def bos_tok():
    return _tokenizer(bos=True, chat=False)


@pytest.fixture(scope="module")
def chat_tok():
    return _tokenizer(bos=False, chat=True)


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _split_by_labels(tok, pairs, max_length=4096):
    """(masked text, learned text) of every row, read back from a padded batch's labels."""
    enc = encode_pairs(pairs, tok, max_length)
    batch = collate(enc, list(range(len(pairs))), tok.pad_token_id, causal=True)
    out = []
    for j, row in enumerate(enc.input_ids):
        labels = batch["labels"][j]
        width = len(row)
        assert (labels[width:] == -100).all()  # padding is never learned
        assert torch.equal(batch["input_ids"][j, :width], torch.tensor(row))
        learned = [t for t, lab in zip(row, labels[:width].tolist()) if lab != -100]
        masked = [t for t, lab in zip(row, labels[:width].tolist()) if lab == -100]
        # The mask is one prefix: prompt, then response, never interleaved.
        assert labels[: len(masked)].eq(-100).all() and labels[len(masked) : width].ne(-100).all()
        assert learned == labels[len(masked) : width].tolist()  # targets are the inputs themselves
        out.append((_decode(tok, masked), _decode(tok, learned)))
    return out


def _data(**kw) -> DataConfig:
    return DataConfig(**{"format": "instruction", **kw})


@pytest.mark.parametrize("bos", [False, True])
def test_alpaca_masks_exactly_the_prompt(bos, plain_tok, bos_tok):
    tok = bos_tok if bos else plain_tok
    data = _data(template="alpaca")
    pairs = [render_prompt(row, data, tok) for row in ALPACA_ROWS]
    assert pairs[0] == (ALPACA_NO_INPUT.format(instruction=ALPACA_ROWS[0]["instruction"]), "Eat well, move, sleep.")
    with_input = ALPACA_WITH_INPUT.format(instruction=ALPACA_ROWS[1]["instruction"], input=ALPACA_ROWS[1]["input"])
    assert pairs[1] == (with_input, "Le chat dort sur le tapis.")
    assert pairs[1][0].endswith("### Input:\nThe cat sleeps on the mat.\n\n### Response:\n")
    lead = "<s>" if bos else ""
    for (prompt, response), (masked, learned) in zip(pairs, _split_by_labels(tok, pairs)):
        assert masked == lead + prompt
        assert learned == response + "</s>"


def test_missing_input_column_or_nan_cell_means_no_input(plain_tok):
    data = _data()
    no_input = ALPACA_NO_INPUT.format(instruction="Say hi.")
    for row in (
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Say hi.", "input": float("nan"), "output": "Hi."},
        {"instruction": "Say hi.", "input": " ", "output": "Hi."},
    ):
        assert render_prompt(row, data, plain_tok) == (no_input, "Hi.")
    dolly = _data(input_column="context", response_column="response")
    row = {"instruction": "Summarise.", "context": "A long text.", "response": "Short."}
    assert render_prompt(row, dolly, plain_tok) == (
        ALPACA_WITH_INPUT.format(instruction="Summarise.", input="A long text."),
        "Short.",
    )


def test_vicuna_masks_exactly_the_prompt(plain_tok):
    data = _data(template="vicuna")
    pairs = [render_prompt(row, data, plain_tok) for row in ALPACA_ROWS]
    assert pairs[0] == (
        f"{VICUNA_SYSTEM} USER: Give three tips for staying healthy. ASSISTANT:",
        " Eat well, move, sleep.",
    )
    assert pairs[1][0] == (
        f"{VICUNA_SYSTEM} USER: Translate the sentence into French.\n\nThe cat sleeps on the mat. ASSISTANT:"
    )
    for (prompt, response), (masked, learned) in zip(pairs, _split_by_labels(plain_tok, pairs)):
        assert (masked, learned) == (prompt, response + "</s>")


def test_chat_template_instruction_and_conversation(chat_tok):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    chat = DataConfig(format="chat", template="chat")
    prompt, response = render_prompt({"messages": conversation}, chat, chat_tok)
    assert prompt == chat_tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    assert response == "Rome."
    # Prompt + response + EOS is what the tokenizer's own template renders for the whole chat.
    full = chat_tok.apply_chat_template(conversation, tokenize=False)
    assert full.startswith(prompt + response + chat_tok.eos_token)
    # Turns after the last assistant turn are not part of the example.
    trailing = {"messages": [*conversation, {"role": "user", "content": "Thanks"}]}
    assert render_prompt(trailing, chat, chat_tok) == (prompt, response)

    instruction = _data(template="chat")
    pair = render_prompt(ALPACA_ROWS[1], instruction, chat_tok)
    user = "Translate the sentence into French.\n\nThe cat sleeps on the mat."
    assert pair[0] == chat_tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    for (p, r), (masked, learned) in zip(
        [(prompt, response), pair], _split_by_labels(chat_tok, [(prompt, response), pair])
    ):
        assert (masked, learned) == (p, r + "<|im_end|>")


def test_vicuna_conversation_keeps_earlier_turns(plain_tok):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    prompt, response = render_prompt({"messages": turns}, DataConfig(format="chat", template="vicuna"), plain_tok)
    assert prompt == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s> USER: Bye ASSISTANT:"
    assert response == " Goodbye"


def test_bos_is_not_doubled_when_the_chat_template_writes_it(bos_tok):
    tok = _tokenizer(bos=True, chat=True)
    tok.chat_template = "<s>" + CHATML
    prompt, response = render_prompt(ALPACA_ROWS[0], _data(template="chat"), tok)
    assert prompt.startswith("<s><|im_start|>user")
    enc = encode_pairs([(prompt, response)], tok, 4096)
    assert enc.input_ids[0].count(tok.bos_token_id) == 1 and enc.input_ids[0][0] == tok.bos_token_id
    ((masked, learned),) = _split_by_labels(tok, [(prompt, response)])
    assert (masked, learned) == (prompt, response + "<|im_end|>")


def test_long_prompt_is_cut_from_its_start_then_the_response_tail(bos_tok):
    tok = bos_tok
    prompt = "Give three tips for staying healthy. " * 6
    response = "Paris is the capital of France."
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    full = 1 + len(p_ids) + len(r_ids) + 1
    # Room for the BOS, the response and EOS, and 5 prompt tokens: the prompt's last 5 survive.
    limit = 1 + 5 + len(r_ids) + 1
    enc = encode_pairs([(prompt, response)], tok, limit)
    row = enc.input_ids[0]
    assert len(row) == limit < full
    assert row == [tok.bos_token_id, *p_ids[-5:], *r_ids, tok.eos_token_id]
    assert enc.prompt_lengths == [6]
    ((masked, learned),) = _split_by_labels(tok, [(prompt, response)], limit)
    assert learned == response + "</s>" and masked == "<s>" + _decode(tok, p_ids[-5:])
    # Not even the response fits: no prompt, the BOS kept, the response's tail cut (EOS with it).
    enc = encode_pairs([(prompt, response)], tok, 4)
    assert enc.input_ids == [[tok.bos_token_id, *r_ids[:3]]] and enc.prompt_lengths == [1]
    # Short rows are untouched.
    enc = encode_pairs([(prompt, response)], tok, full)
    assert enc.input_ids[0] == [tok.bos_token_id, *p_ids, *r_ids, tok.eos_token_id]


def test_fully_truncated_prompt_never_gives_nan_loss(plain_tok):
    """A row whose only learned tokens are cut to nothing but the first position (unscored after
    the shift) mixes with normal rows without a NaN in either loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedlora.train.dpsgd import per_example_causal_loss

    enc = encode_pairs([("x" * 30, "Paris."), ("Say hi.", "Hi.")], plain_tok, 8)
    enc.prompt_lengths[0] = len(enc.input_ids[0])  # worst case: a row with nothing to learn
    batch = collate(enc, [0, 1], plain_tok.pad_token_id, causal=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(plain_tok), n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = per_example_causal_loss(logits, batch["labels"])
    assert math.isfinite(float(loss))
    # Each example's mean is over its own scored tokens: the empty row contributes 0, not NaN.
    only_second = per_example_causal_loss(logits[1:], batch["labels"][1:])
    assert float(loss) == pytest.approx(float(only_second) / 2, rel=1e-6)


def test_text_format_is_unchanged(plain_tok):
    from datasets import Dataset

    from fedlora.data import encode

    ds = Dataset.from_dict({"text": ["hello world", "the cat"]})
    enc = encode_rows(ds, DataConfig(), plain_tok, 16)
    assert enc.prompt_lengths is None and enc.input_ids == encode(ds, plain_tok, 16).input_ids
    batch = collate(enc, [0, 1], plain_tok.pad_token_id, causal=True)
    assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))


def _raw(**data) -> dict:
    return {
        "model": {"name": "x", "task": "causal_lm"},
        "data": {"path": "a.jsonl", "format": "instruction", **data},
    }


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"model": {"task": "classification"}, "data": {"format": "instruction"}}, "data.format"),
        (_raw(template="llama"), "data.template"),
        (_raw(format="yaml"), "data.format"),
        (_raw(format="chat"), "data.template"),  # alpaca is single-turn
        (_raw(response_column=""), "data.response_column"),
        (
            {
                "model": {"task": "causal_lm"},
                "data": {"format": "instruction", "tasks": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]},
            },
            "data.format",
        ),
    ],
)
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(raw)
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_chat_template_needs_a_tokenizer_with_one(plain_tok):
    from datasets import Dataset

    ds = Dataset.from_list(ALPACA_ROWS)
    with pytest.raises(ConfigError, match="'data.template'") as err:
        encode_rows(ds, _data(template="chat"), plain_tok, 64)
    assert "\n" not in str(err.value)


def test_data_errors_name_the_key(tmp_path):
    from fedlora.data import load_task_data
    from fedlora.process import process_state

    def load(rows, **data):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        process_state().clear()
        cfg = RunConfig.from_dict(_raw(**{"path": str(path), **data}))
        return load_task_data(cfg)

    with pytest.raises(DataError, match="no column 'output' \\(config key 'data.response_column'\\)") as err:
        load([{"instruction": "a", "input": "", "response": "b"}] * 4)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="row 2 has no 'instruction' \\(config key 'data.prompt_column'\\)"):
        load([{"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"}] * 2)
    with pytest.raises(DataError, match="has no assistant turn.*'data.messages_column'"):
        load([{"messages": [{"role": "user", "content": "hi"}]}] * 4, format="chat", template="vicuna")
    # Dolly's columns, and no input column at all: both load.
    data = load(
        [{"instruction": "a", "context": "", "response": "b", "category": "qa"}] * 4,
        input_column="context",
        response_column="response",
    )
    assert set(data.train.column_names) == {"instruction", "context", "response"}
    data = load([{"instruction": "a", "output": "b"}] * 4)
    assert set(data.train.column_names) == {"instruction", "output"}
    process_state().clear()


def test_dirichlet_quantity_skew_for_causal_lm():
    from fedlora.data.partition import dirichlet_sizes

    sizes = dirichlet_sizes(100, 7, 0.3, seed=1)
    assert sum(sizes) == 100 and min(sizes) >= 1 and len(sizes) == 7
    assert sizes == dirichlet_sizes(100, 7, 0.3, seed=1)
    assert max(sizes) - min(sizes) > 5  # skewed at a small alpha
    assert dirichlet_sizes(5, 5, 0.1, seed=0) == [1] * 5
    with pytest.raises(ValueError):
        dirichlet_sizes(4, 5, 1.0, seed=0)


def _tiny_lm(directory, tok):
    from fedlora.data.synthetic import write_tiny_gpt2

    return write_tiny_gpt2(directory, tok)


@pytest.mark.simulation
def test_instruction_federation_through_the_cli(tmp_path, monkeypatch, plain_tok, capsys):
    """The instruct preset with a tiny local model and a local Alpaca file: two rounds of FedAvg on
    the default (Dirichlet quantity-skew) partitioner; the exported adapter reproduces the
    federation's model under peft, and `fedlora evaluate` scores it."""
    from conftest import federation_logits, peft_logits

    from fedlora.cli.main import main
    from fedlora.data import load_partition
    from fedlora.process import process_state

    model_dir = _tiny_lm(tmp_path / "lm", plain_tok)
    rows = []
    for i in range(40):
        rows.append(
            {
                "instruction": f"What is the capital of France? ({i})",
                "input": "" if i % 2 else "Answer in one word.",
                "output": "Paris is the capital of France." if i % 3 else "Paris.",
            }
        )
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    sets = [
        f"model.name={model_dir}",
        "model.quantization=none",
        "model.device=cpu",
        "model.max_length=48",
        f"data.path={data}",
        "data.max_eval_examples=8",
        "lora.target_modules=c_attn",
        "lora.rank=4",
        "lora.alpha=8",
        "federation.clients=4",
        "federation.fraction=0.5",
        "federation.local_steps=2",
        "federation.batch_size=4",
        "federation.lr=0.01",
        "federation.gradient_checkpointing=false",
        "rounds=2",
    ]
    argv = ["simulate", "instruct", "--quiet", "--out", "out"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if "round" in r][-1] == 2
    assert all(math.isfinite(r["eval_loss"]) for r in lines if "eval_loss" in r)
    assert all(len(r["clients"]) == 2 for r in lines if "clients" in r)

    cfg = load_config(out / "config.toml")
    assert cfg.data.format == "instruction" and cfg.data.partitioner == "dirichlet"
    sizes = [len(load_partition(cfg, pid, 4)) for pid in range(4)]
    assert sum(sizes) == 40 - 4 and min(sizes) >= 1  # every client has data, eval held out

    # The server's held-out set and a client's share are both scored on responses only.
    from fedlora.client.node import encoded
    from fedlora.server import prepare

    prepared = prepare(cfg)
    held_out = prepared.eval_data
    assert held_out.prompt_lengths is not None and len(held_out.prompt_lengths) == len(held_out) == 4
    assert all(0 < n < len(row) for n, row in zip(held_out.prompt_lengths, held_out.input_ids))
    share = encoded(load_partition(cfg, 0, 4), cfg, prepared.loaded.tokenizer)
    assert share.prompt_lengths is not None and len(share) == sizes[0]

    input_ids = torch.randint(5, len(plain_tok), (2, 12), generator=torch.Generator().manual_seed(0))
    ours = federation_logits(cfg, out, input_ids)
    theirs = peft_logits(model_dir, "causal_lm", out / "adapter", input_ids)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()

    # `fedlora evaluate` reads the run's layout from the export and scores the responses.
    capsys.readouterr()
    assert main(["evaluate", str(out / "adapter"), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["task"], report["format"], report["template"]) == ("causal_lm", "instruction", "alpaca")
    assert report["examples"] == report["loss_examples"] == 40
    assert math.isfinite(report["loss"]) and report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    process_state().clear()


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_partition_files_read_back_on_a_device(tmp_path, fmt, plain_tok):
    """`fedlora partition` writes what `fedlora-client --data` reads: the same rows, rendered alike."""
    from fedlora.data import load_device_data, load_partition, write_partitions
    from fedlora.process import process_state

    if fmt == "instruction":
        rows = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "Loudly.", "output": f"{i}!"} for i in range(12)]
    else:
        rows = [
            {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
            for i in range(12)
        ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "alpaca" if fmt == "instruction" else "vicuna"
    process_state().clear()
    cfg = RunConfig.from_dict(
        {
            "model": {"name": "x", "task": "causal_lm"},
            "data": {"path": str(path), "format": fmt, "template": template},
            "federation": {"clients": 3},
        }
    )
    files = write_partitions(cfg, tmp_path / "parts", 3)
    assert [f.suffix for f in files] == [".csv" if fmt == "instruction" else ".jsonl"] * 3
    for pid, file in enumerate(files):
        device = load_device_data(cfg, file, [], [])
        simulated = load_partition(cfg, pid, 3)
        ours = [render_prompt(r, cfg.data, plain_tok) for r in device]
        assert ours == [render_prompt(r, cfg.data, plain_tok) for r in simulated] and ours
    process_state().clear()
