"""``fedlora evaluate`` and the scoring math behind it (fedlora.eval).

The math is checked on hand-built logits; the command end to end on tiny random models with
peft adapters saved by peft itself (not by fedlora), against direct computations on the same
peft models.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.cli.main import main
from fedlora.eval.inputs import EvalLayout, layout_from, pick_template, sniff_format
from fedlora.eval.scoring import (
    answer_index,
    choice_accuracy,
    choice_predictions,
    exact_match,
    mean_nll,
    normalize_answer,
    perplexity,
    sequence_logprobs,
    trim_prediction,
)

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------------------------------------
# Pure math on hand-built logits


def _log_softmax(row):
    top = max(row)
    total = sum(math.exp(x - top) for x in row)
    return [x - top - math.log(total) for x in row]


LOGITS = torch.tensor(
    [
        [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
        [[0.0, 1.0, 0.0], [3.0, -2.0, 0.5], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],
    ]
)
# Row 0: token 0 is prompt (masked), tokens 1..3 scored. Row 1: tokens 0..1 scored, then padding.
LABELS = torch.tensor([[-100, 1, 2, 0], [2, 1, 0, -100]])


def _hand_logprobs():
    # logits[t] predicts labels[t + 1]
    row0 = _log_softmax([2.0, 0.0, -1.0])[1] + _log_softmax([0.5, 1.5, 0.0])[2] + _log_softmax([0.0, 0.0, 3.0])[0]
    row1 = _log_softmax([0.0, 1.0, 0.0])[1] + _log_softmax([3.0, -2.0, 0.5])[0]
    return [row0, row1], [3, 2]


def test_sequence_logprobs_sum_the_unmasked_next_token_logprobs():
    sums, counts = sequence_logprobs(LOGITS, LABELS)
    expected, expected_counts = _hand_logprobs()
    assert counts.tolist() == expected_counts
    assert sums.tolist() == pytest.approx(expected, abs=1e-6)


def test_masked_perplexity_is_exp_of_the_token_weighted_mean_nll():
    sums, counts = sequence_logprobs(LOGITS, LABELS)
    expected, _ = _hand_logprobs()
    nll = -(expected[0] + expected[1]) / 5  # token-weighted: 3 + 2 scored tokens, not a mean of row means
    assert mean_nll(sums.tolist(), counts.tolist()) == pytest.approx(nll, abs=1e-6)
    assert perplexity(mean_nll(sums.tolist(), counts.tolist())) == pytest.approx(math.exp(nll), rel=1e-6)
    # the same number as transformers' shifted cross entropy with -100 ignored
    ce = torch.nn.functional.cross_entropy(LOGITS[:, :-1].reshape(-1, 3), LABELS[:, 1:].reshape(-1), ignore_index=-100)
    assert float(ce) == pytest.approx(nll, abs=1e-6)
    assert perplexity(1e6) == pytest.approx(math.exp(50.0))  # capped, not an overflow


def test_choice_score_is_the_sum_over_the_choice_tokens_only():
    # prompt = tokens [0, 1]; choice A = [2], choice B = [1, 1]; logits built by hand per position
    prompt_logits = [[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]]
    a = torch.tensor([prompt_logits + [[0.0, 0.0, 0.0]]])
    b = torch.tensor([prompt_logits + [[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]]])
    score_a, _ = sequence_logprobs(a, torch.tensor([[-100, -100, 2]]))
    score_b, _ = sequence_logprobs(b, torch.tensor([[-100, -100, 1, 1]]))
    assert float(score_a) == pytest.approx(_log_softmax([1.0, 0.0, 2.0])[2])
    assert float(score_b) == pytest.approx(_log_softmax([1.0, 0.0, 2.0])[1] + _log_softmax([0.0, 4.0, 0.0])[1])


def test_choice_predictions_and_acc_norm_per_character():
    # total log-likelihood prefers the short choice; per character the long one wins (lm-eval's acc_norm)
    assert choice_predictions([-4.0, -6.0], ["no", "absolutely"]) == (0, 1)
    assert choice_predictions([-3.0, -3.0, -1.0], ["a", "b", "c"]) == (2, 2)
    assert choice_predictions([-2.0, -2.0], ["a", "b"]) == (0, 0)  # ties: the first, as numpy.argmax
    assert choice_predictions([-1.0, -5.0], ["", "x"]) == (0, 0)  # an empty choice counts one character
    acc, acc_norm = choice_accuracy([[-4.0, -6.0], [-1.0, -2.0]], [["no", "absolutely"], ["x", "y"]], [1, 0])
    assert (acc, acc_norm) == (0.5, 1.0)
    with pytest.raises(ValueError):
        choice_predictions([-1.0], ["a", "b"])


def test_answer_index_accepts_an_index_a_text_or_a_letter():
    from fedlora.errors import DataError

    choices = ["red", "blue", "green"]
    assert answer_index(1, choices, "row 1") == 1
    assert answer_index(2.0, choices, "row 1") == 2  # a JSON column with gaps reads ints as floats
    assert answer_index(" blue ", choices, "row 1") == 1
    assert answer_index("C", choices, "row 1") == 2
    for bad in (3, -1, "purple", "D", True, 1.5):
        with pytest.raises(DataError, match="row 1"):
            answer_index(bad, choices, "row 1")


def test_exact_match_normalisation():
    assert normalize_answer("  Paris \n") == "paris"
    assert normalize_answer("New   York\tCity") == "new york city"
    assert normalize_answer("Straße") == normalize_answer("STRASSE")  # casefold, not lower
    assert exact_match(" PARIS", "Paris")
    assert not exact_match("Paris.", "Paris")  # punctuation is kept
    assert not exact_match("Paris is nice", "Paris")  # a longer answer is not the answer
    # the model going on with its template's next turn: only as many lines as the reference has
    assert trim_prediction("Paris\n### Instruction:\nmore", "Paris") == "Paris"
    assert exact_match("Paris\n\n### Instruction: next", "paris")
    assert exact_match("a\nb\nc", "A\nB")  # a two-line reference: two lines compared
    assert not exact_match("a\nc\nb", "A\nB")


def test_format_sniffing_and_template_defaults():
    layout = EvalLayout()
    assert sniff_format(["instruction", "output"], layout) == "instruction"
    assert sniff_format(["instruction", "choices", "answer"], layout) == "instruction"
    assert sniff_format(["messages"], layout) == "chat"
    assert sniff_format(["text"], layout) == "text"
    assert sniff_format(["question", "answer"], EvalLayout()) == "text"
    assert sniff_format(["question", "answer"], EvalLayout(columns={"prompt_column": "question"})) == "instruction"
    assert (
        sniff_format(
            ["question", "reply"], EvalLayout(columns={"prompt_column": "question", "response_column": "reply"})
        )
        == "instruction"
    )

    class NoChat:
        chat_template = None

    assert pick_template("instruction", None, "", NoChat()) == "alpaca"
    assert pick_template("chat", None, "alpaca", NoChat()) == "vicuna"
    assert pick_template("instruction", None, "vicuna", NoChat()) == "vicuna"
    assert pick_template("instruction", "chat", "vicuna", NoChat()) == "chat"


def test_fedlora_json_records_the_data_layout(tiny_gpt2):
    from conftest import tiny_config

    from fedlora.run.export import data_layout

    cfg = tiny_config(
        tiny_gpt2,
        task="causal_lm",
        sets=(
            "data.format='instruction'",
            "data.template='vicuna'",
            "data.response_column='reply'",
            "model.max_length=48",
        ),
    )
    layout = layout_from({"data": json.loads(json.dumps(data_layout(cfg))), "labels": []}, "causal_lm")
    assert (layout.format, layout.template, layout.max_length) == ("instruction", "vicuna", 48)
    assert layout.column("response_column") == "reply" and layout.column("prompt_column") == "instruction"


# ---------------------------------------------------------------------------------------------
# End to end on tiny models with plain peft adapters


ROWS = [
    {"instruction": "the chef cooked", "output": "pasta"},
    {"instruction": "the striker scored", "output": "goal"},
    {"instruction": "the baker baked", "input": "bread", "output": " Pasta "},
    {"instruction": "which is food", "choices": ["pasta", "goal", "engine"], "answer": 0},
    {"instruction": "which is a sport", "input": "the match", "choices": ["pasta", "goal"], "answer": 1},
    {"instruction": "pick the weather", "choices": ["rain", "chocolate", "laptop", "goal"], "answer": 0},
]


@pytest.fixture(scope="module")
def causal_adapter(tmp_path_factory, tiny_gpt2):
    """A peft LoRA adapter on the tiny GPT-2, trained by plain torch (no fedlora) to answer "pasta"
    after an Alpaca prompt, and saved with ``save_pretrained``; plus a jsonl of instruction rows
    and multiple-choice rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval-causal")
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2),
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
    )
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nthe chef cooked\n\n### Response:\n"
    )
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + tok("pasta", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]])
    labels = ids.clone()
    labels[0, : len(p_ids)] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    adapter = root / "adapter"
    model.save_pretrained(str(adapter))
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return adapter, data


