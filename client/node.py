"""What a node has: its examples, the rank it trains, its capabilities.

Where a node's data comes from, by ``context.node_config``:

* ``data-path``: a local file on this device (deployment: ``fedlora-client --data``);
* else ``partition-id`` / ``num-partitions``: its partition of the run's dataset (simulation).

What it trains, each from the first of: its node config (``fedlora-client --rank /
--quantization / --device / --model``, or the simulation's device for one delivery), its device profile
(``[[federation.profiles]]``, assigned round-robin by partition id), the run's ``lora.rank`` /
``model.quantization`` / ``model.device`` / ``model.name``. ``auto`` for the rank or the quantization measures
the memory this device has free and applies :func:`fedlora.model.capacity.choose` (once: the choice
is kept in the node's state, so the model it then loads does not change the next answer).

Everything read or tokenized here is kept in the process store (:mod:`fedlora.process`), keyed
by what determines it, so the virtual clients of one process share the work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context

from fedlora.config import ClientProfile, ModelConfig, RunConfig, is_image_task
from fedlora.data import Encoded, load_device_data, load_partition, task_rows
from fedlora.data.images import encode_examples
from fedlora.errors import ConfigError
from fedlora.model.capacity import MARGIN, PRECISIONS, RANKS, choose, memory_needed
from fedlora.model.devices import placement
from fedlora.process import DERIVED, ENCODED, NODE_DATA, process_state
from fedlora.wire import protocol as P


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


def encoded(ds: Any, run: RunConfig, tokenizer: Any, labels: Sequence[str] = (), *, train: bool = False) -> Encoded:
    """``ds`` tokenized for ``run``'s model (once per process); images stay undecoded
    (:func:`fedlora.data.images.encode_examples`: ``labels`` make CLIP's prompts, ``train``
    turns on ``data.augment``)."""
    key = (id(ds), run.model.name, run.model.max_length, run.data.format, run.data.template)
    if is_image_task(run.model.task):
        key += (run.model.task, tuple(labels), run.data.prompt_template, train and run.data.augment)
    return process_state().get(ENCODED, key, lambda: encode_examples(ds, run, tokenizer, list(labels), train=train))


#: ``context.state`` record holding what ``auto`` chose for this node (kept across messages).
STATE_CHOICE = "fedlora-capacity"
AUTO = "auto"
GIB = 2**30


def node_profile(run: RunConfig, context: Context) -> ClientProfile | None:
    """This node's ``[[federation.profiles]]`` entry (round-robin by partition id), if any."""
    profiles = run.federation.profiles
    if profiles and P.NODE_PARTITION_ID in context.node_config:
        return profiles[int(context.node_config[P.NODE_PARTITION_ID]) % len(profiles)]
    return None


def _asked(run: RunConfig, context: Context) -> tuple[str, str, str]:
    """(rank, quantization, device) as asked: node config, else profile, else the run (strings)."""
    node_cfg, profile = context.node_config, node_profile(run, context)
    rank = str(node_cfg.get(P.NODE_RANK, profile.rank if profile else run.lora.rank))
    quant = str(node_cfg.get(P.NODE_QUANTIZATION, "") or (profile.quantization if profile else "") or "")
    device = str(node_cfg.get(P.NODE_DEVICE, "") or (profile.device if profile else "") or "")
    return rank, quant or run.model.quantization, device or run.model.device


