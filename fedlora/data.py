"""Datasets: local csv/tsv/json/parquet, a hub name, or a built-in synthetic task; several of
them tagged as tasks (or one with a task column); partitions across clients with
flwr-datasets; tokenized batches for training.

Everything a client needs is cached per process by the data config, so a hundred virtual
clients in one process read and partition the data once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.config import DataConfig, RunConfig, has_tasks
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
        Columns ``text`` and, for classification, ``labels`` (int ids into ``labels``). With
        tasks, also ``task`` (the task's name) and ``task_id`` (int index into ``tasks``).
    labels : list of str
        Class names in id order (empty for causal LM). With tasks they are qualified,
        ``<task>:<label>``, grouped by task in the order of ``tasks``, so equal label values of
        two tasks are different classes.
    source : str
        What was read, for messages and reports.
    tasks : list of str
        Task names in id order: the order of ``data.tasks``, or the sorted values of
        ``data.task_column``. Empty when the data has no tasks.
    task_labels : dict of str to list of int
        For each task, the ids of its labels in ``labels`` (empty for causal LM).
    """

    train: Any
    eval: Any
    labels: list[str]
    source: str
    tasks: list[str] = field(default_factory=list)
    task_labels: dict[str, list[int]] = field(default_factory=dict)


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


def _load_raw(cfg: DataConfig, seed: int, prefix: str = "data.") -> tuple[Any, Any | None, str]:
    """(train, eval or None, description) before column checks; messages name ``{prefix}path``."""
    from datasets import Dataset

    if cfg.path.startswith(SYNTHETIC_PREFIX):
        from fedlora.synthetic import GENERATORS

        kind = cfg.path[len(SYNTHETIC_PREFIX):]
        if kind not in GENERATORS:
            known = ", ".join(SYNTHETIC_PREFIX + name for name in sorted(GENERATORS))
            raise DataError(f"{prefix}path: unknown synthetic task {kind!r} (known: {known})")
        generate = GENERATORS[kind]
        n_train = cfg.max_train_examples or 2400
        n_eval = cfg.max_eval_examples or 400
        train = Dataset.from_dict(generate(n_train, seed=seed))
        evals = Dataset.from_dict(generate(n_eval, seed=seed + 7919))
        return train, evals, cfg.path
    if _looks_local(cfg.path):
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            train_file = _find_in_dir(path, ("train",))
            if train_file is None:
                raise DataError(f"{prefix}path: directory {path} has no train.csv/.tsv/.json/.jsonl/.parquet")
            eval_file = _find_in_dir(path, EVAL_STEMS)
            train = _read_local(train_file)
            evals = _read_local(eval_file) if eval_file and not cfg.eval_path else None
            return train, evals, str(train_file)
        if not path.is_file():
            raise DataError(f"{prefix}path: file not found: {path}")
        return _read_local(path), None, str(path)
    # A hub dataset name: the real loading code, which needs network access to the hub.
    try:
        from datasets import load_dataset

        splits = load_dataset(cfg.path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{prefix}path: cannot load hub dataset {cfg.path!r}: {str(err).splitlines()[0]}") from None
    if "train" not in splits:
        raise DataError(f"{prefix}path: hub dataset {cfg.path!r} has no 'train' split ({', '.join(splits)})")
    eval_name = cfg.eval_split or next((s for s in ("validation", "test") if s in splits), "")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise DataError(f"{prefix}eval_split: {cfg.path!r} has no split {cfg.eval_split!r} ({', '.join(splits)})")
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


def load_device_data(cfg: RunConfig, path: str | Path, labels: list[str], tasks: list[str]) -> Any:
    """A device's own examples (``fedlora-client --data``), with the run's class ids.

    The file is read with the run's column names: ``data.text_column``, ``data.label_column``
    (classification) and, when the run has tasks, ``data.task_column`` (``task`` for runs built
    from ``[[data.tasks]]``). Every row is training data, as a simulated client's partition is.
    Labels map to the ids the server sent, so a device that holds only some of the classes
    still agrees with the server on what each output means.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration, as sent by the server.
    path : path
        The local csv/tsv/json/jsonl/parquet file.
    labels : list of str
        The run's class names in id order (``task:label`` for multi-task runs).
    tasks : list of str
        The run's task names (empty for single-task runs).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    ds = _read_local(path)
    d = cfg.data
    classification = cfg.model.task == "classification"
    columns = [("data.text_column", d.text_column, "text")]
    if classification:
        columns.append(("data.label_column", d.label_column, "label"))
    if tasks:
        columns.append(("data.task_column", d.task_column or "task", "task"))
    _require_columns(ds, [(key, col) for key, col, _ in columns], f"data file {path}")
    ds = ds.select_columns(list(dict.fromkeys(col for _, col, _ in columns)))
    ds = ds.rename_columns({col: new for _, col, new in columns if col != new})
    if len(ds) == 0:
        raise DataError(f"data file {path}: no examples")
    if tasks:
        ds = _as_str(ds, "task")
        unknown = sorted(set(ds["task"]) - set(tasks))
        if unknown:
            raise DataError(f"data file {path}: tasks not in this run: {', '.join(unknown[:5])} "
                            f"(the run's tasks: {', '.join(tasks)})")
    if classification:
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted(set(_label_names(ds, bool(tasks))) - set(index))
        if unknown:
            raise DataError(f"data file {path}: labels not in this run: {', '.join(unknown[:5])} "
                            f"(the run's labels: {', '.join(labels[:10])})")
        ds = _encode_labels(ds, bool(tasks), index)
    if tasks:
        task_index = {name: i for i, name in enumerate(tasks)}
        ds = ds.add_column("task_id", [task_index[t] for t in ds["task"]])
    return ds


def write_partitions(cfg: RunConfig, out: str | Path, num_partitions: int) -> list[Path]:
    """Write each simulated client's partition to ``out/client<i>.csv`` (columns named as in the
    run's config, labels by name), the files ``fedlora-client --data`` reads, so a deployment on
    one host reproduces the simulation with the same seed (``--partition-id i``)."""
    import pandas as pd

    data = load_task_data(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    paths = []
    for pid in range(num_partitions):
        part = load_partition(cfg, pid, num_partitions)
        frame = {d.text_column: list(part["text"])}
        if "labels" in part.column_names:
            names = [data.labels[i] for i in part["labels"]]
            if data.tasks:  # qualified "task:label" -> the label within its task
                names = [n.split(":", 1)[1] for n in names]
            frame[d.label_column] = names
        if data.tasks:
            frame[d.task_column or "task"] = list(part["task"])
        path = out / f"client{pid}.csv"
        pd.DataFrame(frame).to_csv(path, index=False)
        paths.append(path)
    return paths


def task_label_ids(labels: list[str], tasks: list[str]) -> dict[str, list[int]]:
    """For each task, the ids of its classes among the qualified ``task:label`` names."""
    return {t: [i for i, name in enumerate(labels) if name.startswith(f"{t}:")] for t in tasks}


# A column to load: (config key naming it, column in the source, name after loading, whether the
# evaluation data must have it too).
_Column = tuple[str, str, str, bool]


def _load_source(src: DataConfig, seed: int, columns: list[_Column], prefix: str) -> tuple[Any, Any, str]:
    """One source read, checked, split and capped, with only ``columns``, renamed.

    ``src`` is ``data`` itself or one ``data.tasks[i]`` (as a DataConfig); messages name config
    keys with ``prefix``.
    """
    train, evals, source = _load_raw(src, seed, prefix)
    if src.eval_path:
        path = Path(src.eval_path).expanduser()
        if not path.is_file():
            raise DataError(f"{prefix}eval_path: file not found: {path}")
        evals = _read_local(path)
    _require_columns(train, [(key, col) for key, col, _, _ in columns], f"data file {source}")
    if evals is not None:
        _require_columns(evals, [(key, col) for key, col, _, in_eval in columns if in_eval], "evaluation data")
    else:
        split = train.train_test_split(test_size=src.eval_fraction, seed=seed, shuffle=True)
        train, evals = split["train"], split["test"]
    train, evals = _cap(train, src.max_train_examples, seed), _cap(evals, src.max_eval_examples, seed)

    keep = list(dict.fromkeys(col for _, col, _, _ in columns))
    train = train.select_columns(keep)
    evals = evals.select_columns([c for c in keep if c in evals.column_names])
    renames = {col: new for _, col, new, _ in columns if col != new}
    train = train.rename_columns(renames)
    evals = evals.rename_columns({c: n for c, n in renames.items() if c in evals.column_names})
    return train, evals, source


def _cap(ds: Any, cap: int, seed: int) -> Any:
    if cap and len(ds) > cap:
        return ds.shuffle(seed=seed).select(range(cap))
    return ds


def _derived_columns(cfg: RunConfig) -> set[str]:
    """Columns made while loading, which ``partition_column`` may name without the data having them."""
    derived = {"labels"} if cfg.model.task == "classification" else set()
    if has_tasks(cfg.data):
        derived |= {"task", "task_id"}
    return derived


def partition_by(cfg: RunConfig) -> str:
    """The loaded column that ``data.partition_column`` names ("" when unset).

    The task column is loaded as ``task`` and the label column as ``labels``, so naming either by
    its name in the source means the loaded column.
    """
    d = cfg.data
    column = d.partition_column
    if not column:
        return ""
    if has_tasks(d) and column == d.task_column:
        return "task"
    if cfg.model.task == "classification" and not d.tasks and column == d.label_column:
        return "labels"
    return column


def _source_columns(cfg: RunConfig, prefix: str, text_column: str, label_column: str) -> list[_Column]:
    d = cfg.data
    columns: list[_Column] = [(f"{prefix}text_column", text_column, "text", True)]
    if cfg.model.task == "classification":
        columns.append((f"{prefix}label_column", label_column, "label", True))
    if d.task_column:
        columns.append(("data.task_column", d.task_column, "task", True))
    by = partition_by(cfg)
    if by and by not in _derived_columns(cfg):
        # A column of the source itself: kept under its own name, which must not be one we make.
        if by in {new for _, _, new, _ in columns}:
            raise DataError(f"data.partition_column: column {by!r} clashes with a column made while loading; "
                            f"rename it in the data")
        columns.append(("data.partition_column", by, by, False))
    return columns


def _as_str(ds: Any, column: str) -> Any:
    """``column`` as strings, so sources whose labels are ints and strings combine."""
    return ds.map(lambda batch: {column: [str(v) for v in batch[column]]}, batched=True)


def _with_task(ds: Any, name: str, classification: bool) -> Any:
    if classification:
        ds = _as_str(ds, "label")
    return ds.add_column("task", [name] * len(ds))


def _concatenate(parts: list[Any], what: str) -> Any:
    from datasets import concatenate_datasets

    try:
        return concatenate_datasets(parts)
    except ValueError as err:  # differing column types between sources
        raise DataError(f"data.tasks: cannot combine the {what} sets: {str(err).splitlines()[0]}") from None


def _load_task_data(cfg: RunConfig) -> TaskData:
    d = cfg.data
    classification = cfg.model.task == "classification"
    tasks: list[str] = []
    if d.tasks:
        trains, evals_list, sources = [], [], []
        for i, task in enumerate(d.tasks):
            prefix = f"data.tasks[{i}]."
            src = DataConfig(path=task.path, text_column=task.text_column, label_column=task.label_column,
                             eval_path=task.eval_path, eval_split=task.eval_split, eval_fraction=d.eval_fraction,
                             max_train_examples=task.max_train_examples, max_eval_examples=task.max_eval_examples)
            columns = _source_columns(cfg, prefix, task.text_column, task.label_column)
            train, evals, source = _load_source(src, cfg.seed, columns, prefix)
            if len(train) == 0:
                raise DataError(f"data file {source} ({prefix}path): no training examples")
            # Sources' eval sets may differ in optional columns; evaluation needs only these.
            evals = evals.select_columns([new for _, _, new, in_eval in columns if in_eval])
            trains.append(_with_task(train, task.name, classification))
            evals_list.append(_with_task(evals, task.name, classification))
            sources.append(f"{task.name}={source}")
            tasks.append(task.name)
        train, evals = _concatenate(trains, "training"), _concatenate(evals_list, "evaluation")
        train, evals = _cap(train, d.max_train_examples, cfg.seed), _cap(evals, d.max_eval_examples, cfg.seed)
        source = ", ".join(sources)
    else:
        columns = _source_columns(cfg, "data.", d.text_column, d.label_column)
        train, evals, source = _load_source(d, cfg.seed, columns, "data.")
        if d.task_column:
            train, evals = _as_str(train, "task"), _as_str(evals, "task")
            tasks = sorted(set(train["task"]), key=_label_sort_key)
            unseen = sorted(set(evals["task"]) - set(tasks))
            if unseen:
                raise DataError(
                    f"evaluation data: tasks (data.task_column) not seen in training: {', '.join(unseen[:5])}")
    if len(train) == 0:
        raise DataError(f"data file {source}: no training examples")

    labels: list[str] = []
    task_labels: dict[str, list[int]] = {}
    if classification and tasks:
        # Qualified names: SST-2's "1" and AG News's "1" are different classes.
        for name in tasks:
            values = sorted({str(v) for v, t in zip(train["label"], train["task"]) if t == name}, key=_label_sort_key)
            if len(values) < 2:
                raise DataError(f"data file {source}: task {name!r} has fewer than 2 distinct labels")
            task_labels[name] = list(range(len(labels), len(labels) + len(values)))
            labels += [f"{name}:{v}" for v in values]
    elif classification:
        labels = sorted({str(v) for v in train["label"]}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"data file {source}: column {d.label_column!r} has fewer than 2 distinct labels")
    if classification:
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted(set(_label_names(evals, bool(tasks))) - set(index))
        if unknown:
            raise DataError(f"evaluation data: labels not seen in training: {', '.join(unknown[:5])}")
        train = _encode_labels(train, bool(tasks), index)
        evals = _encode_labels(evals, bool(tasks), index)
    if tasks:
        task_index = {name: i for i, name in enumerate(tasks)}
        train = train.add_column("task_id", [task_index[t] for t in train["task"]])
        evals = evals.add_column("task_id", [task_index[t] for t in evals["task"]])
    return TaskData(train=train, eval=evals, labels=labels, source=source, tasks=tasks, task_labels=task_labels)


def _label_sort_key(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _label_names(ds: Any, qualified: bool) -> list[str]:
    """Each row's class name: its label, or ``<task>:<label>`` with tasks."""
    if qualified:
        return [f"{t}:{v}" for t, v in zip(ds["task"], ds["label"])]
    return [str(v) for v in ds["label"]]


def _encode_labels(ds: Any, qualified: bool, index: dict[str, int]) -> Any:
    """Replace the loaded ``label`` column by ``labels``, the class ids."""
    ids = [index[name] for name in _label_names(ds, qualified)]
    return ds.remove_columns("label").add_column("labels", ids)


# ---------------------------------------------------------------------------------------------
# Partitioning (flwr-datasets)


def make_partitioner(cfg: RunConfig, num_partitions: int):
    """The flwr-datasets partitioner the config names, not yet bound to a dataset."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    d = cfg.data
    if d.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    by = partition_by(cfg)
    if d.partitioner == "dirichlet":
        # Over the labels unless a column is named: partition_column = "task" skews the mix of tasks.
        by = by or ("labels" if cfg.model.task == "classification" else "")
        if not by:
            raise DataError("data.partitioner: 'dirichlet' splits over labels; causal LM data has none "
                            "(use iid or column, or set data.partition_column)")
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=by, alpha=d.dirichlet_alpha,
            min_partition_size=1, self_balancing=False, shuffle=True, seed=cfg.seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions, partition_by=by,
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
    """Token ids of a dataset, unpadded, plus labels (classification) and task ids (multi-task)
    for batching."""

    input_ids: list[list[int]]
    labels: list[int] | None
    task_ids: list[int] | None = None

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
    return Encoded(
        input_ids=[enc.input_ids[i] for i in indices],
        labels=None if enc.labels is None else [enc.labels[i] for i in indices],
        task_ids=None if enc.task_ids is None else [enc.task_ids[i] for i in indices],
    )


def task_rows(ds: Any) -> dict[str, list[int]]:
    """Row indices of a dataset per task name; empty when it has no ``task`` column."""
    if "task" not in ds.column_names:
        return {}
    out: dict[str, list[int]] = {}
    for i, task in enumerate(ds["task"]):
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