def _peft(base_dir, adapter, classification=False, num_labels=2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classification:
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def _run(capsys, *argv):
    try:
        rc = main(["evaluate", *map(str, argv)])
    except SystemExit as exit_:  # argparse's own usage errors (one line, exit 2 as well)
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _direct_causal(tiny_gpt2, adapter):
    """Loss, choice accuracies and exact match computed row by row, unbatched, on the peft model."""
    from transformers import AutoTokenizer

    from fedlora.config import DataConfig
    from fedlora.data.instruct import encode_pairs, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = _peft(tiny_gpt2, adapter)
    data = DataConfig(format="instruction", template="alpaca")
    nll, tokens, hits, hits_norm, choice_rows, em = 0.0, 0, 0, 0, 0, []
    with torch.no_grad():
        for row in ROWS:
            if "choices" in row:
                scores = []
                for choice in row["choices"]:
                    enc = encode_pairs([render_prompt({**row, "output": choice}, data, tok)], tok, 64)
                    ids, plen = enc.input_ids[0], enc.prompt_lengths[0]
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                    scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(plen, len(ids))))
                best = max(range(len(scores)), key=lambda i: (scores[i], -i))
                best_norm = max(range(len(scores)), key=lambda i: (scores[i] / len(row["choices"][i]), -i))
                hits += best == row["answer"]
                hits_norm += best_norm == row["answer"]
                choice_rows += 1
                continue
            prompt, reference = render_prompt(row, data, tok)
            enc = encode_pairs([(prompt, reference)], tok, 64)
            ids, plen = enc.input_ids[0], enc.prompt_lengths[0]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            target = torch.tensor(ids[plen:])
            nll += float(torch.nn.functional.cross_entropy(logits[plen - 1 : len(ids) - 1], target, reduction="sum"))
            tokens += len(ids) - plen
            out = list(ids[:plen])  # greedy decoding by hand: argmax until [SEP] (the model's EOS)
            for _ in range(len(ids) - plen + 4):
                nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
                if nxt == tok.sep_token_id:
                    break
                out.append(nxt)
            em.append(exact_match(tok.decode(out[plen:], skip_special_tokens=True), reference))
    return nll / tokens, hits / choice_rows, hits_norm / choice_rows, sum(em) / len(em)


