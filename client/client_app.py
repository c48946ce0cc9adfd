"""Flower ClientApp of fedlora (message API), generic over strategies.

A client keeps one base model per process (:func:`fedlora.model.loading.load_model`) and one peft
adapter per (rank, alpha) on it; a message only swaps the adapter's tensors. Everything a
strategy does differently on the client lives in that strategy's module, as its
:class:`~fedlora.strategies.hooks.ClientHooks`; this module runs the same steps for all:

train message: set up (run, model, adapter, hooks) -> fold the frozen base's delta ->
per group: install (frozen, received, kept) -> ``train_local`` -> ``after_train`` -> ``keep``
-> reply with the trained tensors, metrics and this node's capabilities.

What a node has (its data, its rank) is in :mod:`fedlora.client.node`; message keys are the
constants of :mod:`fedlora.wire.protocol`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import RunConfig
from fedlora.data import task_label_ids
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterHost, AdapterSpec, from_record, get_host, lora_modules, to_record
from fedlora.model.loading import LoadedModel, load_model
from fedlora.run.progress import status
from fedlora.strategies import ClientHooks, NodeStore, TrainGroup, get_strategy_class
from fedlora.strategies.basechain import held_digest
from fedlora.strategies.basechain import resolve as resolve_base
from fedlora.strategies.hooks import split_received
from fedlora.train.dpsgd import DPSettings
from fedlora.train.local import TrainResult, steps_for, train_local
from fedlora.wire import protocol as P
from fedlora.wire.transport import Wire, encode_update

from .node import (
    capabilities,
    encoded,
    eval_examples,
    is_device,
    node_index,
    node_model,
    rows_by_task,
    run_classes,
    train_examples,
)
from .privacy import NodePrivacy, ledger_file, state_file
from .secagg import handle as secure_stage
from .secagg import is_stage as is_secure_stage

app = ClientApp()


@dataclass
class Setup:
    """What one message asks this process to work with."""

    run: RunConfig
    config: ConfigRecord
    labels: list[str]
    tasks: list[str]
    loaded: LoadedModel
    host: AdapterHost
    spec: AdapterSpec
    hooks: ClientHooks


def setup(msg: Message, context: Context) -> Setup:
    """Read a train/evaluate message: the run, the (cached) model at this node's precision and
    device, the adapter shape, the hooks."""
    config = msg.content[P.CONFIG]
    run = RunConfig.from_dict(json.loads(str(config[P.RUN])))
    labels, tasks = run_classes(config)
    model = node_model(run, context, labels)
    strategy = get_strategy_class(run.strategy.name)
    if strategy.needs_float_base and model.quantization != "none":
        raise ConfigError(
            f"strategy '{run.strategy.name}' changes the frozen base weights, which this node's {model.quantization} "
            "base cannot hold exactly; train it with quantization none (fedlora-client --quantization none)"
        )
    if model.name != run.model.name:
        if not strategy.heterogeneous_models:
            raise ConfigError(
                f"--model {model.name!r}: strategy '{run.strategy.name}' aggregates adapters of the run's base "
                f"({run.model.name!r}) only; drop --model, or run a strategy for clients of different bases"
            )
        # This node's run names its own base: its tokenization, exports and capability facts follow it.
        run = run.model_copy(update={"model": run.model.replace(name=model.name)})
    loaded = load_model(
        model,
        num_labels=max(len(labels), 2),
        seed=run.seed,
        gradient_checkpointing=run.federation.gradient_checkpointing,
        head=strategy.model_head(run),
    )
    spec = AdapterSpec.from_config(run.lora, run.model.task, rank=int(config[P.RANK]))
    if P.ALPHA in config:
        spec = replace(spec, alpha=float(config[P.ALPHA]))
    hooks = strategy.client_hooks(config)
    return Setup(run, config, labels, tasks, loaded, get_host(loaded), spec, hooks)


def node_store(context: Context, config: ConfigRecord) -> NodeStore:
    """What this node keeps for itself: in its Context, and on a device also in its state file."""
    return NodeStore(context.state, state_file(dict(context.node_config)), str(config.get(P.RUN_UID, "")))


def proximal_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term ``(mu / 2) * sum_k ||params[k] - anchor[k]||^2`` (Li et al., MLSys
    2020), differentiable in ``params``: its gradient is ``mu * (w - w0)``."""
    total = sum((((params[k] - anchor[k].to(params[k].device)) ** 2).sum() for k in anchor), torch.zeros(()))
    return 0.5 * mu * total


