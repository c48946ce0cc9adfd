"""Adapters in PEFT's own format: what ``PeftModel.from_pretrained(base, dir)`` loads."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedlora.config import RunConfig, is_image_task
from fedlora.model.adapters import AdapterHost, AdapterSpec, lora_keys

PEFT_PREFIX = "base_model.model."


def fold_base_delta(
    spec: AdapterSpec, state: Mapping[str, torch.Tensor], base_delta: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """A plain LoRA adapter on the *pretrained* base equal to ``base delta + LoRA``.

    For a module with delta ``D = B_d @ A_d`` and LoRA ``scaling * B @ A`` the exported factors
    are ``B' = [scaling * B, B_d]`` and ``A' = [A; A_d]`` with rank ``r + R_d`` and alpha equal to
    that rank (scaling 1), written as peft ``rank_pattern``/``alpha_pattern`` entries. The
    product is exact; the price is a higher rank where the delta has one.

    Returns
    -------
    tuple
        The export's spec (with per-module patterns) and its tensors.
    """
    if not base_delta:
        return spec, dict(state)
    out = dict(state)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, (b_d, a_d) in sorted(base_delta.items()):
        a_key, b_key = lora_keys(module)
        if a_key in state:
            b_new = torch.cat([spec.scaling * state[b_key], b_d], dim=1)
            a_new = torch.cat([state[a_key], a_d], dim=0)
        else:
            b_new, a_new = b_d, a_d
        out[a_key], out[b_key] = a_new, b_new
        rel = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        ranks[rel] = int(a_new.shape[0])
        alphas[rel] = float(a_new.shape[0])
    return replace(spec, rank_pattern=tuple(sorted(ranks.items())), alpha_pattern=tuple(sorted(alphas.items()))), out


def data_layout(cfg: RunConfig) -> dict[str, Any]:
    """How the run read its examples, for ``fedlora evaluate`` to read a file the same way:
    ``model_task``, ``format``, ``template``, the column names and ``max_length`` (tokens)."""
    d = cfg.data
    keys = ("text_column", "label_column", "prompt_column", "input_column", "response_column", "messages_column")
    layout = {
        "model_task": cfg.model.task,
        "format": getattr(d, "format", "text"),
        "template": getattr(d, "template", ""),
        "columns": {key: getattr(d, key) for key in keys if isinstance(getattr(d, key, None), str)},
        "max_length": cfg.model.max_length,
    }
    if is_image_task(cfg.model.task):  # fedlora.eval.images reads images and prompts the same way
        layout["columns"]["image_column"] = d.image_column
        layout["prompt_template"] = d.prompt_template
    return layout


def export_adapter(
    host: AdapterHost,
    adapter: str,
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    cfg: RunConfig,
    labels: list[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Install ``state`` into ``adapter`` and write it with ``save_pretrained`` to ``out_dir``.

    The adapter config names the base model as the user named it (a hub name stays a hub
    name even when an offline copy was used), and ``fedlora.json`` records what a user needs to
    rebuild the base (task, labels) and how the run read its data (``data``: :func:`data_layout`,
    what ``fedlora evaluate`` reads a file with). The tokenizer is saved beside it.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out = Path(out_dir)
    with host.lock:
        host.load_state(adapter, state)
        peft_config = host.peft_model.peft_config[adapter]
        original = peft_config.base_model_name_or_path
        peft_config.base_model_name_or_path = cfg.model.name
        try:
            with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
                host.peft_model.save_pretrained(tmp, selected_adapters=[adapter])
                # peft writes non-default adapters into a sub-folder named after the adapter.
                written = Path(tmp) / adapter if (Path(tmp) / adapter).is_dir() else Path(tmp)
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                for item in written.iterdir():
                    if item.is_file():
                        shutil.copy2(item, out / item.name)
        finally:
            peft_config.base_model_name_or_path = original
    host.loaded.tokenizer.save_pretrained(str(out))
    meta = {
        "base_model": cfg.model.name,
        "task": cfg.model.task,
        "labels": labels,
        "num_labels": len(labels),
        "rank": host.specs[adapter].rank,
        "alpha": host.specs[adapter].alpha,
        "quantization": cfg.model.quantization,
        "strategy": cfg.strategy.name,
        "data": data_layout(cfg),
        **dict(extra or {}),
    }
    (out / "fedlora.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def export_views(
    host: AdapterHost,
    views: list[Any],
    out_dir: str | Path,
    cfg: RunConfig,
    labels: list[str],
    task_labels: Mapping[str, list[int]],
) -> list[Path]:
    """Write each of a strategy's global ``views`` (:class:`~fedlora.strategies.GlobalView`) as a
    peft adapter, base deltas folded in: one folder, or one sub-folder per named (task) view."""
    written = []
    for view in views:
        spec, tensors = fold_base_delta(view.spec, view.state, view.base_delta)
        extra: dict[str, Any] = {}
        if view.name:
            extra = {"task": view.name, "task_label_ids": task_labels.get(view.name, [])}
        target = Path(out_dir) / view.name if view.name else Path(out_dir)
        with host.lock:
            host.set_base_delta({}, "")
            written.append(export_adapter(host, host.ensure(spec, seed=cfg.seed), tensors, target, cfg, labels, extra))
    return written
