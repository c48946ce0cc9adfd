"""What ``fedlora evaluate`` reads: the data file's layout, the adapter folder, the base model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import DataError, FedLoraError, ModelError
from fedlora.train.local import MAX_LOG_PERPLEXITY, perplexity  # noqa: F401 - part of this module's scoring API

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
    """The base model and tokenizer with fedlora's loader (:func:`fedlora.model.loading.resolve_model_source`:
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
    from fedlora.model.devices import placement
    from fedlora.model.hub import offline_unless_reachable
    from fedlora.model.loading import _load, resolve_model_source

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
