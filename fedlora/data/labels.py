"""Tasks and labels: which names the run has, in which id order, and one encoder from names to ids.

The server derives the task and class names from its pooled training data
(:func:`tasks_from_column`, :func:`labels_from_training`) and sends them, in id order, with
every message. A device encodes its own file with the names it was sent. Both go through
:class:`LabelEncoder`, so the pooled data and a device's file cannot disagree on what an output
means, and both name unknown labels or tasks in the same one-line messages.
"""

from __future__ import annotations

from typing import Any

from fedlora.data.columns import values
from fedlora.errors import DataError


def _label_sort_key(value: str) -> tuple:
    """Numeric names in numeric order ("2" before "10"), then the others alphabetically."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _as_str(ds: Any, column: str) -> Any:
    """``column`` as strings, so sources whose labels are ints and strings combine.

    A cast, not a ``map``: ``datasets`` keeps a mapped column's int64 type, so ``"1"`` came back
    as ``1`` and an int-labelled task could not be concatenated with a string-labelled one.
    """
    from datasets import Value

    if ds.features[column] == Value("string"):
        return ds
    return ds.cast_column(column, Value("string"))


def _label_names(ds: Any, qualified: bool) -> list[str]:
    """Each row's class name: its label, or ``<task>:<label>`` with tasks."""
    if qualified:
        return [f"{t}:{v}" for t, v in zip(values(ds, "task"), values(ds, "label"))]
    return [str(v) for v in values(ds, "label")]


def task_label_ids(labels: list[str], tasks: list[str]) -> dict[str, list[int]]:
    """For each task, the ids of its classes among the qualified ``task:label`` names."""
    return {t: [i for i, name in enumerate(labels) if name.startswith(f"{t}:")] for t in tasks}


def tasks_from_column(train: Any, evals: Any) -> tuple[Any, Any, list[str]]:
    """The task names of data whose ``task`` column (``data.task_column``) tags each row.

    Returns ``(train, evals, tasks)``: both sets with ``task`` as strings, and the training
    set's task names sorted as labels are, which is their id order.

    Raises
    ------
    DataError
        When the evaluation data holds a task the training data does not: the model would be
        scored on a task no client trains.
    """
    train, evals = _as_str(train, "task"), _as_str(evals, "task")
    tasks = sorted(set(values(train, "task")), key=_label_sort_key)
    LabelEncoder(None, tasks, from_training=True).check_tasks(evals, "evaluation data")
    return train, evals, tasks


def labels_from_training(
    train: Any, tasks: list[str], source: str, label_column: str
) -> tuple[list[str], dict[str, list[int]]]:
    """The class names of the pooled training data in id order, and each task's ids among them.

    Without tasks the names are the ``label`` values, sorted. With tasks they are qualified,
    ``<task>:<label>``, grouped by task in the order of ``tasks``: SST-2's "1" and AG News's "1"
    are different classes, and each task's classes are a contiguous range of ids.

    Parameters
    ----------
    train : datasets.Dataset
        The pooled training data, with ``label`` (and ``task`` when ``tasks`` is not empty).
    tasks : list of str
        Task names in id order; empty when the data has no tasks.
    source, label_column : str
        What was read and its label column, for messages.

    Raises
    ------
    DataError
        When the data, or one task, has fewer than 2 distinct labels: nothing to classify.
    """
    labels: list[str] = []
    task_labels: dict[str, list[int]] = {}
    if tasks:
        pairs = list(zip(values(train, "label"), values(train, "task")))
        for name in tasks:
            names = sorted({str(v) for v, t in pairs if t == name}, key=_label_sort_key)
            if len(names) < 2:
                raise DataError(f"data file {source}: task {name!r} has fewer than 2 distinct labels")
            task_labels[name] = list(range(len(labels), len(labels) + len(names)))
            labels += [f"{name}:{v}" for v in names]
    else:
        labels = sorted({str(v) for v in values(train, "label")}, key=_label_sort_key)
        if len(labels) < 2:
            raise DataError(f"data file {source}: column {label_column!r} has fewer than 2 distinct labels")
    return labels, task_labels


class LabelEncoder:
    """Class and task names to the run's ids, for the pooled data and a device's file alike.

    Parameters
    ----------
    labels : list of str or None
        Class names in id order (``<task>:<label>`` when there are tasks). None when the data has
        no classes (causal LM), so only task ids are encoded.
    tasks : list of str
        Task names in id order; empty when the data has no tasks.
    from_training : bool
        Whether the names were derived from the pooled training data: an unknown name is then
        one "not seen in training". Otherwise they are the run's names as a device receives them,
        and a message about an unknown name lists the run's, so the device's owner sees which
        spelling the run expects.
    """

    def __init__(self, labels: list[str] | None, tasks: list[str], *, from_training: bool = False) -> None:
        self.labels = None if labels is None else list(labels)
        self.tasks = list(tasks)
        self.from_training = from_training
        self._label_ids = {name: i for i, name in enumerate(self.labels or [])}
        self._task_ids = {name: i for i, name in enumerate(self.tasks)}

    def check_tasks(self, ds: Any, where: str) -> None:
        """Raise DataError naming the values of ``ds``'s ``task`` column that are not tasks here.

        ``where`` names ``ds`` in the message. Nothing to check when there are no tasks.
        """
        if not self.tasks:
            return
        unknown = sorted(set(values(ds, "task")) - set(self._task_ids))
        if not unknown:
            return
        if self.from_training:
            raise DataError(f"{where}: tasks (data.task_column) not seen in training: {', '.join(unknown[:5])}")
        raise DataError(
            f"{where}: tasks not in this run: {', '.join(unknown[:5])} (the run's tasks: {', '.join(self.tasks)})"
        )

    def _check_labels(self, names: list[str], where: str) -> None:
        unknown = sorted(set(names) - set(self._label_ids))
        if not unknown:
            return
        if self.from_training:
            raise DataError(f"{where}: labels not seen in training: {', '.join(unknown[:5])}")
        raise DataError(
            f"{where}: labels not in this run: {', '.join(unknown[:5])} "
            f"(the run's labels: {', '.join((self.labels or [])[:10])})"
        )

    def encode(self, ds: Any, where: str) -> Any:
        """``ds`` with its names replaced by ids.

        The ``label`` column becomes ``labels``, class ids (when there are classes); a
        ``task_id`` column, task ids, is added next to ``task`` (when there are tasks). With
        tasks a row's class is ``<task>:<label>``, so the same label value of two tasks maps to
        two ids.

        Parameters
        ----------
        ds : datasets.Dataset
            With ``label`` (when there are classes) and ``task`` (when there are tasks) as
            strings.
        where : str
            What ``ds`` is, for messages ("evaluation data", "data file <path>").

        Raises
        ------
        DataError
            Naming the first few tasks, then labels, that are not among the encoder's names.
        """
        self.check_tasks(ds, where)
        if self.labels is not None:
            names = _label_names(ds, bool(self.tasks))
            self._check_labels(names, where)
            ds = ds.remove_columns("label").add_column("labels", [self._label_ids[n] for n in names])
        if self.tasks:
            ds = ds.add_column("task_id", [self._task_ids[t] for t in values(ds, "task")])
        return ds