def test_evaluate_a_peft_causal_adapter_end_to_end(causal_adapter, tiny_gpt2, capsys):
    adapter, data = causal_adapter
    rc, out, err = _run(capsys, adapter, "--data", data, "--device", "cpu", "--batch-size", "2")
    assert rc == 0, err
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    result = json.loads(out)
    assert result["adapter"] == str(adapter) and result["base"] == tiny_gpt2 and result["data"] == str(data)
    assert (result["task"], result["format"], result["template"]) == ("causal_lm", "instruction", "alpaca")
    assert result["examples"] == len(ROWS)
    assert (result["loss_examples"], result["choice_examples"], result["exact_match_examples"]) == (3, 3, 3)
    loss, acc, acc_norm, em = _direct_causal(tiny_gpt2, adapter)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["choice_accuracy"] == pytest.approx(acc)
    assert result["choice_accuracy_norm"] == pytest.approx(acc_norm)
    # the adapter learned "pasta": rows 1 and 3 (" Pasta " after normalisation) match, "goal" does not
    assert result["exact_match"] == pytest.approx(em) == pytest.approx(2 / 3)


def test_evaluate_raw_text_perplexity_and_max_examples(causal_adapter, tiny_gpt2, tmp_path, capsys):
    from transformers import AutoTokenizer

    adapter, _ = causal_adapter
    texts = ["the chef cooked pasta in the kitchen", "the striker scored a late goal", "rain over the lake"]
    data = tmp_path / "text.csv"
    data.write_text("text\n" + "\n".join(texts) + "\n")
    rc, out, err = _run(capsys, adapter, "--data", data, "--device", "cpu", "--max-examples", "2")
    assert rc == 0, err
    result = json.loads(out)
    assert result["format"] == "text" and "template" not in result and "exact_match" not in result
    assert result["examples"] == 2 and "choice_accuracy" not in result
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = _peft(tiny_gpt2, adapter)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts[:2]:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0]
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-4)


