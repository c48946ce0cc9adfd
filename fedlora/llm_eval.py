"""Evaluating a LoRA adapter as a language model: what ``fedlora evaluate`` reports.

Three measures, each over the rows of a data file it applies to:

* **loss / perplexity** (rows with a reference response, or every row of raw text): the
  token-weighted mean negative log-likelihood of the scored tokens (the response only, for
  instruction and chat data; the prompt is masked out exactly as in training) and its ``exp``.
  The numbers come from :func:`fedlora.training.evaluate`, the loop the server uses.
* **choice accuracy** (rows with a ``choices`` list and an ``answer``): multiple choice by
  likelihood, as lm-evaluation-harness scores MMLU-style tasks. Each choice's score is the sum
  of the log-probabilities of its tokens after the prompt; the prediction is the argmax
  (``choice_accuracy``). ``choice_accuracy_norm`` divides each score by the choice's length in
  characters first (lm-eval's ``acc_norm``), which removes the bias towards short choices.
* **exact match** (rows with a reference response and no choices, whose reference is at most
  ``max_answer_tokens`` tokens): greedy decoding of ``reference tokens + EXTRA_NEW_TOKENS`` new
  tokens, compared with the reference after :func:`normalize_answer`.

The math is in pure functions over logits, token ids and strings (:func:`sequence_logprobs`,
:func:`choice_predictions`, :func:`normalize_answer`, ...); the rest loads a base model and a
peft adapter and feeds them rows.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import DataError, FedLoraError, ModelError
from fedlora.training import MAX_LOG_PERPLEXITY, perplexity  # noqa: F401 - part of this module's scoring API

#: Columns of a multiple-choice row: the candidate answers and the correct one (index or text).
CHOICES_COLUMN = "choices"
ANSWER_COLUMN = "answer"
#: What separates a raw-text prompt from a choice (lm-eval's default ``target_delimiter``).
TARGET_DELIMITER = " "
#: Greedy decoding for exact match may run this many tokens past the reference's length, so a
#: prediction that is longer than the reference is seen as longer, not cut to look equal.
EXTRA_NEW_TOKENS = 4
#: Column roles a file's columns can be named for (``--column KEY=NAME``), as the ``data.*`` keys.
COLUMN_KEYS = (
    "text_column",
    "label_column",
    "prompt_column",
    "input_column",
    "response_column",
    "messages_column",
)
#: peft task types ``fedlora evaluate`` knows how to evaluate.
TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}

# ---------------------------------------------------------------------------------------------
# Pure scoring math


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of ``log p(token | tokens before it)`` over the scored tokens, and their count.

    Shifted as transformers shifts a causal LM's loss: ``logits[:, t]`` predicts
    ``labels[:, t + 1]``; a label of -100 (prompt, padding) is not scored.

    Parameters
    ----------
    logits : Tensor
        ``(batch, length, vocab)``.
    labels : Tensor
        ``(batch, length)`` token ids, -100 where not scored.

    Returns
    -------
    tuple of Tensor
        ``(sums, counts)``, each ``(batch,)``: float64 sums of log-probabilities and int64 counts.
    """
    targets = labels[:, 1:].to(logits.device)
    scored = targets != -100
    rows = torch.arange(targets.shape[0], device=logits.device).unsqueeze(1).expand_as(targets)[scored]
    # Only the scored positions go through log_softmax: a response is a small part of a long
    # prompt, and (batch x length x vocab) float32 log-probabilities would not fit a large vocabulary.
    picked = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)
    token_lp = picked.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1).double()
    sums = torch.zeros(targets.shape[0], dtype=torch.float64, device=logits.device).index_add_(0, rows, token_lp)
    return sums.cpu(), scored.sum(dim=1).cpu()


