"""The training pool across clients: flwr-datasets partitioners, each client's share (one
partitioner per process and data config, so a hundred virtual clients split the pool once), and
the shares written as the files deployed devices read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.data.sources import partition_by
from fedlora.data.tasks import TaskData, load_task_data
from fedlora.errors import DataError
from fedlora.process import PARTITIONER, process_state

__all__ = ["load_partition", "make_partitioner", "partition_by", "partition_sizes_ok", "write_partitions"]


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
            raise DataError(
                "data.partitioner: 'dirichlet' splits over labels; causal LM data has none "
                "(use iid or column, or set data.partition_column)"
            )
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=by,
            alpha=d.dirichlet_alpha,
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=cfg.seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by=by,
        num_classes_per_partition=1,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=cfg.seed,
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
    """Client ``partition_id``'s share of the training pool (the partitioner kept per process)."""
    data = load_task_data(cfg)

    def bound_partitioner():
        partitioner = make_partitioner(cfg, num_partitions)
        partitioner.dataset = data.train
        return partitioner

    key = (cfg.data.__repr__(), cfg.model.task, cfg.seed, num_partitions)
    partitioner = process_state().get(PARTITIONER, key, bound_partitioner)
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as err:
        raise DataError(f"data.partitioner {cfg.data.partitioner!r}: {str(err).splitlines()[0]}") from None


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
