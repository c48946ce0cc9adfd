"""The fedlora ServerApp: round loop, reply validation, evaluation, checkpoints, export.

The same loop runs under every runtime (in-process Grid, Flower's Ray simulation, the
deployment engine): it talks to clients only through the ``Grid`` it is handed.

One round:

0. nodes the server has not heard from are asked what they have (a ``query`` message: rank,
   device, memory, examples, tasks), which heterogeneous strategies use to shape their payload;
1. ``strategy.configure_train`` builds one Message per sampled node (its slice of the global
   state and the round config);
2. replies are pulled as they arrive (progress is printed per client) until all are in or the
   round timeout passes;
3. each reply is validated against what that node was sent; bad ones are dropped and logged;
4. ``strategy.aggregate_train`` combines the rest; the server evaluates the global adapter on
   its held-out split, appends a line to metrics.jsonl and writes a checkpoint atomically.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import AdapterHost, AdapterSpec, from_record, get_host, record_bytes, to_record
from fedlora.config import RunConfig
from fedlora.data import (Encoded, TaskData, encode, load_partition, load_task_data, partition_sizes_ok, subset,
                          task_rows)
from fedlora.errors import DataError
from fedlora.export import export_adapter, fold_base_delta
from fedlora.models import LoadedModel, load_model
from fedlora.runlog import Progress, RunDirectory, ScalarLog, set_active
from fedlora.strategies import GlobalView, LoRAStrategy, NodeInfo, create
from fedlora.training import evaluate

from .validation import ReplyError, validate_reply

PULL_INTERVAL_S = 0.2


@dataclass
class Prepared:
    """Everything checked and loaded before a run may write anything.

    Attributes
    ----------
    cfg : RunConfig
        The validated configuration.
    data : TaskData
        Training pool, held-out split, label names.
    loaded : LoadedModel
        The cached base model and tokenizer.
    spec : AdapterSpec
        The global adapter's shape.
    eval_data : Encoded
        The tokenized held-out split.
    """

    cfg: RunConfig
    data: TaskData
    loaded: LoadedModel
    spec: AdapterSpec
    eval_data: Encoded

    @property
    def host(self) -> AdapterHost:
        return get_host(self.loaded)


def prepare(cfg: RunConfig, *, check_partitions: bool = True) -> Prepared:
    """Load and check model, data and strategy; raise a FedLoraError naming the first problem.

    Parameters
    ----------
    cfg : RunConfig
        A validated configuration.
    check_partitions : bool
        Also partition the training pool for ``federation.clients`` and require every
        partition to be non-empty (simulation runtimes; a deployment's clients bring their own).
    """
    from fedlora.strategies import get_strategy_class

    strategy_cls = get_strategy_class(cfg.strategy.name)
    strategy_cls._parse_options(cfg.strategy.options)
    data = load_task_data(cfg)
    strategy_cls.check_setup(cfg, list(getattr(data, "tasks", [])))
    if check_partitions:
        partition_sizes_ok(cfg, data)
        for pid in range(cfg.federation.clients):
            if len(load_partition(cfg, pid, cfg.federation.clients)) == 0:
                raise DataError(
                    f"data.partitioner {cfg.data.partitioner!r} left client {pid} with no examples "
                    f"(federation.clients = {cfg.federation.clients}); use fewer clients or more data"
                )
    loaded = load_model(cfg.model, num_labels=max(len(data.labels), 2), seed=cfg.seed)
    spec = AdapterSpec.from_config(cfg.lora, cfg.model.task)
    name = get_host(loaded).ensure(spec, seed=cfg.seed)
    if strategy_cls.needs_float_base:
        from fedlora.adapters import lora_modules

        for module in lora_modules(get_host(loaded).shapes(name)):
            get_host(loaded).base_weight(module)  # raises on a quantized weight
    create(cfg, spec)
    eval_data = encode(data.eval, loaded.tokenizer, cfg.model.max_length)
    return Prepared(cfg=cfg, data=data, loaded=loaded, spec=spec, eval_data=eval_data)


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    adapter_dir: str = ""


def _dense_deltas(view: GlobalView) -> tuple[dict[str, torch.Tensor], str]:
    dense = {m: b @ a for m, (b, a) in view.base_delta.items()}
    if not dense:
        return {}, ""
    crc = 0
    for module in sorted(view.base_delta):
        for t in view.base_delta[module]:
            crc = zlib.crc32(t.detach().contiguous().numpy().tobytes(), crc)
    return dense, f"server:{crc:08x}"


def evaluate_view(prepared: Prepared, view: GlobalView, rows: list[int] | None = None) -> dict[str, float]:
    """Evaluate one global model on the held-out split (or the given rows of it)."""
    host = prepared.host
    data = prepared.eval_data
    if rows is not None:
        data = subset(data, rows)
    kwargs: dict[str, Any] = {}
    tasks = list(getattr(prepared.data, "tasks", []) or [])
    if tasks and prepared.cfg.model.task == "classification":
        kwargs = {"task_labels": {i: prepared.data.task_labels[t] for i, t in enumerate(tasks)}, "task_names": tasks}
    dense, token = _dense_deltas(view)
    with host.lock:
        name = host.ensure(view.spec, seed=prepared.cfg.seed)
        host.set_base_delta(dense, token)
        # A view may leave out LoRA factors whose product is zero (FLoRA after a merge): zero
        # their B so nothing a client left in the shared adapter leaks into the evaluation.
        missing_b = {k: torch.zeros(shape) for k, shape in host.shapes(name).items()
                     if k not in view.state and ".lora_B." in k}
        host.load_state(name, {**view.state, **missing_b})
        return evaluate(
            host.peft_model,
            data,
            batch_size=max(prepared.cfg.federation.batch_size, 32),
            pad_id=prepared.loaded.tokenizer.pad_token_id,
            causal=prepared.cfg.model.task == "causal_lm",
            **kwargs,
        )


def evaluate_views(prepared: Prepared, views: list[GlobalView]) -> dict[str, float]:
    """Metrics of the global state: one model on the whole split, or one per task on its rows.

    With per-task models, ``eval_<metric>/<task>`` is each task's own model on its own rows and
    ``eval_<metric>`` their mean weighted by rows.
    """
    if len(views) == 1 and not views[0].name:
        return evaluate_view(prepared, views[0])
    rows = task_rows(prepared.data.eval)
    out: dict[str, float] = {}
    totals: dict[str, float] = {}
    count = 0
    for view in views:
        view_rows = rows.get(view.name, [])
        if not view_rows:
            continue
        metrics = evaluate_view(prepared, view, view_rows)
        for key, value in metrics.items():
            if "/" in key:
                continue
            out[f"{key}/{view.name}"] = value
            totals[key] = totals.get(key, 0.0) + value * len(view_rows)
        count += len(view_rows)
    for key, value in totals.items():
        out[key] = value / max(count, 1)
    return dict(sorted(out.items()))


def evaluate_state(prepared: Prepared, state: dict[str, torch.Tensor],
                   strategy: LoRAStrategy | None = None) -> dict[str, float]:
    """Server-side evaluation of a global state on the held-out split."""
    if strategy is None:
        strategy = create(prepared.cfg, prepared.spec)
        strategy.tasks = list(getattr(prepared.data, "tasks", []) or [])
    return evaluate_views(prepared, strategy.views(state))


def federated_evaluate(grid: Grid, strategy: LoRAStrategy, state: dict[str, torch.Tensor], shared: dict[str, str],
                       server_round: int, clients: dict[int, dict[str, Any]], timeout: float) -> dict[str, float]:
    """Personalized strategies: every node evaluates its own model; the mean is the round's metric.

    Each node's accuracy/loss lands in its ``clients`` entry; nodes that fail are skipped.
    """
    messages = list(strategy.configure_evaluate(server_round, to_record(state), ConfigRecord(dict(shared)), grid))
    replies = _collect(grid, messages, timeout, lambda *_: None)
    for reply in replies:
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            continue
        node = reply.metadata.src_node_id
        got = dict(reply.content.metric_records["metrics"])
        clients.setdefault(node, {"node_id": node}).update(
            {k: float(v) for k, v in got.items() if k in ("eval_accuracy", "eval_loss", "eval_perplexity")})
    agg = strategy.aggregate_evaluate(server_round, replies)
    return {k: float(v) for k, v in dict(agg).items()} if agg is not None else {}


def query_nodes(grid: Grid, strategy: LoRAStrategy, shared: dict[str, str], timeout: float,
                progress: Progress | None = None, announce: bool = False) -> None:
    """Ask nodes the strategy has not heard from what they have; record it in ``node_info``.

    A node that cannot answer (its data does not fit the run, say) is reported on ``progress``
    and asked again next round; the round goes on with the others.
    """
    unknown = [n for n in sorted(grid.get_node_ids()) if n not in strategy.node_info]
    if not unknown:
        return
    messages = [Message(content=RecordDict({"config": ConfigRecord(dict(shared))}), message_type=MessageType.QUERY,
                        dst_node_id=node, group_id="query") for node in unknown]
    replies = _collect(grid, messages, timeout, lambda *_: None)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or "info" not in reply.content.config_records:
            if progress is not None:
                reason = reply.error.reason if reply.has_error() else "no capability record"
                progress.line(f"node {node} could not report its capabilities: {reason}")
            continue
        record_node_info(strategy, node, reply.content.config_records["info"], progress, announce)


def record_node_info(strategy: LoRAStrategy, node: int, info: ConfigRecord, progress: Progress | None,
                     announce: bool) -> None:
    """Keep what ``node`` says it has (a query reply's or a train reply's ``info``); ignore a malformed one."""
    try:
        strategy.node_info[node] = NodeInfo(
            node_id=node, rank=int(info["rank"]), device=str(info.get("device", "cpu")),
            memory_gb=float(info.get("memory-gb", 0.0)), num_examples=int(info.get("num-examples", 0)),
            tasks={str(k): int(v) for k, v in json.loads(str(info.get("tasks", "{}"))).items()},
        )
    except (KeyError, TypeError, ValueError):
        return
    if progress is not None and announce:
        got = strategy.node_info[node]
        progress.line(f"node {node} joined: rank {got.rank}, {got.device}, {got.memory_gb:g} GB, "
                      f"{got.num_examples} examples")


def _collect(grid: Grid, messages: list[Message], timeout: float, on_reply) -> list[Message]:
    """Push ``messages`` and pull replies as they arrive, until all are in or ``timeout``."""
    ids = [i for i in grid.push_messages(messages) if i]
    pending = dict.fromkeys(ids)  # ordered: the in-process grid delivers in sampling order
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending)))
        for reply in got:
            if reply.metadata.reply_to_message_id in pending:
                del pending[reply.metadata.reply_to_message_id]
                replies.append(reply)
                on_reply(reply, len(replies), len(ids))
        if not got:
            time.sleep(PULL_INTERVAL_S)
    return replies


def _fmt(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("eval_accuracy", "eval_perplexity", "eval_loss") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def run_server(grid: Grid, prepared: Prepared, run_dir: RunDirectory, *, progress: Progress | None = None,
               resume: bool = False, announce_nodes: bool = False) -> RunResult:
    """Run the configured rounds over ``grid`` and write the run directory.

    Parameters
    ----------
    grid : Grid
        Where the clients are (any runtime).
    prepared : Prepared
        Output of :func:`prepare`.
    run_dir : RunDirectory
        Where config, metrics, checkpoints and the adapter go.
    progress : Progress, optional
        Receives one line per client reply and per round.
    resume : bool
        Continue from the latest checkpoint in ``run_dir``.
    announce_nodes : bool
        Print a line per node as it joins (rank, device, memory, examples): on a deployment,
        where nodes are real devices; not for hundreds of simulated ones.
    """
    progress = progress or Progress()
    set_active(progress)  # in-process clients report their local steps to the status line
    try:
        return _run_server(grid, prepared, run_dir, progress, resume, announce_nodes)
    finally:
        set_active(None)


def _run_server(grid: Grid, prepared: Prepared, run_dir: RunDirectory, progress: Progress, resume: bool,
                announce_nodes: bool) -> RunResult:
    cfg = prepared.cfg
    host = prepared.host
    strategy: LoRAStrategy = create(cfg, prepared.spec)
    strategy.tasks = list(getattr(prepared.data, "tasks", []) or [])
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        initial_state = host.initial_state(name, cfg.seed)
    state = strategy.initialize(initial_state, host)
    result = RunResult(run_dir=str(run_dir.path))
    start_round = 1
    if resume:
        last, state, extra = run_dir.load_checkpoint()
        strategy.load_state_dict(extra.get("strategy", {}))
        run_dir.truncate_metrics(last)
        result.rounds = run_dir.read_metrics()
        result.initial = extra.get("initial", {})
        start_round = last + 1
        progress.line(f"resuming {cfg.name} after round {last}/{cfg.rounds}")
    else:
        run_dir.write_config(cfg)
        result.initial = evaluate_state(prepared, state, strategy)
        progress.line(f"round 0/{cfg.rounds}  initial global adapter  {_fmt(result.initial)}")

    scalars = ScalarLog(run_dir.path)
    shared = {"run": cfg.to_json(), "labels": json.dumps(prepared.data.labels),
              "run-tasks": json.dumps(list(prepared.data.tasks))}
    max_bytes = int(cfg.federation.max_reply_mb * 1024 * 1024)
    for server_round in range(start_round, cfg.rounds + 1):
        started = time.perf_counter()
        if strategy.needs_node_info:
            query_nodes(grid, strategy, shared, cfg.federation.round_timeout, progress, announce=announce_nodes)
        messages = list(strategy.configure_train(server_round, to_record(state), ConfigRecord(dict(shared)), grid))
        sent = dict(strategy.last_sent)
        clients: dict[int, dict[str, Any]] = {
            node: {"node_id": node, "bytes_down": record_bytes(rec)} for node, rec in sent.items()
        }
        valid: list[Message] = []
        dropped: list[dict[str, Any]] = []

        def on_reply(reply: Message, count: int, total: int, server_round: int = server_round) -> None:
            node = reply.metadata.src_node_id
            entry = clients.setdefault(node, {"node_id": node, "bytes_down": 0})
            try:
                if node not in sent:
                    raise ReplyError("reply from a node that was not sent a message this round")
                validate_reply(reply, sent[node], dtype=cfg.federation.transport_dtype, max_bytes=max_bytes)
            except ReplyError as err:
                dropped.append({"node_id": node, "reason": str(err)})
                entry["dropped"] = str(err)
                progress.line(f"round {server_round}/{cfg.rounds}  client {count}/{total}  node {node}  DROPPED: {err}")
                return
            if node not in strategy.node_info and "info" in reply.content.config_records:
                record_node_info(strategy, node, reply.content.config_records["info"], progress, announce_nodes)
            metrics = dict(reply.content["metrics"])
            entry.update({
                "train_loss": float(metrics["train-loss"]),
                "num_examples": int(metrics["num-examples"]),
                "bytes_up": record_bytes(reply.content["arrays"]),
                "seconds": round(float(metrics.get("train-seconds", 0.0)), 4),
                "rank": int(metrics.get("rank", prepared.spec.rank)),
            })
            tasks = {k.split("::", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("num-examples::")}
            if tasks:
                entry["tasks"] = tasks
            valid.append(reply)
            progress.line(
                f"round {server_round}/{cfg.rounds}  client {count}/{total}  node {node}  "
                f"loss {entry['train_loss']:.4f}  examples {entry['num_examples']}  {entry['seconds']:.1f}s"
            )

        replies = _collect(grid, messages, cfg.federation.round_timeout, on_reply)
        for node in sent:
            if not any(r.metadata.src_node_id == node for r in replies):
                dropped.append({"node_id": node, "reason": "no reply before the round timeout"})
                clients[node]["dropped"] = "timeout"
        arrays, agg = strategy.aggregate_train(server_round, valid)
        if arrays is not None:
            state = from_record(arrays)
        for node, facts in strategy.client_report.items():
            clients.setdefault(node, {"node_id": node}).update(facts)
        eval_metrics = evaluate_state(prepared, state, strategy)
        if strategy.personalized:
            shared_eval = {f"global_{k}": v for k, v in eval_metrics.items()}
            eval_metrics = {**federated_evaluate(grid, strategy, state, shared, server_round, clients,
                                                 cfg.federation.round_timeout), **shared_eval}
        record: dict[str, Any] = {
            "round": server_round,
            "strategy": cfg.strategy.name,
            "train_loss": float(agg["train-loss"]) if agg is not None else None,
            **eval_metrics,
            **strategy.round_metrics(),
            "bytes_down": int(sum(c.get("bytes_down", 0) for c in clients.values())),
            "bytes_up": int(sum(c.get("bytes_up", 0) for c in clients.values())),
            "clients_sampled": len(sent),
            "clients_ok": len(valid),
            "clients": [clients[k] for k in sorted(clients)],
            "dropped": dropped,
            "seconds": round(time.perf_counter() - started, 4),
        }
        run_dir.append_metrics(record)
        scalars.round(record, result.initial if server_round == 1 else None)
        run_dir.save_checkpoint(server_round, state, {"strategy": strategy.state_dict(), "initial": result.initial})
        result.rounds.append(record)
        progress.line(
            f"round {server_round}/{cfg.rounds}  global adapter  {_fmt(eval_metrics)}  "
            f"bytes down {record['bytes_down']:,} up {record['bytes_up']:,}  {record['seconds']:.1f}s"
        )

    adapter_dir = run_dir.adapter_dir
    for view in strategy.views(state):
        spec, tensors = fold_base_delta(view.spec, view.state, view.base_delta)
        extra: dict[str, Any] = {}
        if view.name:
            extra = {"task": view.name, "task_label_ids": prepared.data.task_labels.get(view.name, [])}
        with host.lock:
            host.set_base_delta({}, "")
            export_adapter(host, host.ensure(spec, seed=cfg.seed), tensors,
                           adapter_dir / view.name if view.name else adapter_dir, cfg, prepared.data.labels, extra)
    result.adapter_dir = str(adapter_dir)
    run_dir.write_json("summary.json", {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "rounds": cfg.rounds,
        "initial": result.initial,
        "final": {k: v for k, v in result.rounds[-1].items() if k.startswith("eval_")} if result.rounds else {},
        "adapter": "adapter",
    })
    scalars.close()
    return result


def make_server_app(prepared: Prepared, run_dir: RunDirectory, *, progress: Progress | None = None,
                    resume: bool = False, results: list[RunResult] | None = None) -> ServerApp:
    """A Flower ServerApp whose main runs :func:`run_server`; the result lands in ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out = run_server(grid, prepared, run_dir, progress=progress, resume=resume)
        if results is not None:
            results.append(out)

    return app
