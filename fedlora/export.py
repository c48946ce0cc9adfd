"""Adapters in PEFT's own format: what ``PeftModel.from_pretrained(base, dir)`` loads."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlora.adapters import AdapterHost
from fedlora.config import RunConfig


def export_adapter(
    host: AdapterHost,
    adapter: str,
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    cfg: RunConfig,
    labels: list[str],
) -> Path:
    """Install ``state`` into ``adapter`` and write it with ``save_pretrained`` to ``out_dir``.

    The adapter config names the base model as the user named it (a hub name stays a hub
    name even when an offline copy was used), and ``fedlora.json`` records what a user needs to
    rebuild the base (task, labels). The tokenizer is saved beside it.

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
    }
    (out / "fedlora.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
