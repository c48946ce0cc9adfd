"""Datasets: local csv/tsv/json/parquet, a hub name, or a built-in synthetic task; several of
them tagged as tasks (or one with a task column); partitions across clients with
flwr-datasets; tokenized batches for training.

The parts, each importable on its own, in the order they depend on one another:

- :mod:`~fedlora.data.sources`: reading one source (file, directory, hub name, ``synthetic:``),
  column checks, the eval split and caps.
- :mod:`~fedlora.data.labels`: task and class names in id order, and :class:`LabelEncoder`, the
  one mapping from names to ids for the pooled data and a device's file.
- :mod:`~fedlora.data.tasks`: the run's data (:func:`load_task_data`) and a device's own file
  (:func:`load_device_data`).
- :mod:`~fedlora.data.partition`: the training pool across clients (flwr-datasets).
- :mod:`~fedlora.data.batching`: tokenized examples, subsets and padded batches.

What is expensive to build (the read and split data, the bound partitioners) is kept in the
process's store (:mod:`fedlora.process`), keyed by the data config, so a hundred virtual clients
in one process read and partition the data once; ``process_state().clear()`` forgets it.
"""

from fedlora.data.batching import Encoded, collate, encode, split_by_task, subset, task_rows
from fedlora.data.labels import LabelEncoder, labels_from_training, task_label_ids, tasks_from_column
from fedlora.data.partition import (
    load_partition,
    make_partitioner,
    partition_by,
    partition_sizes,
    partition_sizes_ok,
    write_partitions,
)
from fedlora.data.sources import EVAL_STEMS, LOCAL_SUFFIXES, SYNTHETIC_PREFIX
from fedlora.data.sources import _read_local as _read_local  # the client launcher checks a device's file
from fedlora.data.tasks import TaskData, load_device_data, load_task_data

__all__ = [
    "EVAL_STEMS",
    "LOCAL_SUFFIXES",
    "SYNTHETIC_PREFIX",
    "Encoded",
    "LabelEncoder",
    "TaskData",
    "collate",
    "encode",
    "labels_from_training",
    "load_device_data",
    "load_partition",
    "load_task_data",
    "make_partitioner",
    "partition_by",
    "partition_sizes",
    "partition_sizes_ok",
    "split_by_task",
    "subset",
    "task_label_ids",
    "task_rows",
    "tasks_from_column",
    "write_partitions",
]