def available_bytes(device: str) -> int:
    """Memory free for training on ``device`` now: the accelerator's free memory, or the
    machine's available memory for the CPU (0 when unknown)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device == "mps" and hasattr(torch, "mps"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def candidate_ranks(run: RunConfig) -> tuple[int, ...]:
    """Ranks ``--rank auto`` may choose: powers of two up to ``lora.rank``, and ``lora.rank``;
    only ``lora.rank`` when the strategy trains every client at the global rank."""
    from fedlora.strategies import STRATEGIES

    cls = STRATEGIES.get(run.strategy.name)
    if cls is None or not cls.heterogeneous_ranks:
        return (run.lora.rank,)
    return tuple(sorted({r for r in RANKS if r <= run.lora.rank} | {run.lora.rank}, reverse=True))


def choose_for_node(run: RunConfig, context: Context, labels: list[str]) -> dict[str, Any] | None:
    """What ``auto`` (rank or quantization) chooses on this node, measured once and kept in
    ``context.state``; None when nothing is ``auto``.

    Raises
    ------
    ConfigError
        When no (precision, rank) fits the memory this device has.
    """
    if STATE_CHOICE in context.state.config_records:
        return dict(context.state.config_records[STATE_CHOICE])
    rank, quant, device = _asked(run, context)
    if AUTO not in (rank, quant):
        return None
    from fedlora.model.loading import model_facts

    where = placement(device, run.model.dtype)
    facts = model_facts(
        run.model.replace(name=node_model_name(run, context)),
        list(run.lora.target_modules),
        batch=run.federation.batch_size,
        num_labels=max(len(labels), 2),
        checkpointing=run.federation.gradient_checkpointing,
        dtype=where.dtype,
    )
    budget = available_bytes(where.device)
    precisions = PRECISIONS if quant == AUTO else (quant,)
    ranks = candidate_ranks(run) if rank == AUTO else (int(rank),)
    got = choose(facts, budget, precisions=precisions, ranks=ranks)
    if got is None:
        smallest = memory_needed(facts, precisions[-1], min(ranks))
        raise ConfigError(
            f"--quantization/--rank auto: nothing fits on {where.device}: {budget / GIB:.2f} GB free, "
            f"the smallest option ({precisions[-1]}, rank {min(ranks)}) needs {smallest / GIB:.2f} GB "
            f"plus a {MARGIN:.0%} margin"
        )
    choice = {
        "auto": ",".join(what for what, asked in (("quantization", quant), ("rank", rank)) if asked == AUTO),
        "device": where.device,
        "quantization": got.quantization,
        "rank": got.rank,
        "need-gb": round(got.bytes / GIB, 3),
        "free-gb": round(budget / GIB, 3),
    }
    context.state[STATE_CHOICE] = ConfigRecord(choice)
    if is_device(context):  # the operator watches fedlora-client's output
        print(
            f"fedlora-client: chose {got.quantization}, rank {got.rank} on {where.device}: needs "
            f"{choice['need-gb']:.2f} GB of {choice['free-gb']:.2f} GB free ({MARGIN:.0%} margin)",
            flush=True,
        )
    return choice


def node_rank(run: RunConfig, context: Context, labels: list[str] | None = None) -> int:
    """The rank this node trains (see the module docstring)."""
    rank, _, _ = _asked(run, context)
    if rank == AUTO:
        return int(choose_for_node(run, context, labels or [])["rank"])
    return int(rank)


def node_model(run: RunConfig, context: Context, labels: list[str] | None = None) -> ModelConfig:
    """The base model this node trains on: ``run.model`` at this node's precision and device."""
    _, quant, device = _asked(run, context)
    if quant == AUTO:
        quant = str(choose_for_node(run, context, labels or [])["quantization"])
    if quant not in PRECISIONS:
        raise ConfigError(f"--quantization must be auto, {', '.join(PRECISIONS)}, got {quant!r}")
    return run.model.replace(name=node_model_name(run, context), quantization=quant, device=device)


def node_model_name(run: RunConfig, context: Context) -> str:
    """The base this node trains on: ``fedlora-client --model``, else its profile's ``model``, else
    ``model.name`` (another base than the run's only where the strategy allows it)."""
    profile = node_profile(run, context)
    return str(context.node_config.get(P.NODE_MODEL, "") or (profile.model if profile else "") or run.model.name)


def memory_gb(device: str = "cpu") -> float:
    """Total memory of ``device`` (the accelerator's, or the machine's for the CPU; 0 when unknown)."""
    if device.startswith("cuda"):
        return round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        return 0.0


def rows_by_task(ds: Any) -> dict[str, list[int]]:
    """Row indices of ``ds`` (this node's examples) per task, computed once per process."""
    return process_state().get(DERIVED, ("task-rows", id(ds)), lambda: task_rows(ds))


def capabilities(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> ConfigRecord:
    """What this node has: the rank it trains, its device, precision and memory, its examples
    (and per task), and what ``auto`` chose."""
    ds = train_examples(run, context, labels, tasks)
    model = node_model(run, context, labels)
    where = placement(model.device, model.dtype)
    choice = choose_for_node(run, context, labels)
    info: dict[str, Any] = {
        P.INFO_RANK: node_rank(run, context, labels),
        P.INFO_DEVICE: where.device,
        P.INFO_QUANTIZATION: model.quantization,
        P.INFO_DTYPE: where.dtype,
        P.INFO_MEMORY_GB: memory_gb(where.device),
        P.INFO_NUM_EXAMPLES: int(len(ds)),
        P.INFO_TASKS: json.dumps({t: len(rows) for t, rows in rows_by_task(ds).items()}),
    }
    if choice is not None:
        info[P.INFO_CHOSEN] = json.dumps(choice, sort_keys=True)
    return ConfigRecord(info)
