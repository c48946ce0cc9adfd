"""Flower ClientApp of fedlora (message API).

A client keeps one base model per process (:func:`fedlora.models.load_model`) and one peft
adapter per (rank, alpha) on it; a train message only swaps the adapter's tensors (and, for the
strategies that fold updates into the base, the frozen weights' delta), trains the ones it
received and sends them back. See :mod:`fedlora.strategies.base` for the protocol.

Where the client's data comes from, by ``context.node_config``:

* ``data-path``: a local file on this device (deployment: ``fedlora-client --data``);
* else ``partition-id`` / ``num-partitions``: its partition of the run's dataset (simulation).

Which rank it trains: ``node_config["rank"]`` (``fedlora-client --rank``), else its device
profile (``[[federation.profiles]]``, assigned round-robin by partition id), else ``lora.rank``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import (AdapterHost, AdapterSpec, from_record, get_host, is_base_delta, lora_modules, module_of,
                              seeded_lora_a, to_record)
from fedlora.config import RunConfig
from fedlora.data import Encoded, encode, load_device_data, load_partition, subset, task_label_ids, task_rows
from fedlora.lowrank import svd_init
from fedlora.models import load_model
from fedlora.runlog import status
from fedlora.strategies.base import split_task_key, task_key
from fedlora.strategies.hetlora import self_prune, tail_penalty
from fedlora.training import steps_for, train_local

app = ClientApp()

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, build):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def run_classes(config: ConfigRecord) -> tuple[list[str], list[str]]:
    """(class names in id order, task names) of the run, as every message from the server says."""
    labels = json.loads(str(config["labels"])) if "labels" in config else []
    tasks = json.loads(str(config["run-tasks"])) if "run-tasks" in config else []
    return [str(x) for x in labels], [str(x) for x in tasks]


def node_index(context: Context) -> int:
    """This node's index: its partition in simulation, ``fedlora-client --partition-id`` on a device,
    else derived from its node id. Seeds its local training and held-out split."""
    return int(context.node_config.get("partition-id", context.node_id % 100_003))


def _own_examples(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> Any:
    """All of this node's examples: its local file on a device, its partition in simulation."""
    node_cfg = context.node_config
    if "data-path" in node_cfg:
        path = str(node_cfg["data-path"])
        return _cached(("device", path, repr(run.data), run.model.task, tuple(labels), tuple(tasks)),
                       lambda: load_device_data(run, path, labels, tasks))
    pid, num = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
    return _cached(("partition", repr(run.data), run.model.task, run.seed, pid, num),
                   lambda: load_partition(run, pid, num))


