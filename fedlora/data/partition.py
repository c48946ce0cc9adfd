"""The training pool across clients: flwr-datasets partitioners, each client's share (one
partitioner per process and data config, so a hundred virtual clients split the pool once), and
the shares written as the files deployed devices read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, labelled
from fedlora.data.sources import partition_by
from fedlora.data.tasks import TaskData, load_task_data
from fedlora.errors import DataError
from fedlora.process import PARTITIONER, process_state

__all__ = [
    "dirichlet_sizes",
    "load_partition",
    "make_partitioner",
    "partition_by",
    "partition_sizes",
    "partition_sizes_ok",
    "quantity_skew_partitioner",
    "write_partitions",
]


def dirichlet_sizes(num_examples: int, num_partitions: int, alpha: float, seed: int) -> list[int]:
    """Client sizes drawn from Dirichlet(alpha) proportions, each at least 1, summing to ``num_examples``.

    Every client first gets one example; the rest are shared in the drawn proportions, rounded
    down, and the leftover goes one each to the largest fractional parts (ties to the lower id).

    Raises
    ------
    ValueError
        When there are fewer examples than partitions.
    """
    import numpy as np

    if num_examples < num_partitions:
        raise ValueError(f"{num_examples} examples cannot give {num_partitions} partitions one each")
    props = np.random.default_rng(seed).dirichlet(np.full(num_partitions, float(alpha)))
    share = props * (num_examples - num_partitions)
    sizes = np.floor(share).astype(np.int64)
    leftover = num_examples - num_partitions - int(sizes.sum())
    order = sorted(range(num_partitions), key=lambda i: (-(share[i] - sizes[i]), i))
    for i in order[:leftover]:
        sizes[i] += 1
    return [int(x) + 1 for x in sizes]


def _quantity_skew_class():
    from flwr_datasets.partitioner import Partitioner

    class QuantitySkew(Partitioner):
        """Shuffled rows cut into :func:`dirichlet_sizes` shares (a flwr-datasets Partitioner).

        flwr-datasets' SizePartitioner needs the sizes before it sees the data, and cuts the rows
        in file order (a hub set sorted by topic would give topic skew too): here the sizes are
        drawn when the data is bound and the rows shuffled with the same seed.
        """

        def __init__(self, num_partitions: int, alpha: float, seed: int) -> None:
            super().__init__()
            self._num_partitions, self._alpha, self._seed = num_partitions, alpha, seed
            self._indices: list[list[int]] | None = None

        @property
        def num_partitions(self) -> int:
            return self._num_partitions

        def load_partition(self, partition_id: int) -> Any:
            import numpy as np

            if self._indices is None:
                n = len(self.dataset)
                sizes = dirichlet_sizes(n, self._num_partitions, self._alpha, self._seed)
                order = np.random.default_rng(self._seed + 1).permutation(n).tolist()
                bounds = np.cumsum([0, *sizes]).tolist()
                self._indices = [order[bounds[i] : bounds[i + 1]] for i in range(self._num_partitions)]
            return self.dataset.select(self._indices[partition_id])

    return QuantitySkew


def quantity_skew_partitioner(num_partitions: int, alpha: float, seed: int) -> Any:
    """A flwr-datasets Partitioner giving client ``i`` a Dirichlet(alpha) share of the rows (at
    least one), for data with no labels to skew (causal LM). The class is built on first use:
    flwr-datasets takes seconds to import."""
    return _quantity_skew_class()(num_partitions, alpha, seed)


def make_partitioner(cfg: RunConfig, num_partitions: int):
    """The flwr-datasets partitioner the config names, not yet bound to a dataset."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    d = cfg.data
    if d.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    by = partition_by(cfg)
    if d.partitioner == "dirichlet":
        # Over the labels unless a column is named: partition_column = "task" skews the mix of tasks.
        by = by or ("labels" if labelled(cfg.model.task) else "")
        if not by:
            # Causal LM text has no labels to skew: the non-IID-ness left is how much data each
            # client holds (quantity skew, Dirichlet(alpha) over the clients' sizes), which is
            # what a federation of devices differs in most. partition_column (Dolly's
            # ``category``) skews the mix of a column instead.
            return quantity_skew_partitioner(num_partitions, d.dirichlet_alpha, cfg.seed)
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