def mean_nll(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Token-weighted mean negative log-likelihood: ``-sum(sums) / sum(counts)`` (0 for no tokens)."""
    total = sum(int(c) for c in counts)
    return -sum(float(s) for s in sums) / total if total else 0.0


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as ``numpy.argmax``, which lm-eval uses)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def choice_predictions(scores: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """The predicted choice by total log-likelihood, and by log-likelihood per character.

    Parameters
    ----------
    scores : sequence of float
        Each choice's summed log-probability of its tokens after the prompt.
    choices : sequence of str
        The choices' texts (without the delimiter), whose lengths in characters normalise the
        scores as lm-eval's ``acc_norm`` does (an empty choice counts as one character).

    Returns
    -------
    tuple of int
        ``(argmax score, argmax score / len(choice))``.
    """
    if len(scores) != len(choices) or not scores:
        raise ValueError(f"choice_predictions: {len(scores)} scores for {len(choices)} choices")
    normed = [s / max(len(c), 1) for s, c in zip(scores, choices)]
    return _argmax(scores), _argmax(normed)


def choice_accuracy(
    scores: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]
) -> tuple[float, float]:
    """``(acc, acc_norm)`` over rows: the fraction whose predicted choice is the answer."""
    if not answers:
        return 0.0, 0.0
    hits = hits_norm = 0
    for row_scores, row_choices, answer in zip(scores, choices, answers):
        pred, pred_norm = choice_predictions(row_scores, row_choices)
        hits += int(pred == answer)
        hits_norm += int(pred_norm == answer)
    return hits / len(answers), hits_norm / len(answers)


def answer_index(answer: Any, choices: Sequence[str], where: str) -> int:
    """The index of the correct choice named by ``answer``.

    ``answer`` may be the index (an int, or a float with an integral value, which is what a JSON
    column with missing cells becomes), the text of a choice (compared after stripping
    whitespace), or a letter ``A``, ``B``, ... naming the choice by position (ARC's answer keys),
    tried in that order.

    Raises
    ------
    DataError
        ``where`` (the file and row) and the answer, when it names no choice.
    """
    if isinstance(answer, bool):
        raise DataError(f"{where}: {ANSWER_COLUMN!r} is {answer!r}, not a choice index or text")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(f"{where}: {ANSWER_COLUMN!r} {answer} is not an index of its {len(choices)} choices")
    if isinstance(answer, str):
        text = answer.strip()
        stripped = [c.strip() for c in choices]
        if text in stripped:
            return stripped.index(text)
        if len(text) == 1 and "A" <= text <= "Z" and ord(text) - ord("A") < len(choices):
            return ord(text) - ord("A")
    raise DataError(f"{where}: {ANSWER_COLUMN!r} {answer!r} names none of the choices {list(choices)!r}")


_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """What exact match compares: ``text`` case-folded (``str.casefold``, so "Straße" equals
    "STRASSE"), runs of whitespace collapsed to one space, and leading/trailing whitespace stripped.
    Punctuation and articles are kept: "Paris." is not "Paris"."""
    return _WHITESPACE.sub(" ", text.casefold()).strip()


def trim_prediction(prediction: str, reference: str) -> str:
    """The generated text cut to as many lines as the reference has.

    A model answering a one-line question often goes on with the next turn of its template
    ("\\n### Instruction: ..."); the answer is its first line. A multi-line reference keeps that
    many lines.
    """
    lines = reference.strip().count("\n") + 1
    return "\n".join(prediction.lstrip().split("\n")[:lines])


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the (trimmed) prediction equals the reference after :func:`normalize_answer`."""
    return normalize_answer(trim_prediction(prediction, reference)) == normalize_answer(reference)


# ---------------------------------------------------------------------------------------------
# Running a model


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    compute_dtype: torch.dtype | None = None,
) -> tuple[list[float], list[int]]:
    """For each row, the summed log-probability of its tokens after ``prompt_lengths[i]``, and
    how many they are (batched with :func:`fedlora.data.collate`, which masks the prompts)."""
    from fedlora.data import Encoded, collate
    from fedlora.devices import autocast, model_device
    from fedlora.training import to_device

    model.eval()
    device = model_device(model)
    enc = Encoded(input_ids=[list(r) for r in input_ids], labels=None, prompt_lengths=list(prompt_lengths))
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        batch = to_device(collate(enc, idx, pad_id, causal=True), device)
        labels = batch.pop("labels")
        with autocast(device, compute_dtype):
            logits = model(**batch).logits
        row_sums, row_counts = sequence_logprobs(logits, labels)
        sums += row_sums.tolist()
        counts += row_counts.tolist()
    return sums, counts


@torch.no_grad()
def greedy_answer(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None,
    pad_id: int,
    compute_dtype: torch.dtype | None = None,
) -> list[int]:
    """The tokens greedy decoding adds to ``prompt_ids`` (at most ``max_new_tokens``, ending at
    ``eos_id``, which is not returned). One row at a time: no padding, so no position shifts."""
    from fedlora.devices import autocast, model_device

    model.eval()
    device = model_device(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    with autocast(device, compute_dtype):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new


# ---------------------------------------------------------------------------------------------
# What to evaluate: the data's layout


@dataclass
class EvalLayout:
    """How the rows of a data file are read: what ``fedlora.json`` recorded, or what was sniffed.

    Attributes
    ----------
    task : str
        ``causal_lm`` or ``classification`` (from the adapter's peft ``task_type``).
    format, template : str
        As ``data.format`` / ``data.template`` (causal LM only).
    columns : dict of str to str
        ``text_column``, ``label_column``, ``prompt_column``, ``input_column``,
        ``response_column``, ``messages_column``: the names in the file.
    max_length : int
        Tokens per example (0: the model's own limit).
    labels : list of str
        Class names in id order (classification; empty: the labels are ids already).
    """

    task: str = "causal_lm"
    format: str = "text"
    template: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    max_length: int = 0
    labels: list[str] = field(default_factory=list)

    def data_config(self) -> Any:
        """A :class:`fedlora.config.DataConfig` carrying this layout, for :mod:`fedlora.data.instruct`."""
        from fedlora.config import DataConfig

        known = {k: v for k, v in self.columns.items() if k in DataConfig.model_fields}
        return DataConfig(format=self.format, template=self.template, **known)

    def column(self, key: str) -> str:
        from fedlora.config import DataConfig

        return self.columns.get(key) or getattr(DataConfig(), key)


def sniff_format(columns: Sequence[str], layout: EvalLayout) -> str:
    """The data format a file's columns suggest: a messages column means chat, an instruction
    (prompt) column means instruction, else raw text."""
    names = set(columns)
    if layout.column("messages_column") in names:
        return "chat"
    if layout.column("prompt_column") in names:
        return "instruction"
    return "text"


def layout_from(meta: Mapping[str, Any], task: str) -> EvalLayout:
    """The layout ``fedlora.json`` recorded (its ``data`` table; absent in older exports and in
    adapters fedlora did not write, which then get the defaults)."""
    data = meta.get("data") if isinstance(meta.get("data"), Mapping) else {}
    columns = {k: str(v) for k, v in dict(data.get("columns", {})).items() if isinstance(v, str) and v}
    labels = meta.get("labels") if isinstance(meta.get("labels"), list) else []
    return EvalLayout(
        task=task,
        format=str(data.get("format", "")) or "",
        template=str(data.get("template", "")) or "",
        columns=columns,
        max_length=int(data.get("max_length", 0) or 0),
        labels=[str(x) for x in labels],
    )


# ---------------------------------------------------------------------------------------------
# Loading an adapter


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself."""

    path: Path
    peft_config: dict[str, Any]
    meta: dict[str, Any]
    task: str

    @property
    def base(self) -> str:
        return str(self.peft_config.get("base_model_name_or_path") or "")


def read_adapter(path: str | Path) -> AdapterInfo:
    """Read ``adapter_config.json`` (and ``fedlora.json`` when fedlora wrote the adapter).

    Raises
    ------
    FedLoraError
        The folder does not exist, has no readable ``adapter_config.json``, or holds an adapter
        of a task type this command does not evaluate.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FedLoraError(f"fedlora evaluate: adapter folder {p} does not exist")
    config_file = p / "adapter_config.json"
    if not config_file.is_file():
        raise FedLoraError(f"fedlora evaluate: {p} is not a peft adapter folder (no adapter_config.json)")
    try:
        peft_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedLoraError(f"fedlora evaluate: {config_file} is not readable JSON ({err})") from None
    if not isinstance(peft_config, dict):
        raise FedLoraError(f"fedlora evaluate: {config_file} is not a JSON object")
    meta: dict[str, Any] = {}
    if (p / "fedlora.json").is_file():
        try:
            loaded = json.loads((p / "fedlora.json").read_text(encoding="utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # only defaults come from it; the adapter itself is in adapter_config.json
    task_type = str(peft_config.get("task_type") or "CAUSAL_LM")
    if task_type not in TASK_TYPES:
        raise FedLoraError(
            f"fedlora evaluate: {p}: peft task_type {task_type!r} is not evaluated here ({', '.join(TASK_TYPES)} are)"
        )
    return AdapterInfo(path=p, peft_config=peft_config, meta=meta, task=TASK_TYPES[task_type])


def num_labels_of(info: AdapterInfo) -> int:
    """The classification head's size: ``fedlora.json``'s ``num_labels``, else the rows of the
    head weight the adapter saved (peft keeps the trained head in ``modules_to_save``)."""
    n = info.meta.get("num_labels")
    if isinstance(n, int) and n > 0:
        return n
    weights = info.path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            heads = [
                k
                for k in f.keys()
                if re.search(r"(classifier|score)(\.out_proj)?(\.modules_to_save\.[^.]+)?\.weight$", k)
            ]
            if heads:
                return int(f.get_slice(sorted(heads, key=len)[-1]).get_shape()[0])
    raise FedLoraError(
        f"fedlora evaluate: {info.path}: cannot tell the number of classes (no fedlora.json, no saved classifier head)"
    )


def load_base(name: str, origin: str, task: str, num_labels: int, device: str, dtype: str) -> Any:
    """The base model and tokenizer with fedlora's loader (:func:`fedlora.models.resolve_model_source`:
    a local directory, a packaged offline copy, or a hub name, offline when the hub is unreachable).

    The model is loaded for this command alone, not from the process cache: peft injects the
    adapter's layers into the model it wraps, and a cached base is shared.

    Raises
    ------
    ModelError
        One line naming the base and where its name came from (``origin``): a path that does not
        exist, a hub name that cannot be loaded (saying whether the hub was reachable).
    """
    from fedlora.config import ModelConfig
    from fedlora.devices import placement
    from fedlora.hub import offline_unless_reachable
    from fedlora.models import _load, resolve_model_source

    try:
        source = resolve_model_source(name)
    except ModelError:
        raise ModelError(f"base model {name!r} ({origin}): the path does not exist") from None
    cfg = ModelConfig(name=source, task=task, device=device, dtype=dtype)
    where = placement(cfg.device, cfg.dtype, key="--device")
    try:
        return _load(cfg, num_labels, 0, ("evaluate", source, task, num_labels), where, False)
    except ModelError as err:
        if Path(source).is_dir():
            detail = str(err).split(": ", 2)[-1]
            raise ModelError(f"base model {name!r} ({origin}): cannot load the directory: {detail}") from None
        if offline_unless_reachable():
            raise ModelError(
                f"base model {name!r} ({origin}): not a local directory, the hub is unreachable and it is not in "
                "the local cache; name a local copy with --base DIR"
            ) from None
        detail = str(err).split(": ", 2)[-1]
        raise ModelError(f"base model {name!r} ({origin}): cannot load it from the hub: {detail}") from None


def load_tokenizer(info: AdapterInfo, fallback: Any) -> Any:
    """The adapter folder's own tokenizer when it has one (an adapter trained with added tokens or
    a chat template needs exactly it), else the base model's; a pad token is set as fedlora's loader does."""
    tokenizer = fallback
    if (info.path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(info.path))
        except (OSError, ValueError):
            tokenizer = fallback  # an unreadable copy: the base's own tokenizer is the one it was made from
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def attach_adapter(model: torch.nn.Module, info: AdapterInfo) -> torch.nn.Module:
    """``PeftModel.from_pretrained(model, adapter folder)``, in evaluation mode.

    Raises
    ------
    FedLoraError
        One line when peft cannot load the adapter onto this base (another architecture, other
        shapes, missing weights).
    """
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedLoraError(f"fedlora evaluate: cannot load the adapter {info.path} onto its base: {first}") from None
    return peft_model.eval()


# ---------------------------------------------------------------------------------------------
# Evaluating the rows of a file


@dataclass
class EvalOptions:
    """How ``fedlora evaluate`` batches and bounds its work.

    Attributes
    ----------
    batch_size : int
        Rows per forward pass (loss and choice scoring).
    max_examples : int
        Evaluate the file's first ``max_examples`` rows (0: all).
    max_answer_tokens : int
        Exact match covers references of at most this many tokens (longer ones are not short
        answers; greedy decoding is the slow part).
    """

    batch_size: int = 8
    max_examples: int = 0
    max_answer_tokens: int = 32


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _require(ds: Any, columns: Sequence[tuple[str, str]], where: str) -> None:
    """DataError naming every missing column and how to name another (``--column KEY=NAME``;
    an empty key: the column's name is fixed, as ``answer`` beside ``choices``)."""
    missing = [
        f"{col!r} (--column {key}=NAME)" if key else f"{col!r} (with {CHOICES_COLUMN!r})"
        for key, col in columns
        if col not in ds.column_names
    ]
    if missing:
        raise DataError(f"{where}: no column {', '.join(missing)}; columns are: {', '.join(ds.column_names)}")


def model_max_length(model: torch.nn.Module) -> int:
    """The longest input the model's position embeddings take (2048 when it does not say)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _is_choice_row(row: Mapping[str, Any]) -> bool:
    value = row.get(CHOICES_COLUMN)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _choice_pairs(row: Mapping[str, Any], data: Any, tokenizer: Any, choices: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt, continuation) per choice: the row rendered with the choice as its response
    (instruction: in the response column; chat: as the assistant's turn; raw text: after
    :data:`TARGET_DELIMITER`, as lm-eval joins a context and a choice)."""
    from fedlora.data.instruct import render_prompt

    if data.format == "text":
        context = str(row.get(data.text_column) or "")
        return [(context, TARGET_DELIMITER + c) for c in choices]
    pairs = []
    for choice in choices:
        if data.format == "chat":
            turns = list(row.get(data.messages_column) or [])
            filled = {**row, data.messages_column: [*turns, {"role": "assistant", "content": choice}]}
        else:
            filled = {**row, data.response_column: choice}
        pairs.append(render_prompt(filled, data, tokenizer))
    return pairs


def _without_eos(input_ids: list[int], prompt_length: int, eos: int | None) -> list[int]:
    """A row of :func:`fedlora.data.instruct.encode_pairs` without the EOS it appends: a choice is
    scored on its own tokens, as lm-eval does, not on also ending the text."""
    if eos is not None and len(input_ids) > prompt_length + 1 and input_ids[-1] == eos:
        return input_ids[:-1]
    return input_ids


def evaluate_causal(
    model: torch.nn.Module,
    tokenizer: Any,
    ds: Any,
    layout: EvalLayout,
    opts: EvalOptions,
    *,
    where: str,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Loss/perplexity, choice accuracy and exact match of a causal LM over ``ds``'s rows.

    Rows with a ``choices`` list are scored as multiple choice only; the other rows give the
    loss over their response (instruction, chat) or text, and exact match when their reference
    has at most ``opts.max_answer_tokens`` tokens (instruction and chat only: raw text has no
    reference answer).

    Raises
    ------
    DataError
        A column the format needs is missing (named), or a choice row's answer names no choice.
    """
    from fedlora.data.instruct import check_template, encode_pairs, encode_rows, render_prompt
    from fedlora.training import evaluate

    data = layout.data_config()
    check_template(data, tokenizer)
    choice_rows = _check_causal_columns(ds, data, where)
    max_length = min(layout.max_length or model_max_length(model), model_max_length(model))
    pad_id = tokenizer.pad_token_id
    result: dict[str, Any] = {}
    plain = _plain_rows(ds, data, set(choice_rows))
    # Instruction and chat rows rendered once: scored for loss here, reused for exact match below.
    pairs = [render_prompt(row, data, tokenizer) for row in plain] if data.format != "text" else []
    enc = None
    if len(plain):
        enc = encode_pairs(pairs, tokenizer, max_length) if pairs else encode_rows(plain, data, tokenizer, max_length)
        metrics = evaluate(
            model, enc, batch_size=opts.batch_size, pad_id=pad_id, causal=True, compute_dtype=compute_dtype
        )
        result["loss"] = metrics["eval_loss"]
        result["perplexity"] = metrics["eval_perplexity"]
        result["loss_examples"] = len(enc)
    if choice_rows:
        result.update(_choice_scores(model, tokenizer, ds, choice_rows, data, opts, where, max_length, compute_dtype))
    if data.format != "text" and enc is not None:
        result.update(_exact_matches(model, tokenizer, pairs, enc, opts, compute_dtype))
    return result


def _check_causal_columns(ds: Any, data: Any, where: str) -> list[int]:
    """The multiple-choice rows of ``ds``; DataError naming a column the format needs and lacks."""
    needed = {
        "text": [("text_column", data.text_column)],
        "instruction": [("prompt_column", data.prompt_column)],
        "chat": [("messages_column", data.messages_column)],
    }[data.format]
    choice_rows = [i for i, row in enumerate(ds) if _is_choice_row(row)] if CHOICES_COLUMN in ds.column_names else []
    if choice_rows:
        needed.append(("", ANSWER_COLUMN))
    if len(choice_rows) < len(ds) and data.format == "instruction":
        needed.append(("response_column", data.response_column))
    _require(ds, needed, f"{where} read as {data.format} data (--format)")
    return choice_rows


def _plain_rows(ds: Any, data: Any, chosen: set[int]) -> Any:
    """The rows scored for loss: all but the choice rows, without empty texts or missing responses."""
    plain = ds.select([i for i in range(len(ds)) if i not in chosen]) if chosen else ds
    if data.format == "text":
        plain = plain.rename_column(data.text_column, "text") if data.text_column != "text" else plain
        plain = plain.filter(lambda row: not _missing(row["text"]) and bool(str(row["text"]).strip()))
    elif data.format == "instruction":
        plain = plain.filter(lambda row: not _missing(row[data.response_column]))
    return plain


def _choice_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    ds: Any,
    choice_rows: list[int],
    data: Any,
    opts: EvalOptions,
    where: str,
    max_length: int,
    compute_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Choice accuracy (``acc`` and length-normalised ``acc_norm``) over the choice rows."""
    from fedlora.data.instruct import encode_pairs

    eos = getattr(tokenizer, "eos_token_id", None)
    input_ids: list[list[int]] = []
    prompt_lengths: list[int] = []
    spans: list[tuple[int, int]] = []
    texts: list[list[str]] = []
    answers: list[int] = []
    for i in choice_rows:
        row = ds[i]
        choices = [str(c) for c in row[CHOICES_COLUMN]]
        if len(choices) < 2:
            raise DataError(f"{where}: row {i + 1}: {CHOICES_COLUMN!r} needs at least 2 choices, has {len(choices)}")
        answers.append(answer_index(row[ANSWER_COLUMN], choices, f"{where}: row {i + 1}"))
        enc = encode_pairs(_choice_pairs(row, data, tokenizer, choices), tokenizer, max_length)
        spans.append((len(input_ids), len(input_ids) + len(choices)))
        for ids, plen in zip(enc.input_ids, enc.prompt_lengths):
            input_ids.append(_without_eos(ids, plen, eos))
            prompt_lengths.append(plen)
        texts.append(choices)
    sums, _ = score_continuations(
        model,
        input_ids,
        prompt_lengths,
        batch_size=opts.batch_size,
        pad_id=tokenizer.pad_token_id,
        compute_dtype=compute_dtype,
    )
    acc, acc_norm = choice_accuracy([sums[a:b] for a, b in spans], texts, answers)
    return {"choice_accuracy": acc, "choice_accuracy_norm": acc_norm, "choice_examples": len(choice_rows)}


def _exact_matches(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    enc: Any,
    opts: EvalOptions,
    compute_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Exact match of greedy answers against references of at most ``opts.max_answer_tokens``."""
    hits = total = 0
    limit = model_max_length(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    gen_eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    for (_, reference), ids, plen in zip(pairs, enc.input_ids, enc.prompt_lengths):
        if not reference.strip():
            continue
        ref_tokens = len(ids) - plen
        if ref_tokens > opts.max_answer_tokens or plen == 0:
            continue
        new_tokens = ref_tokens + EXTRA_NEW_TOKENS
        prompt_ids = ids[:plen][-max(limit - new_tokens, 1) :]
        out = greedy_answer(
            model, prompt_ids, new_tokens, eos_id=gen_eos, pad_id=tokenizer.pad_token_id, compute_dtype=compute_dtype
        )
        prediction = tokenizer.decode(out, skip_special_tokens=True)
        hits += int(exact_match(prediction, reference))
        total += 1
    return {"exact_match": hits / total, "exact_match_examples": total} if total else {}


def evaluate_classifier(
    model: torch.nn.Module,
    tokenizer: Any,
    ds: Any,
    layout: EvalLayout,
    opts: EvalOptions,
    num_labels: int,
    *,
    where: str,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of a sequence classifier over ``ds``'s text and label columns.

    Labels are mapped to class ids by name with the adapter's ``fedlora.json`` labels (in id
    order), or are the ids themselves (``0 .. num_labels - 1``) for an adapter without them.
    """
    from datasets import Value

    from fedlora.data import LabelEncoder, encode
    from fedlora.data.sources import check_cells
    from fedlora.training import evaluate

    text, label = layout.column("text_column"), layout.column("label_column")
    _require(ds, [("text_column", text), ("label_column", label)], where)
    check_cells(ds, [("data.text_column", text), ("data.label_column", label)], where)
    ds = ds.select_columns(list(dict.fromkeys([text, label])))
    ds = ds.rename_columns({c: n for c, n in ((text, "text"), (label, "label")) if c != n})
    if ds.features["label"] != Value("string"):
        ds = ds.cast_column("label", Value("string"))
    labels = layout.labels or [str(i) for i in range(num_labels)]
    ds = LabelEncoder(labels, []).encode(ds, where)
    max_length = min(layout.max_length or model_max_length(model), model_max_length(model))
    enc = encode(ds, tokenizer, max_length)
    metrics = evaluate(
        model, enc, batch_size=opts.batch_size, pad_id=tokenizer.pad_token_id, causal=False, compute_dtype=compute_dtype
    )
    return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]}


def pick_template(data_format: str, given: str | None, recorded: str, tokenizer: Any) -> str:
    """The template: ``--template``, else the run's (when it can render this format), else
    ``alpaca`` for instruction data and, for chat, the tokenizer's chat template or Vicuna's.

    Raises
    ------
    FedLoraError
        ``--template alpaca`` with chat data (Alpaca's prompt is single-turn).
    """
    if given:
        if data_format == "chat" and given == "alpaca":
            raise FedLoraError("--template alpaca is single-turn; with --format chat use chat or vicuna")
        return given
    if recorded and not (data_format == "chat" and recorded == "alpaca"):
        return recorded
    if data_format == "instruction":
        return "alpaca"
    return "chat" if getattr(tokenizer, "chat_template", None) else "vicuna"


def read_data(path: str | Path) -> Any:
    """A local csv/tsv/json/jsonl/parquet file as a ``datasets.Dataset`` (DataError naming it)."""
    from fedlora.data import LOCAL_SUFFIXES, _read_local

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--data: file not found: {p}")
    if p.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"--data {p}: unsupported format {p.suffix!r} (csv, tsv, json, jsonl, parquet)")
    ds = _read_local(p)
    if len(ds) == 0:
        raise DataError(f"--data {p}: no rows")
    return ds


def evaluate_adapter(
    adapter: str | Path,
    data: str | Path,
    *,
    base: str | None = None,
    data_format: str | None = None,
    template: str | None = None,
    columns: Mapping[str, str] | None = None,
    max_length: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """Everything ``fedlora evaluate`` does but printing: load, read, evaluate, one dict.

    Defaults come from the adapter's ``fedlora.json`` (the run's data format, template, columns,
    max length, labels) and otherwise from the file's columns (:func:`sniff_format`).

    Returns
    -------
    dict
        ``adapter``, ``base``, ``data``, ``task``, ``format`` (causal LM), ``examples`` and the
        metrics that apply: ``loss``, ``perplexity``, ``choice_accuracy``,
        ``choice_accuracy_norm``, ``exact_match`` (causal LM; with the number of rows behind each
        as ``loss_examples``, ``choice_examples``, ``exact_match_examples``), or ``loss`` and
        ``accuracy`` (classification).
    """
    opts = options or EvalOptions()
    info = read_adapter(adapter)
    ds = read_data(data)
    where = f"data file {Path(data).expanduser()}"
    layout = layout_from(info.meta, info.task)
    layout.columns.update(dict(columns or {}))
    if max_length:
        layout.max_length = max_length
    base_name, origin = _base_of(info, base)
    if info.task == "causal_lm":
        layout.format = data_format or layout.format or sniff_format(ds.column_names, layout)
    if opts.max_examples and len(ds) > opts.max_examples:
        ds = ds.select(range(opts.max_examples))

    num_labels = num_labels_of(info) if info.task == "classification" else 0
    loaded = load_base(base_name, origin, info.task, max(num_labels, 1), device, dtype)
    tokenizer = load_tokenizer(info, loaded.tokenizer)
    out: dict[str, Any] = {
        "adapter": str(info.path),
        "base": base_name,
        "data": str(Path(data).expanduser()),
        "task": info.task,
    }
    if info.task == "causal_lm":
        layout.template = pick_template(layout.format, template, layout.template, tokenizer)
        out["format"] = layout.format
        if layout.format != "text":
            out["template"] = layout.template
    metrics = _evaluate_quietly(loaded, info, tokenizer, ds, layout, opts, num_labels, where)
    return {**out, "examples": len(ds), **metrics}


def _base_of(info: Any, base: str | None) -> tuple[str, str]:
    """(base model name, where it came from): ``--base``, else the adapter's own record."""
    if base:
        return base, "--base"
    if info.base:
        return info.base, f"base_model_name_or_path in {info.path / 'adapter_config.json'}"
    raise FedLoraError(f"fedlora evaluate: {info.path}/adapter_config.json names no base model; pass --base")


def _evaluate_quietly(
    loaded: Any, info: Any, tokenizer: Any, ds: Any, layout: EvalLayout, opts: EvalOptions, num_labels: int, where: str
) -> dict[str, Any]:
    """The adapter on ``loaded``'s base, evaluated with transformers' notices silenced."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # stdout is one JSON object; transformers' notices are not news to the user
    try:
        model = attach_adapter(loaded.model, info)
        kwargs = {"where": where, "compute_dtype": loaded.compute_dtype}
        if info.task == "classification":
            return evaluate_classifier(model, tokenizer, ds, layout, opts, num_labels, **kwargs)
        return evaluate_causal(model, tokenizer, ds, layout, opts, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