def client_dataset(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> Any:
    """This node's raw training examples (cached per process)."""
    own = _own_examples(run, context, labels, tasks)
    if _personalized(run):
        return _local_split(run, own, node_index(context))["train"]
    return own


def _personalized(run: RunConfig) -> bool:
    from fedlora.strategies import STRATEGIES

    cls = STRATEGIES.get(run.strategy.name)
    return bool(cls is not None and cls.personalized)


def _local_split(run: RunConfig, part: Any, pid: int) -> dict[str, Any]:
    """A personalized model is judged on its own distribution: a seeded ``data.eval_fraction`` of
    the node's partition is held out (all of it is used for both when it has one example)."""
    def build():
        if len(part) < 2:
            return {"train": part, "test": part}
        return part.train_test_split(test_size=run.data.eval_fraction, seed=run.seed + pid, shuffle=True)
    return _cached(("local-split", repr(run.data), run.model.task, run.seed, pid, id(part)), build)


def client_data(run: RunConfig, context: Context, tokenizer: Any, labels: list[str], tasks: list[str]) -> Encoded:
    """This node's tokenized training examples (cached per process)."""
    ds = client_dataset(run, context, labels, tasks)
    return _cached(("encoded", id(ds), run.model.name, run.model.max_length),
                   lambda: encode(ds, tokenizer, run.model.max_length))


def client_rank(run: RunConfig, context: Context) -> int:
    """The rank this node trains (see the module docstring)."""
    node_cfg = context.node_config
    if "rank" in node_cfg:
        return int(node_cfg["rank"])
    profiles = run.federation.profiles
    if profiles and "partition-id" in node_cfg:
        return int(profiles[int(node_cfg["partition-id"]) % len(profiles)].rank)
    return int(run.lora.rank)


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (ValueError, OSError, AttributeError):
        return 0.0


def capabilities(run: RunConfig, context: Context, labels: list[str], tasks: list[str]) -> ConfigRecord:
    """What this node has: the rank it trains, device, memory, examples, examples per task."""
    ds = client_dataset(run, context, labels, tasks)
    return ConfigRecord({
        "rank": client_rank(run, context),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "memory-gb": _memory_gb(),
        "num-examples": int(len(ds)),
        "tasks": json.dumps({t: len(rows) for t, rows in task_rows(ds).items()}),
    })


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server what this node has (see :func:`capabilities`)."""
    run = RunConfig.from_dict(json.loads(str(msg.content["config"]["run"])))
    info = capabilities(run, context, *run_classes(msg.content["config"]))
    if "data-path" in context.node_config:
        print(f"fedlora-client: reported to the server: rank {info['rank']}, {info['device']}, "
              f"{info['memory-gb']} GB, {info['num-examples']} examples", flush=True)
    return Message(content=RecordDict({"info": info}), reply_to=msg)


def _digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    crc = zlib.crc32(extra.encode())
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(tensors[key].detach().contiguous().numpy().tobytes(), crc)
    return f"{extra}:{crc:08x}"


def base_deltas(host: AdapterHost, modules: list[str], factors: dict[str, torch.Tensor], svd_rank: int) -> tuple[
        dict[str, torch.Tensor], str]:
    """Dense per-module deltas for the frozen base, and a token naming them.

    Parameters
    ----------
    host : AdapterHost
        Holds the pretrained weights.
    modules : list of str
        The adapter's target modules.
    factors : dict
        Received ``<module>.base_delta_A/B`` tensors.
    svd_rank : int
        When > 0, each target weight becomes its FeDeRA residual ``W - trunc_r(W)`` (computed
        here with peft's SVD init, once per process, so it never crosses the network).
    """
    dense: dict[str, torch.Tensor] = {}
    if svd_rank > 0:
        for module in modules:
            dense[module] = _cached(("svd", host.loaded.key, module, svd_rank),
                                    lambda m=module: _svd_delta(host, m, svd_rank))
    for key, a in factors.items():
        if key.endswith("_A"):
            module = module_of(key)
            prod = factors[f"{module}.base_delta_B"] @ a
            dense[module] = dense[module] + prod if module in dense else prod
    token = _digest(factors, f"svd{svd_rank}") if (factors or svd_rank) else ""
    return dense, token


def _svd_delta(host: AdapterHost, module: str, rank: int) -> torch.Tensor:
    weight = host.base_weight(module)
    _, _, residual = svd_init(weight, rank, float(rank))
    return residual - weight


LOCAL_STATE = "fedlora-local"


def _setup(msg: Message) -> tuple[RunConfig, list[str], Any, AdapterHost, AdapterSpec]:
    """(run, labels, loaded model, adapter host, adapter spec) a message asks for."""
    config = msg.content["config"]
    run = RunConfig.from_dict(json.loads(str(config["run"])))
    labels = json.loads(str(config["labels"]))
    loaded = load_model(run.model, num_labels=max(len(labels), 2), seed=run.seed)
    rank = int(config["rank"])
    spec = AdapterSpec.from_config(run.lora, run.model.task, rank=rank)
    if "alpha" in config:
        spec = AdapterSpec(rank=rank, alpha=float(config["alpha"]), dropout=spec.dropout,
                           target_modules=spec.target_modules, task=spec.task)
    return run, labels, loaded, get_host(loaded), spec


def local_tensors(context: Context, host: AdapterHost, name: str, marker: str, sent: dict) -> dict[str, torch.Tensor]:
    """The tensors this node keeps for itself (FedSA-LoRA's B): from ``context.state``, which
    persists across rounds, else peft's init for B (zeros)."""
    keys = [k for k in host.shapes(name) if f".{marker}." in k and k not in sent]
    stored = from_record(context.state[LOCAL_STATE]) if LOCAL_STATE in context.state else {}
    shapes = host.shapes(name)
    return {k: stored[k] if k in stored and tuple(stored[k].shape) == shapes[k] else torch.zeros(shapes[k]) for k in keys}


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received factors on this node's data and reply with them."""
    config = msg.content["config"]
    run, labels, loaded, host, spec = _setup(msg)
    rank = spec.rank
    received = from_record(msg.content["arrays"])
    factors = {k: v for k, v in received.items() if is_base_delta(k)}
    trained = {k: v for k, v in received.items() if not is_base_delta(k)}
    labels, run_tasks = run_classes(config)
    data = client_data(run, context, loaded.tokenizer, labels, run_tasks)
    # One group of tensors per adapter to train: FL-TAC sends one per task this node holds.
    if "tasks" in config:
        rows = task_rows(client_dataset(run, context, labels, run_tasks))
        groups = []
        for task in json.loads(str(config["tasks"])):
            tensors = {split_task_key(k)[1]: v for k, v in trained.items() if split_task_key(k)[0] == task}
            groups.append((task, tensors, subset(data, rows.get(task, []))))
    else:
        groups = [("", trained, data)]
    seed = int(config["seed"]) + 7919 * node_index(context)
    pruning = "prune-gamma" in config
    start = time.perf_counter()
    arrays_out: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {}
    loss_sum, examples, steps_total, new_rank = 0.0, 0, 0, rank
    with host.lock:  # one adapter per rank is shared by the virtual clients of this process
        name = host.ensure(spec, seed=run.seed)
        dense, token = base_deltas(host, lora_modules(host.shapes(name)), factors, int(config.get("svd-rank", 0)))
        host.set_base_delta(dense, token)
        for task, tensors, task_data in groups:
            if len(task_data) == 0:
                raise ValueError(f"no training examples for task {task!r}")
            if "a-seed" in config:
                frozen = {k: s for k, s in host.shapes(name).items() if k not in tensors}
                host.load_state(name, seeded_lora_a(frozen, int(config["a-seed"])))
            host.load_state(name, tensors)
            local = local_tensors(context, host, name, str(config["keep-local"]), tensors) if "keep-local" in config else {}
            host.load_state(name, local)
            params = host.params(name)
            steps = steps_for(len(task_data), int(config["batch-size"]), int(config["local-steps"]),
                              float(config["local-epochs"]))
            regularizer = None
            if pruning and float(config["prune-lambda"]) > 0:
                keep = max(int(config["min-rank"]), int(float(config["prune-gamma"]) * rank))
                lam = float(config["prune-lambda"])
                regularizer = lambda p=params, k=keep, lam=lam: lam * tail_penalty(p, k)  # noqa: E731
            result = train_local(
                host.peft_model,
                [params[k] for k in tensors] + [params[k] for k in local],
                task_data,
                steps=steps,
                batch_size=int(config["batch-size"]),
                lr=float(config["lr"]),
                pad_id=loaded.tokenizer.pad_token_id,
                causal=run.model.task == "causal_lm",
                seed=seed,
                regularizer=regularizer,
                on_step=lambda step, loss, total=steps, task=task: status(
                    f"round {config['server-round']}  client {node_index(context)}"
                    f"{'  task ' + task if task else ''}  step {step}/{total}  loss {loss:.4f}"),
            )
            # The live parameters are serialized under the lock below; only when another task's
            # adapter is loaded into them next must this task's values be copied out first.
            out = {k: params[k].detach().clone() if len(groups) > 1 else params[k].detach() for k in tensors}
            if local:  # kept on this node for the next round, never sent
                context.state[LOCAL_STATE] = to_record({k: params[k] for k in local})
            if pruning:
                out, new_rank = self_prune(out, rank, gamma=float(config["prune-gamma"]),
                                           threshold=float(config["prune-threshold"]), min_rank=int(config["min-rank"]))
            for key, value in out.items():
                arrays_out[task_key(task, key) if task else key] = value
            if task:
                metrics[f"num-examples::{task}"] = int(len(task_data))
                metrics[f"train-loss::{task}"] = float(result.loss)
            loss_sum += float(result.loss) * len(task_data)
            examples += len(task_data)
            steps_total += result.steps
        arrays = to_record(arrays_out, str(config["transport-dtype"]))
    metrics.update({
        "num-examples": int(examples),
        "train-loss": loss_sum / max(examples, 1),
        "train-steps": int(steps_total),
        "train-seconds": float(time.perf_counter() - start),
        "rank": int(new_rank),
    })
    if "data-path" in context.node_config:  # a device: its operator watches fedlora-client's output
        print(f"fedlora-client: round {config['server-round']}: trained rank {new_rank} on {examples} examples, "
              f"{steps_total} steps, loss {metrics['train-loss']:.4f}, {metrics['train-seconds']:.1f} s", flush=True)
    info = capabilities(run, context, labels, run_tasks)
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "info": info}),
                   reply_to=msg)


