"""``fedlora evaluate``: an adapter's loss, perplexity, choice accuracy and exact match on a file."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import DataError, FedLoraError
from fedlora.eval.images import evaluate_images, image_task
from fedlora.eval.inputs import (
    ANSWER_COLUMN,
    CHOICES_COLUMN,
    EXTRA_NEW_TOKENS,
    TARGET_DELIMITER,
    EvalLayout,
    attach_adapter,
    layout_from,
    load_base,
    load_tokenizer,
    num_labels_of,
    pick_template,
    read_adapter,
    read_data,
    sniff_format,
)
from fedlora.eval.scoring import answer_index, choice_accuracy, exact_match, greedy_answer, score_continuations
from fedlora.train.local import MAX_LOG_PERPLEXITY, perplexity  # noqa: F401 - part of this module's scoring API

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
    from fedlora.train.local import evaluate

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
    from fedlora.train.local import evaluate

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
    if image_task(adapter):  # an image classifier or CLIP: its own reader and metrics
        sizes = {"batch_size": opts.batch_size, "max_examples": opts.max_examples}
        return evaluate_images(adapter, data, base=base, columns=columns, device=device, dtype=dtype, **sizes)
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
