"""Local training and evaluation loops over a peft model with one active adapter."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlora.config import LR_SCHEDULES
from fedlora.data import Encoded, collate
from fedlora.model.devices import autocast, model_device
from fedlora.train.dpsgd import (
    DPSGD,
    DPSettings,
    check_moved,
    micro_batches,
    per_example_causal_loss,
    poisson_batches,
)


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def steps_for(num_examples: int, batch_size: int, local_steps: int, local_epochs: float) -> int:
    """Local optimizer steps: ``local_epochs`` passes when set, else ``local_steps``.

    A pass is ``examples / batch`` steps, for shuffled batches and for Poisson ones alike (a
    Poisson step at rate ``q = batch / examples`` sees ``q * examples`` rows on average, so
    ``1 / q`` steps make an epoch). A batch of at least the whole data is one pass per step (and
    a Poisson rate of 1), so it is counted as the data's size.
    """
    if local_epochs > 0:
        return max(1, math.ceil(local_epochs * num_examples / max(1, min(batch_size, num_examples))))
    return local_steps


#: Losses are capped at this before ``exp``: a diverged model's perplexity is a number, not an overflow.
MAX_LOG_PERPLEXITY = 50.0


def perplexity(nll: float) -> float:
    """``exp(nll)``, the log capped at :data:`MAX_LOG_PERPLEXITY` so a diverged model gives a number."""
    return float(math.exp(min(nll, MAX_LOG_PERPLEXITY)))


def round_lr(lr: float, server_round: int, rounds: int, schedule: str = "constant", lr_min: float = 0.0) -> float:
    """The client learning rate of round ``server_round`` (1-based) of ``rounds``.

    ``constant``: ``lr`` every round. ``cosine``: ``lr_min + (lr - lr_min) * (1 + cos(pi * (r - 1)
    / (R - 1))) / 2``, so round 1 gets ``lr`` and round ``R`` gets ``lr_min`` (``R = 1``: ``lr``).
    ``R`` is the run's current ``rounds``: a run extended at ``--resume`` stretches the rest of
    its schedule over the new length (the rounds already done keep the rates they had).
    """
    if schedule == "constant" or rounds <= 1:
        return float(lr)
    if schedule != "cosine":
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    progress = min(max(server_round - 1, 0), rounds - 1) / (rounds - 1)
    return float(lr_min + (lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2)


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
    regularizer: Callable[[], torch.Tensor] | None = None,
    before_step: Callable[[int], None] | None = None,
    dp: DPSettings | None = None,
    compute_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on ``params`` (all other parameters stay frozen).

    Parameters
    ----------
    model, params : torch.nn.Module, iterable of Parameter
        The peft model with the client's adapter active, and the tensors to train (their
        ``requires_grad`` is set here and cleared afterwards).
    data : Encoded
        The client's tokenized examples.
    steps, batch_size, lr, pad_id, causal : int, int, float, int, bool
        Optimisation budget; the padding token id; next-token loss instead of classification.
    seed : int
        Seeds dropout, the batch order (or Poisson sampling) and the DP noise.
    on_step, before_step : callable, optional
        Called with (step, loss) after every step (progress), and with the 0-based step before
        its forward pass (DyLoRA samples the step's rank).
    regularizer : callable, optional
        A penalty added to each step's loss, not to the reported one (HetLoRA's); under DP-SGD
        its gradient, which depends on no example, joins the privatized gradient.
    dp : DPSettings, optional
        DP-SGD (:class:`fedlora.train.dpsgd.DPSGD`): Poisson batches, per-example clipping,
        Gaussian noise; the trained tensors must move every step, else RuntimeError.
    compute_dtype : torch.dtype, optional
        Autocast the forward pass to it; the trained tensors and optimizer state stay float32.
    """
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    device = model_device(model)
    loop = _Steps(model, params, data, device, pad_id, causal, compute_dtype, on_step, before_step, regularizer)
    try:
        if dp is None:
            seen = loop.plain(optimizer, steps, batch_size, seed)
        else:
            seen = loop.private(optimizer, steps, dp, seed)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return TrainResult(loss=loop.total / max(seen, 1), steps=steps, examples=seen)