def test_evaluate_a_peft_classifier(tiny_bert, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.data.synthetic import generate_topics

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3),
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    )
    with torch.no_grad():  # a non-trivial adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "cls-adapter"
    model.save_pretrained(str(adapter))
    texts = generate_topics(12, seed=3)["text"]
    labels = [i % 3 for i in range(12)]
    data = tmp_path / "eval.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in zip(texts, labels)))
    rc, out, err = _run(capsys, adapter, "--data", data, "--device", "cpu", "--batch-size", "5")
    assert rc == 0, err
    result = json.loads(out)
    assert result["task"] == "classification" and result["examples"] == 12
    assert set(result) == {"adapter", "base", "data", "task", "examples", "loss", "accuracy"}
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    peft_model = _peft(tiny_bert, adapter, classification=True, num_labels=3)
    with torch.no_grad():
        logits = torch.cat([peft_model(**tok(t, return_tensors="pt")).logits for t in texts])
    target = torch.tensor(labels)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == target).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-4)

    # labels that are not the head's class ids: one line naming them
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\n" + "".join(f'"{t}",sports\n' for t in texts[:3]))
    rc, out, err = _run(capsys, adapter, "--data", bad, "--device", "cpu")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "sports" in err


def _one_line_error(capsys, *argv):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("fedlora") and "error: " in err, err
    return err


def test_evaluate_errors_are_one_line(causal_adapter, tmp_path, capsys, monkeypatch):
    adapter, data = causal_adapter
    err = _one_line_error(capsys, tmp_path / "nope", "--data", data)
    assert "does not exist" in err
    err = _one_line_error(capsys, tmp_path, "--data", data)
    assert "no adapter_config.json" in err
    err = _one_line_error(capsys, adapter, "--data", tmp_path / "missing.jsonl")
    assert "file not found" in err and "missing.jsonl" in err
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    err = _one_line_error(capsys, adapter, "--data", garbage)
    assert "cannot read" in err and "broken.parquet" in err
    no_output = tmp_path / "prompts.jsonl"
    no_output.write_text(json.dumps({"instruction": "the chef cooked"}) + "\n")
    err = _one_line_error(capsys, adapter, "--data", no_output, "--format", "instruction")
    assert "'output'" in err and "--column response_column=" in err and "instruction" in err  # and what is there
    err = _one_line_error(capsys, adapter, "--data", no_output, "--format", "chat")
    assert "'messages'" in err
    err = _one_line_error(capsys, adapter, "--data", data, "--base", tmp_path / "no-such-model")
    assert "no-such-model" in err and "path does not exist" in err
    err = _one_line_error(capsys, adapter, "--data", data, "--column", "reply=x")
    assert "--column" in err
    err = _one_line_error(capsys, adapter, "--data", data, "--batch-size", "0")
    assert "--batch-size" in err
    # a hub name while the hub cannot be reached (and the model is not in the cache)
    import fedlora.model.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fedlora.model.hub, "_decided", None)
    err = _one_line_error(capsys, adapter, "--data", data, "--base", "fedlora-tests/no-such-model", "--device", "cpu")
    assert "fedlora-tests/no-such-model" in err and "hub is unreachable" in err and "--base" in err


