"""Tokenized examples and batches: each dataset tokenized once, unpadded; rows chosen by index
(a task's rows, a step's batch) and padded dynamically only when batched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.data.columns import values


@dataclass
class Encoded:
    """Token ids of a dataset, unpadded, plus labels (classification) and task ids (multi-task)
    for batching.

    ``prompt_lengths`` (instruction and chat data, :mod:`fedlora.data.instruct`): how many
    leading tokens of each row are prompt, which the causal LM loss does not score; None scores
    every token (raw text).
    """

    input_ids: list[list[int]]
    labels: list[int] | None
    task_ids: list[int] | None = None
    prompt_lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(ds: Any, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize the ``text`` column once; batches pad dynamically."""
    ids = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)["input_ids"]
    labels = list(ds["labels"]) if "labels" in ds.column_names else None
    task_ids = list(ds["task_id"]) if "task_id" in ds.column_names else None
    return Encoded(input_ids=ids, labels=labels, task_ids=task_ids)


def subset(enc: Encoded, indices: Iterable[int]) -> Encoded:
    """The rows ``indices`` of ``enc``, in that order (the lists are new, the rows shared)."""
    indices = list(indices)
    if not isinstance(enc, Encoded):  # image examples (fedlora.data.images) select their own rows
        return enc.subset(indices)
    return Encoded(
        input_ids=[enc.input_ids[i] for i in indices],
        labels=None if enc.labels is None else [enc.labels[i] for i in indices],
        task_ids=None if enc.task_ids is None else [enc.task_ids[i] for i in indices],
        prompt_lengths=None if enc.prompt_lengths is None else [enc.prompt_lengths[i] for i in indices],
    )


def task_rows(ds: Any) -> dict[str, list[int]]:
    """Row indices of a dataset per task name; empty when it has no ``task`` column."""
    if "task" not in ds.column_names:
        return {}
    out: dict[str, list[int]] = {}
    for i, task in enumerate(values(ds, "task")):
        out.setdefault(str(task), []).append(i)
    return out


def split_by_task(enc: Encoded) -> dict[int, Encoded]:
    """``enc``'s rows grouped by task id (ascending), for training one adapter per task.

    Raises
    ------
    ValueError
        When ``enc`` has no task ids (the data has no tasks).
    """
    if enc.task_ids is None:
        raise ValueError("split_by_task: the encoded data has no task ids (data.tasks and data.task_column unset)")
    rows: dict[int, list[int]] = {}
    for i, task_id in enumerate(enc.task_ids):
        rows.setdefault(task_id, []).append(i)
    return {task_id: subset(enc, rows[task_id]) for task_id in sorted(rows)}


def collate(enc: Encoded, indices: list[int], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Pad the chosen rows into a batch; causal LM targets are the inputs with padding (and, for
    instruction data, each row's prompt) ignored. Image examples (:mod:`fedlora.data.images`)
    decode their own batch."""
    if not isinstance(enc, Encoded):
        return enc.collate(indices)
    rows = [enc.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if causal:
        labels = input_ids.masked_fill(mask == 0, -100)
        if enc.prompt_lengths is not None:  # only the response is learned, not the prompt
            for j, i in enumerate(indices):
                labels[j, : enc.prompt_lengths[i]] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([enc.labels[i] for i in indices], dtype=torch.long)
    return batch
