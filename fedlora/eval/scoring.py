"""The scoring math of ``fedlora evaluate``: pure functions over logits, token ids and strings.

Three measures, each over the rows of a data file it applies to:

* **loss / perplexity** (rows with a reference response, or every row of raw text): the
  token-weighted mean negative log-likelihood of the scored tokens (the response only, for
  instruction and chat data; the prompt is masked out exactly as in training) and its ``exp``.
  The numbers come from :func:`fedlora.train.local.evaluate`, the loop the server uses.
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

import re
from collections.abc import Sequence
from typing import Any

import torch

from fedlora.errors import DataError
from fedlora.eval.inputs import ANSWER_COLUMN
from fedlora.train.local import MAX_LOG_PERPLEXITY, perplexity  # noqa: F401 - part of this module's scoring API

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
    from fedlora.model.devices import autocast, model_device
    from fedlora.train.local import to_device

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
    from fedlora.model.devices import autocast, model_device

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