def partition_sizes(cfg: RunConfig, num_partitions: int) -> list[int]:
    """Every partition's size, without building a million partitions to count them.

    IID shards are contiguous cuts of ``n // N`` or ``n // N + 1`` rows (flwr-datasets'
    ``IidPartitioner``); the label- and quantity-skewed partitioners assign every row once, on the
    first partition loaded, and their sizes are read from that assignment. A partitioner that
    keeps no such assignment is counted partition by partition.
    """
    if cfg.data.partitioner == "iid":
        n = len(load_task_data(cfg).train)
        return [n // num_partitions + (1 if i < n % num_partitions else 0) for i in range(num_partitions)]
    first = load_partition(cfg, 0, num_partitions)
    partitioner = _bound(cfg, num_partitions)
    # flwr-datasets' Dirichlet and pathological partitioners, and QuantitySkew above
    assignment = getattr(partitioner, "_partition_id_to_indices", None) or getattr(partitioner, "_indices", None)
    if isinstance(assignment, dict) and len(assignment) == num_partitions:
        return [len(assignment.get(i, ())) for i in range(num_partitions)]
    if isinstance(assignment, list) and len(assignment) == num_partitions:
        return [len(rows) for rows in assignment]
    return [len(first)] + [len(load_partition(cfg, i, num_partitions)) for i in range(1, num_partitions)]


def _bound(cfg: RunConfig, num_partitions: int) -> Any:
    """The process's partitioner of the config's training pool (built on first use)."""
    data = load_task_data(cfg)

    def build():
        partitioner = make_partitioner(cfg, num_partitions)
        partitioner.dataset = data.train
        return partitioner

    key = (cfg.data.__repr__(), cfg.model.task, cfg.seed, num_partitions)
    return process_state().get(PARTITIONER, key, build)


def load_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> Any:
    """Client ``partition_id``'s share of the training pool (the partitioner kept per process)."""
    partitioner = _bound(cfg, num_partitions)
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as err:
        raise DataError(f"data.partitioner {cfg.data.partitioner!r}: {str(err).splitlines()[0]}") from None


def write_partitions(cfg: RunConfig, out: str | Path, num_partitions: int) -> list[Path]:
    """Write each simulated client's partition to ``out/client<i>.csv`` (columns named as in the
    run's config, labels by name; ``.jsonl`` for chat data, whose cells are lists), the files
    ``fedlora-client --data`` reads, so a deployment on one host reproduces the simulation with
    the same seed (``--partition-id i``)."""
    import pandas as pd

    data = load_task_data(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    paths = []
    for pid in range(num_partitions):
        part = load_partition(cfg, pid, num_partitions)
        if d.format == "text":
            frame = {d.text_column: list(part["text"])}
        else:  # instruction / messages columns keep their names when loaded
            frame = {
                c: list(part[c])
                for c in (d.prompt_column, d.input_column, d.response_column, d.messages_column)
                if c and c in part.column_names
            }
        if "labels" in part.column_names:
            names = [data.labels[i] for i in part["labels"]]
            if data.tasks:  # qualified "task:label" -> the label within its task
                names = [n.split(":", 1)[1] for n in names]
            frame[d.label_column] = names
        if data.tasks:
            frame[d.task_column or "task"] = list(part["task"])
        if d.format == "chat":  # a conversation (list of turns) does not fit a csv cell
            path = out / f"client{pid}.jsonl"
            pd.DataFrame(frame).to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            path = out / f"client{pid}.csv"
            pd.DataFrame(frame).to_csv(path, index=False)
        paths.append(path)
    return paths
