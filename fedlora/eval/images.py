"""``fedlora evaluate`` for image adapters: an image classifier's accuracy, and for CLIP the
zero-shot accuracy of the base model beside the adapter's.

The adapter's ``fedlora.json`` says the task, the class names in id order, the image and label
columns and (CLIP) the prompt template the run used; ``--data`` is an image folder or a
csv/jsonl/parquet file with those columns (``--column image_column=...`` renames), read and
checked as a device's own data is (:func:`fedlora.data.images.read_device_images`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig, is_image_task
from fedlora.data.images import encode_images, read_device_images
from fedlora.data.labels import LabelEncoder
from fedlora.errors import FedLoraError


def image_task(adapter: str | Path) -> str:
    """The image task an adapter folder was trained for (``fedlora.json``), or "" for any other."""
    meta = Path(adapter).expanduser() / "fedlora.json"
    try:
        task = json.loads(meta.read_text(encoding="utf-8")).get("task", "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return ""
    return task if isinstance(task, str) and is_image_task(task) else ""


def _layout(meta: Mapping[str, Any], columns: Mapping[str, str]) -> DataConfig:
    """The run's image and label columns and prompt template, ``--column`` overriding."""
    recorded = dict((meta.get("data") or {}).get("columns") or {})
    recorded.update(columns)
    keys = ("image_column", "label_column")
    template = (meta.get("data") or {}).get("prompt_template") or DataConfig().prompt_template
    return DataConfig(**{k: v for k, v in recorded.items() if k in keys}, prompt_template=template)


def evaluate_images(
    adapter: str | Path,
    data: str | Path,
    *,
    base: str | None = None,
    columns: Mapping[str, str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
    max_examples: int = 0,
) -> dict[str, Any]:
    """The adapter's ``loss`` and ``accuracy`` on ``data``; for CLIP also ``base_accuracy``, the
    pretrained model's zero-shot accuracy with the same prompts.

    Raises
    ------
    FedLoraError
        One line: no class names recorded, an unreadable image (naming the file and row), a
        label the run did not have, a base the adapter does not fit.
    """
    from fedlora.eval.inputs import AdapterInfo, attach_adapter, load_base
    from fedlora.train.local import evaluate

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FedLoraError(f"fedlora evaluate: {path} is not a peft adapter folder (no adapter_config.json)")
    meta = json.loads((path / "fedlora.json").read_text(encoding="utf-8"))
    task, labels = meta["task"], [str(x) for x in meta.get("labels") or []]
    if len(labels) < 2:
        raise FedLoraError(f"fedlora evaluate: {path}/fedlora.json lists no class names; the run's labels are needed")
    layout = _layout(meta, dict(columns or {}))
    ds = LabelEncoder(labels, []).encode(read_device_images(layout, Path(data).expanduser()), f"data {data}")
    if max_examples and len(ds) > max_examples:
        ds = ds.select(range(max_examples))
    name = base or meta.get("base_model")
    if not name:
        raise FedLoraError(f"fedlora evaluate: {path}/fedlora.json names no base model; pass --base")
    loaded = load_base(
        name, "--base" if base else f"base_model in {path / 'fedlora.json'}", task, len(labels), device, dtype
    )
    examples = encode_images(ds, loaded.tokenizer, task, labels, layout.prompt_template)
    kwargs = {"batch_size": batch_size, "pad_id": 0, "causal": False, "compute_dtype": loaded.compute_dtype}
    out: dict[str, Any] = {"adapter": str(path), "base": name, "data": str(data), "task": task, "examples": len(ds)}
    if task == "clip":  # the base first: peft injects the adapter into the model it wraps
        out["base_accuracy"] = evaluate(loaded.model, examples, **kwargs)["eval_accuracy"]
    model = attach_adapter(loaded.model, AdapterInfo(path=path, peft_config={}, meta=meta, task=task))
    metrics = evaluate(model, examples, **kwargs)
    return {**out, "loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]}
