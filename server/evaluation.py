"""The server's evaluation of the global state on its held-out split.

A strategy's global state may describe one model or several (FL-TAC: one per task), each
possibly with a delta folded into the frozen weights (FeDeRA's residual, FLoRA's merges); the
strategy says which through :meth:`~fedlora.strategies.LoRAStrategy.views`, and each view is
installed on the shared adapter host and evaluated here.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import torch

from fedlora.data import subset, task_rows
from fedlora.strategies import GlobalView, LoRAStrategy, create
from fedlora.train.local import evaluate

if TYPE_CHECKING:
    from .server_app import Prepared


def dense_deltas(view: GlobalView) -> tuple[dict[str, torch.Tensor], str]:
    """A view's base delta as dense per-module matrices, and a token naming them."""
    dense = {m: b @ a for m, (b, a) in view.base_delta.items()}
    if not dense:
        return {}, ""
    crc = 0
    for module in sorted(view.base_delta):
        for t in view.base_delta[module]:
            crc = zlib.crc32(t.detach().contiguous().numpy().tobytes(), crc)
    return dense, f"server:{crc:08x}"


def evaluate_view(prepared: Prepared, view: GlobalView, rows: list[int] | None = None) -> dict[str, float]:
    """Evaluate one global model on the held-out split (or the given rows of it)."""
    host = prepared.host
    data = prepared.eval_data
    if rows is not None:
        data = subset(data, rows)
    kwargs: dict[str, Any] = {}
    tasks = list(getattr(prepared.data, "tasks", []) or [])
    if tasks and prepared.cfg.model.task == "classification":
        kwargs = {"task_labels": {i: prepared.data.task_labels[t] for i, t in enumerate(tasks)}, "task_names": tasks}
    dense, token = dense_deltas(view)
    with host.lock:
        name = host.ensure(view.spec, seed=prepared.cfg.seed)
        host.set_base_delta(dense, token)
        # A view may leave out LoRA factors whose product is zero (FLoRA after a merge): zero
        # their B so nothing a client left in the shared adapter leaks into the evaluation.
        missing_b = {
            k: torch.zeros(shape) for k, shape in host.shapes(name).items() if k not in view.state and ".lora_B." in k
        }
        host.load_state(name, {**view.state, **missing_b})
        return evaluate(
            host.peft_model,
            data,
            batch_size=max(prepared.cfg.federation.batch_size, 32),
            pad_id=prepared.loaded.pad_id,
            causal=prepared.cfg.model.task == "causal_lm",
            compute_dtype=prepared.loaded.compute_dtype,
            **kwargs,
        )


def evaluate_views(prepared: Prepared, views: list[GlobalView]) -> dict[str, float]:
    """Metrics of the global state: one model on the whole split, or one per task on its rows.

    With per-task models, ``eval_<metric>/<task>`` is each task's own model on its own rows and
    ``eval_<metric>`` their mean weighted by rows.
    """
    if len(views) == 1 and not views[0].name:
        return evaluate_view(prepared, views[0])
    rows = task_rows(prepared.data.eval)
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    count = 0
    for view in views:
        view_rows = rows.get(view.name, [])
        if not view_rows:
            continue
        metrics = evaluate_view(prepared, view, view_rows)
        for key, value in metrics.items():
            if "/" in key:
                continue
            out[f"{key}/{view.name}"] = value
            totals[key] = totals.get(key, 0.0) + value * len(view_rows)
        count += len(view_rows)
    for key, value in totals.items():
        out[key] = value / max(count, 1)
    return dict(sorted(out.items()))


def evaluate_state(
    prepared: Prepared, state: dict[str, torch.Tensor], strategy: LoRAStrategy | None = None
) -> dict[str, float]:
    """Server-side evaluation of a global state on the held-out split."""
    if strategy is None:
        strategy = create(prepared.cfg, prepared.spec, tasks=list(getattr(prepared.data, "tasks", []) or []))
    return evaluate_views(prepared, strategy.views(state))
