"""Datasets: local csv/tsv/json/parquet, a hub name, or the built-in synthetic task; partitions
across clients with flwr-datasets; tokenized batches for training.

Everything a client needs is cached per process by the data config, so a hundred virtual
clients in one process read and partition the data once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import DataConfig, RunConfig
from fedlora.errors import DataError

LOCAL_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".parquet"}
EVAL_STEMS = ("validation", "dev", "test")
SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class TaskData:
    """The training pool (partitioned across clients) and the server's held-out set.

    Attributes
    ----------
    train, eval : datasets.Dataset
        Columns ``text`` and, for classification, ``label`` (int ids into ``labels``).
    labels : list of str
        Class names in id order (empty for causal LM).
    source : str
        What was read, for messages and reports.
    """

    train: Any
    eval: Any
    labels: list[str]
    source: str


def _read_local(path: Path) -> Any:
    import pandas as pd
    from datasets import Dataset

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".tsv":
            # TSV corpora (GLUE) carry raw quotes inside sentences: no quote processing.
            frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
        elif suffix in (".json", ".jsonl"):
            text = path.read_text(encoding="utf-8").lstrip()
            frame = pd.read_json(path, lines=not text.startswith("["))
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"data file {path}: unsupported format {suffix!r} (csv, tsv, json, jsonl, parquet)")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds; the user needs one line
        raise DataError(f"data file {path}: cannot read: {str(err).splitlines()[0]}") from None
    return Dataset.from_pandas(frame, preserve_index=False)


def _find_in_dir(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in sorted(LOCAL_SUFFIXES):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _looks_local(path: str) -> bool:
    p = Path(path)
    return p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or p.exists()


def _load_raw(cfg: DataConfig, seed: int) -> tuple[Any, Any | None, str]:
    """(train, eval or None, description) before column checks."""
    from datasets import Dataset

    if cfg.path.startswith(SYNTHETIC_PREFIX):
        from fedlora.synthetic import generate_topics

        kind = cfg.path[len(SYNTHETIC_PREFIX):]
        if kind != "topics":
            raise DataError(f"data.path: unknown synthetic task {kind!r} (known: synthetic:topics)")
        n_train = cfg.max_train_examples or 2400
        n_eval = cfg.max_eval_examples or 400
        train = Dataset.from_dict(generate_topics(n_train, seed=seed))
        evals = Dataset.from_dict(generate_topics(n_eval, seed=seed + 7919))
        return train, evals, cfg.path
    if _looks_local(cfg.path):
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            train_file = _find_in_dir(path, ("train",))
            if train_file is None:
                raise DataError(f"data.path: directory {path} has no train.csv/.tsv/.json/.jsonl/.parquet")
            eval_file = _find_in_dir(path, EVAL_STEMS)
            train = _read_local(train_file)
            evals = _read_local(eval_file) if eval_file and not cfg.eval_path else None
            return train, evals, str(train_file)
        if not path.is_file():
            raise DataError(f"data.path: file not found: {path}")
        return _read_local(path), None, str(path)
    # A hub dataset name: the real loading code, which needs network access to the hub.
    try:
        from datasets import load_dataset

        splits = load_dataset(cfg.path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"data.path: cannot load hub dataset {cfg.path!r}: {str(err).splitlines()[0]}") from None
    if "train" not in splits:
        raise DataError(f"data.path: hub dataset {cfg.path!r} has no 'train' split ({', '.join(splits)})")
    eval_name = cfg.eval_split or next((s for s in ("validation", "test") if s in splits), "")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise DataError(f"data.eval_split: {cfg.path!r} has no split {cfg.eval_split!r} ({', '.join(splits)})")
    return splits["train"], (splits[eval_name] if eval_name else None), cfg.path


def _require_columns(ds: Any, columns: list[tuple[str, str]], where: str) -> None:
    for key, column in columns:
        if column not in ds.column_names:
            raise DataError(
                f"{where}: no column {column!r} (config key '{key}'); columns are: {', '.join(ds.column_names)}"
            )


def load_task_data(cfg: RunConfig) -> TaskData:
    """Read, check and split the configured data (cached per process)."""
    key = (cfg.data.__repr__(), cfg.model.task, cfg.seed)
    with _LOCK:
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = _load_task_data(cfg)
        return _TASK_CACHE[key]


def _load_task_data(cfg: RunConfig) -> TaskData:
    d = cfg.data
    classification = cfg.model.task == "classification"
    train, evals, source = _load_raw(d, cfg.seed)
    if d.eval_path:
        path = Path(d.eval_path).expanduser()
        if not path.is_file():
            raise DataError(f"data.eval_path: file not found: {path}")
        evals = _read_local(path)
    needed = [("data.text_column", d.text_column)]
    if classification:
        needed.append(("data.label_column", d.label_column))
    if d.partitioner == "column":
        needed.append(("data.partition_column", d.partition_column))
    _require_columns(train, needed, f"data file {source}")
    if evals is not None:
        _require_columns(evals, needed[:2], "evaluation data")
    else:
        split = train.train_test_split(test_size=d.eval_fraction, seed=cfg.seed, shuffle=True)
        train, evals = split["train"], split["test"]
    if d.max_train_examples and len(train) > d.max_train_examples:
        train = train.shuffle(seed=cfg.seed).select(range(d.max_train_examples))
    if d.max_eval_examples and len(evals) > d.max_eval_examples:
        evals = evals.shuffle(seed=cfg.seed).select(range(d.max_eval_examples))

    keep = [d.text_column] + ([d.label_column] if classification else [])
    if d.partitioner == "column" and d.partition_column not in keep:
        keep.append(d.partition_column)
    train = train.select_columns(keep)
    evals = evals.select_columns([c for c in keep if c in evals.column_names])
    if d.text_column != "text":
        train = train.rename_column(d.text_column, "text")
        evals = evals.rename_column(d.text_column, "text")
    labels: list[str] = []
    if classification:
        labels = sorted({str(v) for v in train[d.label_column]}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"data file {source}: column {d.label_column!r} has fewer than 2 distinct labels")
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted({str(v) for v in evals[d.label_column]} - set(index))
        if unknown:
            raise DataError(f"evaluation data: labels not seen in training: {', '.join(unknown[:5])}")
        train = _encode_labels(train, d.label_column, index)
        evals = _encode_labels(evals, d.label_column, index)
    if len(train) == 0:
        raise DataError(f"data file {source}: no training examples")
    return TaskData(train=train, eval=evals, labels=labels, source=source)


def _label_sort_key(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _encode_labels(ds: Any, column: str, index: dict[str, int]) -> Any:
    ds = ds.map(lambda row: {"labels": index[str(row[column])]}, remove_columns=[column])
    return ds


# ---------------------------------------------------------------------------------------------
# Partitioning (flwr-datasets)


def make_partitioner(cfg: RunConfig, num_partitions: int):
    """The flwr-datasets partitioner the config names, not yet bound to a dataset."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    d = cfg.data
    if d.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if d.partitioner == "dirichlet":
        by = "labels" if cfg.model.task == "classification" else None
        if by is None:
            raise DataError("data.partitioner: 'dirichlet' splits over labels; causal LM data has none (use iid or column)")
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=by, alpha=d.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=cfg.seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions, partition_by=d.partition_column,
        num_classes_per_partition=1, class_assignment_mode="deterministic", shuffle=True, seed=cfg.seed,
    )