@pytest.mark.simulation
def test_evaluate_a_fedlora_run_adapter_with_its_recorded_labels(tiny_bert, tmp_path, capsys):
    """An adapter a fedlora run exported: fedlora.json gives the class names (topic names here),
    and --column names the file's own columns."""
    from conftest import peft_logits, tiny_config

    from fedlora.data.synthetic import generate_topics
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    run = tmp_path / "run"
    simulate(tiny_config(tiny_bert, sets=("rounds=1",)), out=run, progress=Progress(quiet=True))
    adapter = run / "adapter"
    meta = json.loads((adapter / "fedlora.json").read_text())
    assert meta["data"]["format"] == "text" and meta["data"]["max_length"] == 16
    rows = generate_topics(10, seed=11)
    data = tmp_path / "topics.csv"
    data.write_text("sentence,topic\n" + "".join(f'"{t}",{y}\n' for t, y in zip(rows["text"], rows["label"])))
    rc, out, err = _run(
        capsys, adapter, "--data", data, "--column", "text_column=sentence", "--column", "label_column=topic"
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["task"] == "classification" and result["examples"] == 10 and result["base"] == tiny_bert
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids = [meta["labels"].index(y) for y in rows["label"]]
    logits = torch.cat(
        [
            peft_logits(
                tiny_bert,
                "classification",
                adapter,
                tok(t, truncation=True, max_length=16, return_tensors="pt")["input_ids"],
            )
            for t in rows["text"]
        ]
    )
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == torch.tensor(ids)).float().mean()))
    err = _one_line_error(capsys, adapter, "--data", data)  # the run's column names are not in this file
    assert "'text'" in err and "--column text_column=" in err and "sentence, topic" in err


def test_evaluate_chat_rows_with_vicuna(causal_adapter, tiny_gpt2, tmp_path, capsys):
    from transformers import AutoTokenizer

    from fedlora.config import DataConfig
    from fedlora.data.instruct import encode_pairs, render_prompt

    adapter, _ = causal_adapter
    rows = [
        {"messages": [{"role": "user", "content": "the chef cooked"}, {"role": "assistant", "content": "pasta"}]},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "the striker"},
                {"role": "assistant", "content": "scored a goal"},
                {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the fans cheered"},
            ]
        },
        {"messages": [{"role": "user", "content": "which is food"}], "choices": ["pasta", "goal"], "answer": 0},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(capsys, adapter, "--data", data, "--device", "cpu")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["format"], result["template"]) == ("chat", "vicuna")  # the tiny tokenizer has no chat template
    assert (result["loss_examples"], result["choice_examples"], result["exact_match_examples"]) == (2, 1, 2)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = _peft(tiny_gpt2, adapter)
    layout = DataConfig(format="chat", template="vicuna")
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows[:2]:
            enc = encode_pairs([render_prompt(row, layout, tok)], tok, 64)
            ids, plen = enc.input_ids[0], enc.prompt_lengths[0]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            nll += float(
                torch.nn.functional.cross_entropy(logits[plen - 1 : -1], torch.tensor(ids[plen:]), reduction="sum")
            )
            count += len(ids) - plen
    assert result["loss"] == pytest.approx(nll / count, rel=1e-4)
