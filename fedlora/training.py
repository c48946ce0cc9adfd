"""Local training and evaluation loops over a peft model with one active adapter."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from fedlora.data import Encoded, collate


@dataclass
class TrainResult:
    """What one client's local training produced."""

    loss: float
    steps: int
    examples: int


def batch_indices(num_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded shuffled passes over ``range(num_examples)`` in batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_examples, generator=gen).tolist()
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def steps_for(num_examples: int, batch_size: int, local_steps: int, local_epochs: float) -> int:
    """Local optimizer steps: ``local_epochs`` passes when set, else ``local_steps``."""
    if local_epochs > 0:
        return max(1, math.ceil(local_epochs * num_examples / batch_size))
    return local_steps


def train_local(
    model: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    causal: bool,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on ``params`` (all other parameters stay frozen).

    Parameters
    ----------
    model : torch.nn.Module
        The peft model, with the client's adapter active.
    params : iterable of Parameter
        The tensors to train; their ``requires_grad`` is set here and cleared afterwards.
    data : Encoded
        The client's tokenized examples.
    steps, batch_size, lr : int, int, float
        Optimisation budget.
    pad_id : int
        Token id used for padding.
    causal : bool
        Next-token loss (causal LM) instead of classification.
    seed : int
        Seeds dropout and the batch order, so a client's round is reproducible.
    on_step : callable, optional
        Called with (step, loss) after every step, for progress display.
    """
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    total, seen = 0.0, 0
    batches = batch_indices(len(data), batch_size, seed)
    try:
        for step in range(steps):
            idx = next(batches)
            batch = collate(data, idx, pad_id, causal)
            out = model(**batch)
            loss = out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            total += value * len(idx)
            seen += len(idx)
            if on_step is not None:
                on_step(step + 1, value)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return TrainResult(loss=total / max(seen, 1), steps=steps, examples=seen)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Encoded, *, batch_size: int, pad_id: int, causal: bool
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (causal LM) over ``data``."""
    model.eval()
    loss_sum, weight, correct = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = collate(data, idx, pad_id, causal)
        out = model(**batch)
        if causal:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * tokens
            weight += tokens
        else:
            loss_sum += float(out.loss) * len(idx)
            weight += len(idx)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    loss = loss_sum / max(weight, 1)
    if causal:
        return {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 50.0)))}
    return {"eval_loss": loss, "eval_accuracy": correct / max(len(data), 1)}