def with_proximal(
    regularizer: Callable[[], torch.Tensor] | None,
    params: Mapping[str, torch.nn.Parameter],
    keys: Iterable[str],
    mu: float,
) -> Callable[[], torch.Tensor] | None:
    """``regularizer`` (a strategy's, or None) plus FedProx's term over ``keys``, anchored at their
    values now: call it after the received tensors are installed, before training. ``mu = 0``
    gives ``regularizer`` unchanged.

    The anchor is what the server sent (the global model); tensors a node keeps for itself
    (FedSA's private B) have no global value to stay near and are left out.
    """
    if mu <= 0:
        return regularizer
    anchor = {k: params[k].detach().clone() for k in keys}

    def penalty() -> torch.Tensor:
        term = proximal_penalty({k: params[k] for k in anchor}, anchor, mu)
        return term if regularizer is None else regularizer() + term

    return penalty


def train_group(
    s: Setup,
    name: str,
    group: TrainGroup,
    store: NodeStore,
    seed: int,
    index: int,
    steps: int,
    dp: DPSettings | None = None,
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """Install one group's adapter, train it (with DP-SGD when ``dp`` is given), keep what the
    node keeps (under the host's lock).

    Returns the training result and the trained tensors (live parameters, detached).
    """
    if len(group.data) == 0:
        raise ValueError(f"no training examples for task {group.name!r}")
    host, config = s.host, s.config
    shapes = host.shapes(name)
    host.load_state(name, s.hooks.frozen(shapes, group))
    host.load_state(name, group.tensors)
    kept = s.hooks.kept(shapes, group.tensors, store)
    host.load_state(name, kept)
    params = host.params(name)
    outside = s.hooks.outside(host, group)  # trained beside the adapter (entries of the frozen weights)
    task = f"  task {group.name}" if group.name else ""
    with s.hooks.training(host.peft_model, s.spec) as before_step:
        result = train_local(
            host.peft_model,
            [params[k] for k in group.tensors] + [params[k] for k in kept] + list(outside.values()),
            group.data,
            steps=steps,
            batch_size=int(config[P.BATCH_SIZE]),
            lr=float(config[P.LR]),
            pad_id=s.loaded.pad_id,
            causal=s.run.model.task == "causal_lm",
            seed=seed,
            regularizer=with_proximal(
                s.hooks.regularizer(params, s.spec.rank), params, group.tensors, float(config.get(P.PROXIMAL_MU, 0.0))
            ),
            before_step=before_step,
            dp=dp,
            compute_dtype=s.loaded.compute_dtype,
            on_step=lambda step, loss: status(
                f"round {config[P.SERVER_ROUND]}  client {index}{task}  step {step}/{steps}  loss {loss:.4f}"
            ),
        )
    # Live values: a hook that stores them serializes (copies) them at once, so no clone here.
    s.hooks.keep(store, {k: params[k].detach() for k in kept})
    return result, {**{k: params[k].detach() for k in group.tensors}, **{k: v.detach() for k, v in outside.items()}}


def group_steps(config: ConfigRecord, group: TrainGroup) -> int:
    """Local steps for one group this round (``local_epochs`` passes, else ``local_steps``)."""
    return steps_for(
        len(group.data), int(config[P.BATCH_SIZE]), int(config[P.LOCAL_STEPS]), float(config[P.LOCAL_EPOCHS])
    )


def upload(
    out: dict[str, torch.Tensor], received: dict[str, torch.Tensor], config: ConfigRecord, state: RecordDict
) -> ArrayRecord:
    """The reply's tensors on the run's wire: on a lossy one, what changed since ``received``
    (plus last upload's rounding residual, kept in ``state``, under error feedback)."""
    wire = Wire(str(config[P.TRANSPORT_DTYPE]), str(config.get(P.TRANSPORT_QUANTIZE, "none")))
    feedback = bool(config.get(P.ERROR_FEEDBACK, False))
    residual = from_record(state[P.RESIDUAL_STATE]) if feedback and P.RESIDUAL_STATE in state else {}
    record, residual = encode_update(out, received, wire, residual if feedback else None)
    if feedback:
        state[P.RESIDUAL_STATE] = to_record(residual)
    return record


def budget_stop(msg: Message, privacy: NodePrivacy, reached: float, index: int, device: bool) -> Message:
    """The reply of a node whose privacy budget this round would exceed: no tensors, the numbers."""
    spent, budget = privacy.epsilon(), privacy.run.privacy.budget
    if device:
        print(
            f"fedlora-client: privacy budget reached: epsilon {spent:.4g} spent, this round would reach "
            f"{reached:.4g} > budget {budget:g}; not training",
            flush=True,
        )
    metrics = {P.BUDGET_STOP: 1, P.EPSILON: float(spent), P.EPSILON_NEXT: float(reached), P.EPSILON_BUDGET: budget}
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received factors on this node's data and reply with them (a stage of secure
    aggregation is answered by :func:`fedlora.client.secagg.handle`, which trains through here)."""
    if is_secure_stage(msg):
        return secure_stage(msg, context, handle_train)
    s = setup(msg, context)
    config = s.config
    trained, received_base = split_received(from_record(msg.content[P.ARRAYS]))
    # The base change this round builds to: whole in the message, or links after what this node holds.
    factors = resolve_base(received_base, config, context.state)
    raw = train_examples(s.run, context, s.labels, s.tasks)
    data = encoded(raw, s.run, s.loaded.tokenizer, s.labels, train=True)
    index = node_index(context)
    seed = int(config[P.SEED]) + 7919 * index
    store = node_store(context, config)
    ledger = ledger_file(dict(context.node_config))
    privacy = NodePrivacy.load(s.run, context.state, ledger) if s.run.privacy.mode == "local" else None
    start = time.perf_counter()
    tally = _TrainTally(next_rank=s.spec.rank)
    with s.host.lock:  # one adapter per rank is shared by the virtual clients of this process
        name = s.host.ensure(s.spec, seed=s.run.seed)
        s.host.set_base_delta(*s.hooks.base_delta(s.host, lora_modules(s.host.shapes(name)), factors))
        groups = s.hooks.groups(trained, data, rows_by_task(raw))
        plans = {group.name: (None, group_steps(config, group)) for group in groups}
        if privacy is not None:  # plan every group's DP-SGD and check the budget before any training
            batch = int(config[P.BATCH_SIZE])
            plans = {
                g.name: (privacy.plan(g.name, len(g.data), batch, n), n) for g, (_, n) in zip(groups, plans.values())
            }
            reached = privacy.would_exceed(plans)
            if reached is not None:
                return budget_stop(msg, privacy, reached, index, is_device(context))
        for group in groups:
            dp, steps = plans[group.name]
            if privacy is not None:  # spent when the steps start: recorded (and kept) before them
                privacy.record(group.name, dp, steps)
                privacy.save(context.state, ledger)
            result, live = train_group(s, name, group, store, seed, index, steps, dp)
            # The live parameters are serialized under the lock below; only when another group's
            # adapter is loaded into them next must this group's values be copied out first.
            if len(groups) > 1:
                live = {k: v.clone() for k, v in live.items()}
            tally.add(group, result, *s.hooks.after_train(live, s.spec.rank))
        arrays = upload(tally.arrays, trained, config, context.state)
    metrics = tally.metrics(time.perf_counter() - start, privacy)
    if is_device(context):
        _announce(config, metrics)
    info = capabilities(s.run, context, s.labels, s.tasks)
    if held_digest(context.state) is not None:
        info[P.INFO_BASE_DIGEST] = held_digest(context.state)
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(metrics), P.INFO: info}), reply_to=msg)


@dataclass
class _TrainTally:
    """What the groups of one train message add up to: the tensors to send and the metrics."""

    next_rank: int
    arrays: dict[str, Any] = field(default_factory=dict)
    group_metrics: dict[str, Any] = field(default_factory=dict)
    loss_sum: float = 0.0
    examples: int = 0
    steps: int = 0

    def add(self, group: Any, result: Any, out: dict[str, Any], extra: dict[str, Any]) -> None:
        """One trained group: its tensors (task-qualified when it has a name) and its counts."""
        self.next_rank = int(extra.get(P.RANK, self.next_rank))
        for key, value in out.items():
            self.arrays[P.task_key(group.name, key) if group.name else key] = value
        if group.name:
            self.group_metrics[P.task_metric(P.NUM_EXAMPLES, group.name)] = int(len(group.data))
            self.group_metrics[P.task_metric(P.TRAIN_LOSS, group.name)] = float(result.loss)
        self.loss_sum += float(result.loss) * len(group.data)
        self.examples += len(group.data)
        self.steps += result.steps

    def metrics(self, seconds: float, privacy: NodePrivacy | None) -> dict[str, Any]:
        """The reply's metrics: per-group entries, then the totals (and epsilon under local DP)."""
        metrics = {
            **self.group_metrics,
            P.NUM_EXAMPLES: int(self.examples),
            P.TRAIN_LOSS: self.loss_sum / max(self.examples, 1),
            P.TRAIN_STEPS: int(self.steps),
            P.TRAIN_SECONDS: float(seconds),
            P.RANK: int(self.next_rank),
        }
        if privacy is not None:
            metrics[P.EPSILON] = privacy.epsilon()
        return metrics


