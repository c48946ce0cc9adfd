"""The fedlora ServerApp: round loop, reply validation, evaluation, checkpoints, export.

The same loop runs under every runtime (in-process Grid, Flower's Ray simulation, the
deployment engine): it talks to clients only through the ``Grid`` it is handed.

One round:

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
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlora.adapters import AdapterHost, AdapterSpec, from_record, get_host, record_bytes, to_record
from fedlora.config import RunConfig
from fedlora.data import Encoded, TaskData, encode, load_partition, load_task_data, partition_sizes_ok
from fedlora.errors import DataError
from fedlora.export import export_adapter
from fedlora.models import LoadedModel, load_model
from fedlora.runlog import Progress, RunDirectory
from fedlora.strategies import LoRAStrategy, create
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

    get_strategy_class(cfg.strategy.name)._parse_options(cfg.strategy.options)
    data = load_task_data(cfg)
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
    get_host(loaded).ensure(spec, seed=cfg.seed)
    create(cfg, spec)  # strategy-specific checks against the spec
    eval_data = encode(data.eval, loaded.tokenizer, cfg.model.max_length)
    return Prepared(cfg=cfg, data=data, loaded=loaded, spec=spec, eval_data=eval_data)


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    adapter_dir: str = ""


def evaluate_state(prepared: Prepared, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Server-side evaluation of a global adapter state on the held-out split."""
    host = prepared.host
    with host.lock:
        name = host.ensure(prepared.spec, seed=prepared.cfg.seed)
        host.load_state(name, state)
        return evaluate(
            host.peft_model,
            prepared.eval_data,
            batch_size=max(prepared.cfg.federation.batch_size, 32),
            pad_id=prepared.loaded.tokenizer.pad_token_id,
            causal=prepared.cfg.model.task == "causal_lm",
        )


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
               resume: bool = False) -> RunResult:
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
    """
    cfg = prepared.cfg
    progress = progress or Progress()
    host = prepared.host
    strategy: LoRAStrategy = create(cfg, prepared.spec)
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        initial_state = host.initial_state(name, cfg.seed)
    state = strategy.initialize(initial_state)
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
        result.initial = evaluate_state(prepared, state)
        progress.line(f"round 0/{cfg.rounds}  initial global adapter  {_fmt(result.initial)}")

    shared = {"run": cfg.to_json(), "labels": json.dumps(prepared.data.labels)}
    max_bytes = int(cfg.federation.max_reply_mb * 1024 * 1024)
    for server_round in range(start_round, cfg.rounds + 1):
        started = time.perf_counter()
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
            metrics = dict(reply.content["metrics"])
            entry.update({
                "train_loss": float(metrics["train-loss"]),
                "num_examples": int(metrics["num-examples"]),
                "bytes_up": record_bytes(reply.content["arrays"]),
                "seconds": round(float(metrics.get("train-seconds", 0.0)), 4),
                "rank": int(metrics.get("rank", prepared.spec.rank)),
            })
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
        eval_metrics = evaluate_state(prepared, state)
        record: dict[str, Any] = {
            "round": server_round,
            "strategy": cfg.strategy.name,
            "train_loss": float(agg["train-loss"]) if agg is not None else None,
            **eval_metrics,
            "bytes_down": int(sum(c.get("bytes_down", 0) for c in clients.values())),
            "bytes_up": int(sum(c.get("bytes_up", 0) for c in clients.values())),
            "clients_sampled": len(sent),
            "clients_ok": len(valid),
            "clients": [clients[k] for k in sorted(clients)],
            "dropped": dropped,
            "seconds": round(time.perf_counter() - started, 4),
        }
        run_dir.append_metrics(record)
        run_dir.save_checkpoint(server_round, state, {"strategy": strategy.state_dict(), "initial": result.initial})
        result.rounds.append(record)
        progress.line(
            f"round {server_round}/{cfg.rounds}  global adapter  {_fmt(eval_metrics)}  "
            f"bytes down {record['bytes_down']:,} up {record['bytes_up']:,}  {record['seconds']:.1f}s"
        )

    adapter_dir = export_adapter(host, host.ensure(prepared.spec, seed=cfg.seed), state, run_dir.adapter_dir,
                                 cfg, prepared.data.labels)
    result.adapter_dir = str(adapter_dir)
    run_dir.write_json("summary.json", {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "rounds": cfg.rounds,
        "initial": result.initial,
        "final": {k: v for k, v in result.rounds[-1].items() if k.startswith("eval_")} if result.rounds else {},
        "adapter": "adapter",
    })
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