def client_eval_data(run: RunConfig, context: Context, tokenizer: Any, labels: list[str],
                     tasks: list[str]) -> Encoded:
    """This node's held-out examples: the seeded ``data.eval_fraction`` of its own examples (its
    partition in simulation, its ``--data`` file on a device) that it does not train on."""
    held_out = _local_split(run, _own_examples(run, context, labels, tasks), node_index(context))["test"]
    return _cached(("eval", id(held_out), run.model.name, run.model.max_length),
                   lambda: encode(held_out, tokenizer, run.model.max_length))


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate this node's own model (received shared tensors + what it keeps); export it if asked."""
    from fedlora.export import export_adapter
    from fedlora.training import evaluate

    config = msg.content["config"]
    run, labels, loaded, host, spec = _setup(msg)
    received = from_record(msg.content["arrays"])
    _, run_tasks = run_classes(config)
    enc = client_eval_data(run, context, loaded.tokenizer, labels, run_tasks)
    kwargs: dict[str, Any] = {}
    if run_tasks and run.model.task == "classification":
        task_labels = task_label_ids(labels, run_tasks)
        kwargs = {"task_labels": {i: task_labels[t] for i, t in enumerate(run_tasks)}, "task_names": run_tasks}
    with host.lock:
        name = host.ensure(spec, seed=run.seed)
        host.set_base_delta({}, "")
        host.load_state(name, received)
        local = local_tensors(context, host, name, str(config["keep-local"]), received) if "keep-local" in config else {}
        host.load_state(name, local)
        metrics = evaluate(host.peft_model, enc, batch_size=max(int(config["batch-size"]), 32),
                           pad_id=loaded.tokenizer.pad_token_id, causal=run.model.task == "causal_lm", **kwargs)
        if bool(config.get("export", False)) and "export-dir" in context.node_config:
            node = node_index(context) if "partition-id" in context.node_config else context.node_id
            export_adapter(host, name, {**received, **local}, Path(str(context.node_config["export-dir"])) / str(node)
                           / "adapter", run, labels, {"personalized": True, "node": str(node)})
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["num-examples"] = int(len(enc))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)