@dataclass
class _Steps:
    """The optimizer steps of one :func:`train_local` call, without DP or under DP-SGD; the
    example-weighted loss sum accumulates in :attr:`total`."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    data: Encoded
    device: torch.device
    pad_id: int
    causal: bool
    compute_dtype: torch.dtype | None
    on_step: Callable[[int, float], None] | None
    before_step: Callable[[int], None] | None
    regularizer: Callable[[], torch.Tensor] | None
    total: float = 0.0

    def _batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return to_device(collate(self.data, idx, self.pad_id, self.causal), self.device)

    def _done(self, step: int, value: float, size: int) -> int:
        self.total += value * size
        if self.on_step is not None:
            self.on_step(step + 1, value)
        return size

    def plain(self, optimizer: torch.optim.Optimizer, steps: int, batch_size: int, seed: int) -> int:
        """``steps`` AdamW steps on seeded shuffled batches; the examples seen."""
        batches = batch_indices(len(self.data), batch_size, seed)
        seen = 0
        for step in range(steps):
            idx = next(batches)
            if self.before_step is not None:
                self.before_step(step)
            batch = self._batch(idx)
            with autocast(self.device, self.compute_dtype):
                loss = self.model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            (loss + self.regularizer() if self.regularizer is not None else loss).backward()
            optimizer.step()
            seen += self._done(step, float(loss.detach()), len(idx))
        return seen

    def private(self, optimizer: torch.optim.Optimizer, steps: int, dp: DPSettings, seed: int) -> int:
        """``steps`` DP-SGD steps on Poisson batches (an empty batch still adds noise), each in
        micro-batches of ``dp.physical_batch_size`` with one noise draw; the examples seen. Every
        step must move the trained tensors, and the noise draws must be the ``steps`` the
        client's ledger recorded."""
        seen = 0
        lengths = [len(row) for row in self.data.input_ids] if dp.physical_batch_size > 0 else None
        with DPSGD(self.model, self.params, optimizer, dp, seed) as engine:
            for step, idx in enumerate(poisson_batches(len(self.data), dp.sample_rate, steps, seed)):
                if self.before_step is not None:
                    self.before_step(step)
                before = [p.detach().clone() for p in self.params]
                engine.optimizer.zero_grad(set_to_none=True)
                pieces = micro_batches(idx, dp.physical_batch_size, lengths)
                value = 0.0
                for i, piece in enumerate(pieces):
                    value += self._private_backward(engine, piece) * len(piece)
                    if i < len(pieces) - 1:
                        engine.accumulate()
                extra = None
                if self.regularizer is not None:
                    extra = torch.autograd.grad(self.regularizer(), self.params, allow_unused=True)
                engine.step(extra)
                check_moved(before, self.params, step + 1)
                seen += self._done(step, value / max(len(idx), 1), len(idx))
            if engine.noised_steps != steps:
                raise RuntimeError(f"DP-SGD drew noise {engine.noised_steps} times for {steps} logical steps")
        return seen

    def _private_backward(self, engine: DPSGD, idx: list[int]) -> float:
        """Per-example gradients of one micro-batch (none for an empty batch); its mean loss."""
        if not idx:
            engine.empty_batch()
            return 0.0
        batch = self._batch(idx)
        with autocast(self.device, self.compute_dtype):
            if self.causal:
                labels = batch.pop("labels")
                loss = per_example_causal_loss(engine.module(**batch).logits.float(), labels)
            else:
                loss = engine.module(**batch).loss
        loss.backward()
        return float(loss.detach())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Encoded,
    *,
    batch_size: int,
    pad_id: int,
    causal: bool,
    task_labels: Mapping[int, Sequence[int]] | None = None,
    task_names: Sequence[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (causal LM) over ``data``.

    Parameters
    ----------
    model, data : torch.nn.Module, Encoded
        The model with the adapter to judge active; tokenized held-out examples.
    batch_size, pad_id : int
        Batching.
    causal : bool
        Next-token loss and perplexity instead of classification.
    task_labels : mapping of int to sequence of int, optional
        For multi-task classification, each task id's label ids. With ``data.task_ids`` set, a
        row's prediction is the argmax over its own task's labels only (a task's classifier never
        answers with another task's class), and ``eval_accuracy/<task>`` is added for every task
        present. ``eval_accuracy`` is then the overall accuracy of these predictions; the loss
        stays the model's own.
    task_names : sequence of str, optional
        Names by task id for the per-task keys (default: the task ids).
    compute_dtype : torch.dtype, optional
        Autocast the forward pass to it; batches go to the model's device.
    """
    model.eval()
    device = model_device(model)
    masked = not causal and task_labels is not None and data.task_ids is not None
    loss_sum, weight = 0.0, 0
    tally = _Tally(num_tasks=max(data.task_ids) + 1 if masked else 0)
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        batch = to_device(collate(data, idx, pad_id, causal), device)
        with autocast(device, compute_dtype):
            out = model(**batch)
        if causal:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * tokens
            weight += tokens
            continue
        loss_sum += float(out.loss) * len(idx)
        weight += len(idx)
        tally.add(out.logits, batch["labels"], [data.task_ids[i] for i in idx] if masked else None, task_labels)
    loss = loss_sum / max(weight, 1)
    if causal:
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
    result = {"eval_loss": loss, "eval_accuracy": tally.correct / max(len(data), 1)}
    for tid in sorted(tally.count):
        name = task_names[tid] if task_names is not None and tid < len(task_names) else str(tid)
        result[f"eval_accuracy/{name}"] = tally.task_correct[tid] / tally.count[tid]
    return result


@dataclass
class _Tally:
    """Correct predictions of a classification evaluation, overall and per task."""

    num_tasks: int = 0
    correct: int = 0
    task_correct: dict[int, int] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    allowed: torch.Tensor | None = None  # (task id, label id) -> may be predicted; built on first batch

    def add(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        task_ids: list[int] | None,
        task_labels: Mapping[int, Sequence[int]] | None,
    ) -> None:
        """Count one batch; with ``task_ids``, each row predicts among its own task's labels only."""
        labels = labels.to(logits.device)
        if task_ids is None:
            self.correct += int((logits.argmax(-1) == labels).sum())
            return
        if self.allowed is None:
            self.allowed = _allowed_labels(task_labels, self.num_tasks, logits.shape[-1]).to(logits.device)
        tids = torch.tensor(task_ids, dtype=torch.long, device=logits.device)
        hits = logits.masked_fill(~self.allowed[tids], float("-inf")).argmax(-1) == labels
        self.correct += int(hits.sum())
        for tid, hit in zip(tids.tolist(), hits.tolist()):
            self.count[tid] = self.count.get(tid, 0) + 1
            self.task_correct[tid] = self.task_correct.get(tid, 0) + int(hit)


def _allowed_labels(task_labels: Mapping[int, Sequence[int]], num_tasks: int, num_labels: int) -> torch.Tensor:
    """Boolean (task, label) mask; a task missing from ``task_labels`` may predict any label."""
    allowed = torch.ones((max(num_tasks, 1), num_labels), dtype=torch.bool)
    for tid in range(num_tasks):
        if tid in task_labels:
            allowed[tid] = False
            allowed[tid, [i for i in task_labels[tid] if 0 <= i < num_labels]] = True
    return allowed
