"""What a node has: its examples, the rank it trains, its capabilities.

Where a node's data comes from, by ``context.node_config``:

* ``data-path``: a local file on this device (deployment: ``fedlora-client --data``);
* else ``partition-id`` / ``num-partitions``: its partition of the run's dataset (simulation).

Which rank it trains: ``node_config["rank"]`` (``fedlora-client --rank``), else its device
profile (``[[federation.profiles]]``, assigned round-robin by partition id), else ``lora.rank``.

Everything read or tokenized here is kept in the process store (:mod:`fedlora.process`), keyed
by what determines it, so the virtual clients of one process share the work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context

from fedlora import protocol as P
from fedlora.config import RunConfig
from fedlora.data import Encoded, encode, load_device_data, load_partition, task_rows
from fedlora.process import DERIVED, ENCODED, NODE_DATA, process_state


def run_classes(config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(class names in id order, task names) of the run, as every message from the server says."""
    labels = json.loads(str(config[P.LABELS])) if P.LABELS in config else []
    tasks = json.loads(str(config[P.RUN_TASKS])) if P.RUN_TASKS in config else []
    return [str(x) for x in labels], [str(x) for x in tasks]


def is_device(context: Context) -> bool:
    """Whether this node is a real device with its own file (its operator watches its output)."""
    return P.NODE_DATA_PATH in context.node_config


def node_index(context: Context) -> int:
    """This node's index: its partition in simulation, ``fedlora-client --partition-id`` on a device,
    else derived from its node id. Seeds its local training and held-out split."""
    return int(context.node_config.get(P.NODE_PARTITION_ID, context.node_id % 100_003))


def own_examples(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> Any:
    """All of this node's examples: its local file on a device, its partition in simulation."""
    node_cfg = context.node_config
    if P.NODE_DATA_PATH in node_cfg:
        path = str(node_cfg[P.NODE_DATA_PATH])
        return process_state().get(
            NODE_DATA,
            ("device", path, repr(run.data), run.model.task, tuple(labels), tuple(tasks)),
            lambda: load_device_data(run, path, labels, tasks),
        )
    pid, num = int(node_cfg[P.NODE_PARTITION_ID]), int(node_cfg[P.NODE_NUM_PARTITIONS])
    return process_state().get(
        NODE_DATA,
        ("partition", repr(run.data), run.model.task, run.seed, pid, num),
        lambda: load_partition(run, pid, num),
    )


def personalized(run: RunConfig) -> bool:
    """Whether the run's strategy gives each node its own model (judged on its own held-out part)."""
    from fedlora.strategies import STRATEGIES

    cls = STRATEGIES.get(run.strategy.name)
    return bool(cls is not None and cls.personalized)


def local_split(run: RunConfig, part: Any, pid: int) -> dict[str, Any]:
    """A personalized model is judged on its own distribution: a seeded ``data.eval_fraction`` of
    the node's examples is held out (all of them serve both when it has one example)."""

    def build():
        if len(part) < 2:
            return {"train": part, "test": part}
        return part.train_test_split(test_size=run.data.eval_fraction, seed=run.seed + pid, shuffle=True)

    return process_state().get(DERIVED, ("local-split", repr(run.data), run.model.task, run.seed, pid, id(part)), build)


def train_examples(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> Any:
    """This node's raw training examples."""
    own = own_examples(run, context, labels, tasks)
    if personalized(run):
        return local_split(run, own, node_index(context))["train"]
    return own


def eval_examples(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> Any:
    """This node's held-out examples: the seeded ``data.eval_fraction`` of its own examples that it
    does not train on."""
    return local_split(run, own_examples(run, context, labels, tasks), node_index(context))["test"]


def encoded(ds: Any, run: RunConfig, tokenizer: Any) -> Encoded:
    """``ds`` tokenized for ``run``'s model (once per process)."""
    return process_state().get(
        ENCODED, (id(ds), run.model.name, run.model.max_length), lambda: encode(ds, tokenizer, run.model.max_length)
    )


def node_rank(run: RunConfig, context: Context) -> int:
    """The rank this node trains (see the module docstring)."""
    node_cfg = context.node_config
    if P.NODE_RANK in node_cfg:
        return int(node_cfg[P.NODE_RANK])
    profiles = run.federation.profiles
    if profiles and P.NODE_PARTITION_ID in node_cfg:
        return int(profiles[int(node_cfg[P.NODE_PARTITION_ID]) % len(profiles)].rank)
    return int(run.lora.rank)


def memory_gb() -> float:
    """Accelerator memory when there is one, else the machine's (0 when unknown)."""
    if torch.cuda.is_available():
        return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        return 0.0


def rows_by_task(ds: Any) -> dict[str, list[int]]:
    """Row indices of ``ds`` (this node's examples) per task, computed once per process."""
    return process_state().get(DERIVED, ("task-rows", id(ds)), lambda: task_rows(ds))


def capabilities(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> ConfigRecord:
    """What this node has: the rank it trains, device, memory, examples, examples per task."""
    ds = train_examples(run, context, labels, tasks)
    return ConfigRecord(
        {
            P.INFO_RANK: node_rank(run, context),
            P.INFO_DEVICE: "cuda" if torch.cuda.is_available() else "cpu",
            P.INFO_MEMORY_GB: memory_gb(),
            P.INFO_NUM_EXAMPLES: int(len(ds)),
            P.INFO_TASKS: json.dumps({t: len(rows) for t, rows in rows_by_task(ds).items()}),
        }
    )