def _announce(config: Any, metrics: dict[str, Any]) -> None:
    """The device's one line about the round it trained."""
    print(
        f"fedlora-client: round {config[P.SERVER_ROUND]}: trained rank {metrics[P.RANK]} on "
        f"{metrics[P.NUM_EXAMPLES]} examples, {metrics[P.TRAIN_STEPS]} steps, loss {metrics[P.TRAIN_LOSS]:.4f}, "
        f"{metrics[P.TRAIN_SECONDS]:.1f} s" + (f", epsilon {metrics[P.EPSILON]:.4g}" if P.EPSILON in metrics else ""),
        flush=True,
    )


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate this node's own model (received shared tensors + what it keeps); export it if asked."""
    from fedlora.run.export import export_adapter
    from fedlora.train.local import evaluate

    s = setup(msg, context)
    received = from_record(msg.content[P.ARRAYS])
    enc = encoded(eval_examples(s.run, context, s.labels, s.tasks), s.run, s.loaded.tokenizer, s.labels)
    kwargs: dict[str, Any] = {}
    if s.tasks and s.run.model.task == "classification":
        task_labels = task_label_ids(s.labels, s.tasks)
        kwargs = {"task_labels": {i: task_labels[t] for i, t in enumerate(s.tasks)}, "task_names": s.tasks}
    with s.host.lock:
        name = s.host.ensure(s.spec, seed=s.run.seed)
        s.host.set_base_delta({}, "")
        s.host.load_state(name, received)
        kept = s.hooks.kept(s.host.shapes(name), received, node_store(context, s.config))
        s.host.load_state(name, kept)
        metrics = evaluate(
            s.host.peft_model,
            enc,
            batch_size=max(int(s.config[P.BATCH_SIZE]), 32),
            pad_id=s.loaded.pad_id,
            causal=s.run.model.task == "causal_lm",
            compute_dtype=s.loaded.compute_dtype,
            **kwargs,
        )
        if bool(s.config.get(P.EXPORT, False)) and P.NODE_EXPORT_DIR in context.node_config:
            node = node_index(context) if P.NODE_PARTITION_ID in context.node_config else context.node_id
            export_adapter(
                s.host,
                name,
                {**received, **kept},
                Path(str(context.node_config[P.NODE_EXPORT_DIR])) / str(node) / "adapter",
                s.run,
                s.labels,
                {"personalized": True, "node": str(node)},
            )
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics[P.NUM_EXAMPLES] = int(len(enc))
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Tell the server what this node has (see :func:`fedlora.client.node.capabilities`), or, for
    the server's end-of-run notice (:data:`~fedlora.wire.protocol.RUN_OVER`), print it."""
    config = msg.content[P.CONFIG]
    if P.RUN_OVER in config:  # a deployed server's last word: fedlora-client ends on this line
        print(f"fedlora-client: {P.RUN_OVER_LINE}: {str(config[P.RUN_OVER])[:300]}", flush=True)
        return Message(content=RecordDict(), reply_to=msg)
    run = RunConfig.from_dict(json.loads(str(config[P.RUN])))
    info = capabilities(run, context, *run_classes(config))
    if is_device(context):
        print(
            f"fedlora-client: reported to the server: rank {info[P.INFO_RANK]}, {info[P.INFO_DEVICE]}, "
            f"{info[P.INFO_MEMORY_GB]} GB, {info[P.INFO_NUM_EXAMPLES]} examples",
            flush=True,
        )
    return Message(content=RecordDict({P.INFO: info}), reply_to=msg)


# The entry points look the handlers up at call time, so a test can wrap one.
@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)
