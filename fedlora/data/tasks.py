"""The run's data: the sources read and tagged as tasks, the class ids, the server's held-out set
(:func:`load_task_data`, kept per process), and a device's own file encoded with the ids the
server sent (:func:`load_device_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig, RunConfig, is_image_task, labelled
from fedlora.data.labels import LabelEncoder, _as_str, labels_from_training, tasks_from_column
from fedlora.data.sources import (
    _cap,
    _load_source,
    _read_local,
    _require_columns,
    _source_columns,
    check_cells,
    drop_absent_optional,
    format_columns,
)
from fedlora.errors import DataError
from fedlora.process import TASK_DATA, process_state


@dataclass
class TaskData:
    """The training pool (partitioned across clients) and the server's held-out set.

    Attributes
    ----------
    train, eval : datasets.Dataset
        Columns ``text`` and, for classification, ``labels`` (int ids into ``labels``). With
        tasks, also ``task`` (the task's name) and ``task_id`` (int index into ``tasks``).
        Instruction and chat data (``data.format``) keep their own columns instead of ``text``,
        under their names in the source (:mod:`fedlora.data.instruct` reads them).
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


def load_task_data(cfg: RunConfig) -> TaskData:
    """Read, check and split the configured data (kept per process, by the data config)."""
    key = (cfg.data.__repr__(), cfg.model.task, cfg.seed)
    return process_state().get(TASK_DATA, key, lambda: _load_task_data(cfg))


def load_device_data(cfg: RunConfig, path: str | Path, labels: list[str], tasks: list[str]) -> Any:
    """A device's own examples (``fedlora-client --data``), with the run's class ids.

    The file is read with the run's column names: ``data.text_column`` (the instruction or
    messages columns for ``data.format`` ``instruction``/``chat``), ``data.label_column``
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
    if is_image_task(cfg.model.task):
        from fedlora.data.images import read_device_images

        return LabelEncoder(labels, []).encode(read_device_images(cfg.data, path), f"data {path}")
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    ds = _read_local(path)
    d = cfg.data
    classification = labelled(cfg.model.task)
    # The text columns of data.format (an instruction's input only when the file has it).
    columns = [(key, col, new) for key, col, new, _ in drop_absent_optional(format_columns(d, d.text_column), ds)]
    if classification:
        columns.append(("data.label_column", d.label_column, "label"))
    if tasks:
        columns.append(("data.task_column", d.task_column or "task", "task"))
    _require_columns(ds, [(key, col) for key, col, _ in columns], f"data file {path}")
    check_cells(ds, [(key, col) for key, col, _ in columns], f"data file {path}")
    ds = ds.select_columns(list(dict.fromkeys(col for _, col, _ in columns)))
    ds = ds.rename_columns({col: new for _, col, new in columns if col != new})
    if len(ds) == 0:
        raise DataError(f"data file {path}: no examples")
    if tasks:
        ds = _as_str(ds, "task")
    encoder = LabelEncoder(labels if classification else None, tasks)
    return encoder.encode(ds, f"data file {path}")


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
    classification = labelled(cfg.model.task)
    tasks: list[str] = []
    if d.tasks:
        trains, evals_list, sources = [], [], []
        for i, task in enumerate(d.tasks):
            prefix = f"data.tasks[{i}]."
            src = DataConfig(
                path=task.path,
                text_column=task.text_column,
                label_column=task.label_column,
                eval_path=task.eval_path,
                eval_split=task.eval_split,
                eval_fraction=d.eval_fraction,
                max_train_examples=task.max_train_examples,
                max_eval_examples=task.max_eval_examples,
            )
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
            train, evals, tasks = tasks_from_column(train, evals)
    if len(train) == 0:
        raise DataError(f"data file {source}: no training examples")

    labels: list[str] = []
    task_labels: dict[str, list[int]] = {}
    if classification:
        labels, task_labels = labels_from_training(train, tasks, source, d.label_column)
    encoder = LabelEncoder(labels if classification else None, tasks, from_training=True)
    # The held-out set first: its unknown labels are the error to report; training's are all known.
    evals = encoder.encode(evals, "evaluation data")
    train = encoder.encode(train, f"data file {source}")
    return TaskData(train=train, eval=evals, labels=labels, source=source, tasks=tasks, task_labels=task_labels)