def partition_sizes_ok(cfg: RunConfig, data: TaskData) -> None:
    """Raise DataError when the clients cannot each get at least one example."""
    n = len(data.train)
    if cfg.federation.clients > n:
        raise DataError(
            f"config key 'federation.clients' = {cfg.federation.clients} exceeds the {n} training examples "
            f"in {data.source}"
        )


def load_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> Any:
    """Client ``partition_id``'s share of the training pool (cached per process)."""
    data = load_task_data(cfg)
    key = (cfg.data.__repr__(), cfg.model.task, cfg.seed, num_partitions)
    with _LOCK:
        if key not in _PARTITIONERS:
            partitioner = make_partitioner(cfg, num_partitions)
            partitioner.dataset = data.train
            _PARTITIONERS[key] = partitioner
        partitioner = _PARTITIONERS[key]
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as err:
        raise DataError(f"data.partitioner {cfg.data.partitioner!r}: {str(err).splitlines()[0]}") from None


_LOCK = threading.RLock()
_TASK_CACHE: dict[tuple, TaskData] = {}
_PARTITIONERS: dict[tuple, Any] = {}


# ---------------------------------------------------------------------------------------------
# Tokenization and batches


@dataclass
class Encoded:
    """Token ids of a dataset, unpadded, plus labels (classification) for batching."""

    input_ids: list[list[int]]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(ds: Any, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize the ``text`` column once; batches pad dynamically."""
    ids = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)["input_ids"]
    labels = list(ds["labels"]) if "labels" in ds.column_names else None
    return Encoded(input_ids=ids, labels=labels)


def collate(enc: Encoded, indices: list[int], pad_id: int, causal: bool) -> dict[str, torch.Tensor]:
    """Pad the chosen rows into a batch; causal LM targets are the inputs with padding ignored."""
    rows = [enc.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if causal:
        batch["labels"] = input_ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.tensor([enc.labels[i] for i in indices], dtype=torch.long)
    return batch
