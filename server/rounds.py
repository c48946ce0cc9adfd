"""The round loop, in named steps.

:meth:`RoundLoop.run` is the whole run; each round is :meth:`RoundLoop.round`::

    query_new_nodes   nodes not heard from report rank, device, precision, memory, examples,
                      tasks (before round 1: every node of a small federation, the first
                      round's draw of a large one; then, for strategies whose payload depends
                      on it, the round's draw: costs follow the sampled clients)
    configure         strategy.configure_train: one message per sampled node
    collect           push, then pull replies as they arrive (until all are in or the timeout)
    check_reply       validate each against what that node was sent (payload, every metric and
                      info value, the strategy's own check_reply); cap claimed example counts;
                      drop bad ones, named
    aggregate         [robustness] clip each update, then strategy.aggregate_train over the
                      valid replies in sampling order; a non-finite result stops the run
    evaluate          the global state on the server's held-out split (+ for personalized
                      strategies, on the nodes ``[evaluation]`` picks: :mod:`.personal`)
    record            one line in metrics.jsonl, TensorBoard scalars, a progress line
    checkpoint        the global state and the strategy's state, atomically

and after the last round :meth:`RoundLoop.export` writes the peft adapter(s) and summary.json
(a run in which no reply of any round was usable fails instead: it trained nothing).

Each step is a method here; three of them live in modules of their own, which the loop holds:
node bookkeeping (:mod:`.nodes`: the capability query and table, nodes.json, the nodes' state on
resume), reply intake (:mod:`.intake`: pushing, pulling and checking replies) and the start or
resume of a run (:mod:`.resume`). The loop owns the run's bookkeeping (the
:class:`~fedlora.strategies.NodeDirectory` of what nodes reported, the per-round client
entries); the strategy gets what it needs through its constructor and arguments and hands back
what it sent (its messages) and what it computed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedlora.errors import RunFailed
from fedlora.model.adapters import from_record, to_record
from fedlora.run.directory import RunDirectory
from fedlora.run.export import export_views
from fedlora.run.progress import Progress, ScalarLog
from fedlora.strategies import LoRAStrategy, NodeDirectory, create
from fedlora.strategies.robust import clip_states, first_non_finite
from fedlora.wire import protocol as P
from fedlora.wire.transport import Wire

from .evaluation import evaluate_state
from .intake import ReplyIntake, RoundBook, collect
from .nodes import EAGER_QUERY_MAX, NodeBook, capability_table
from .personal import evaluate_on_nodes
from .privacy import CentralDP, PrivacyBook, announce_plan, plan_rows
from .resume import adapter_shape
from .resume import start as resume_start
from .secure_round import SecureRound
from .validation import NODE_GONE

if TYPE_CHECKING:
    from .server_app import Prepared


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    adapter_dir: str = ""
    #: Wall seconds of the run's parts outside its rounds: ``start`` (round 0: the initial
    #: evaluation or the resume, the nodes' capabilities, the DP plan) and ``end`` (the export).
    seconds: dict[str, float] = field(default_factory=dict)


def check_trained(rounds: list[dict[str, Any]]) -> None:
    """RunFailed (exit 1) when not one reply of any round was usable: the adapter is the initial
    one, and a run that trained nothing must not look like a success (a round timeout or reply
    limit too small, a data file no device can use)."""
    if not rounds or any(int(r.get("clients_ok", 0)) > 0 for r in rounds):
        return
    reasons = [d["reason"] for r in rounds for d in r.get("dropped", [])]
    why = f"; e.g. {reasons[-1]}" if reasons else ""
    raise RunFailed(f"no client's reply was usable in any of the {len(rounds)} round(s): nothing was trained{why}")


def fmt_metrics(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("eval_accuracy", "eval_perplexity", "eval_loss") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


class RoundLoop:
    """One federated run over ``grid``.

    Parameters
    ----------
    grid : Grid
        Where the clients are (any runtime).
    prepared : Prepared
        The checked configuration, data, model and adapter shape.
    run_dir : RunDirectory
        Where config, metrics, checkpoints and the adapter go.
    progress : Progress
        Receives one line per client reply and per round.
    announce_nodes : bool
        Print a line per node as it joins (a deployment's real devices; not hundreds of
        simulated ones).
    """

    def __init__(
        self, grid: Grid, prepared: Prepared, run_dir: RunDirectory, progress: Progress, announce_nodes: bool = False
    ) -> None:
        self.grid = grid
        self.prepared = prepared
        self.cfg = prepared.cfg
        self.run_dir = run_dir
        self.progress = progress
        self.announce_nodes = announce_nodes
        self.nodes = NodeDirectory()
        self.strategy: LoRAStrategy = create(
            self.cfg, prepared.spec, tasks=list(prepared.data.tasks or []), nodes=self.nodes
        )
        #: ConfigRecord entries every message carries: the run, its classes and tasks.
        self.shared = {
            P.RUN: self.cfg.to_json(),
            P.LABELS: json.dumps(prepared.data.labels),
            P.RUN_TASKS: json.dumps(list(prepared.data.tasks)),
        }
        #: Names this run (not its config: a new run of the same preset is another run) for what
        #: devices save of it on disk; made at the start, restored on ``--resume``.
        self.run_uid = uuid.uuid4().hex
        self.wire = Wire(self.cfg.federation.transport_dtype, self.cfg.federation.transport_quantize)
        #: User-level DP around the strategy's aggregation (``privacy.mode = "central"``).
        self.central = CentralDP(self.cfg, self.strategy) if self.cfg.privacy.mode == "central" else None
        #: Secure aggregation (``[secure_aggregation]``): collect, check and aggregate are its stages.
        self.secure = (
            SecureRound(self.cfg, grid, self.strategy, progress, self.central)
            if self.cfg.secure_aggregation.enabled
            else None
        )
        self.privacy = PrivacyBook(self.cfg)
        self.scalars: ScalarLog | None = None
        timeout = self.cfg.federation.round_timeout
        self.node_book = NodeBook(self.nodes, grid, run_dir, progress, self.shared, timeout, announce_nodes)
        self.intake = ReplyIntake(
            self.cfg, prepared.spec.rank, self.strategy, self.node_book, self.wire, self.privacy, progress
        )

    # -- the run -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> RunResult:
        """Every configured round, then the export."""
        began = time.perf_counter()
        state, result, first = self.start(resume)
        self.shared[P.RUN_UID] = self.run_uid  # made or restored by start(): names what devices save
        self.query_first(first)
        for line in capability_table(self.nodes.all(), len(self.grid.get_node_ids())):
            self.progress.line(line)
        if self.cfg.privacy.enabled:  # the DP plan, printed and recorded before round 1
            rows = plan_rows(self.cfg, self.nodes.all(), lambda node: self.strategy.payload(node, state))
            announce_plan(self.cfg, rows, self.run_dir.path, self.progress.line)
        self.scalars = ScalarLog(self.run_dir.path)
        result.seconds["start"] = round(time.perf_counter() - began, 4)
        try:
            for server_round in range(first, self.cfg.rounds + 1):
                state = self.round(server_round, state, result)
            check_trained(result.rounds)
            began = time.perf_counter()
            self.export(state, result)
            result.seconds["end"] = round(time.perf_counter() - began, 4)
        finally:
            self.scalars.close()
        return result

    def start(self, resume: bool) -> tuple[dict[str, torch.Tensor], RunResult, int]:
        """(global state, result so far, first round to run): :func:`~fedlora.server.resume.start`."""
        return resume_start(self, resume)

    def round(self, server_round: int, state: dict[str, torch.Tensor], result: RunResult) -> dict[str, torch.Tensor]:
        """One round, step by step; returns the new global state."""
        started = time.perf_counter()
        if self.strategy.needs_node_info:  # its payloads depend on it: ask the drawn nodes first
            self.query_new_nodes(self.strategy.draw(self.grid, server_round))
        messages = self.configure(server_round, state)
        book = RoundBook.of(messages, dict(self.strategy.sent))
        if self.secure is not None:  # SecAgg+'s stages: the strategy sees the survivors' sum alone
            state, train_loss = self.secure.aggregate(server_round, messages, book, state)
        else:
            self.collect_train(server_round, messages, book)
            state, train_loss = self.aggregate(server_round, state, book)
        eval_metrics = self.evaluate(server_round, state, book)
        record = self.record(server_round, book, train_loss, eval_metrics, started, result)
        self.checkpoint(server_round, state, result)
        result.rounds.append(record)
        return state

    # -- the steps -----------------------------------------------------------------------------

    def collect_train(self, server_round: int, messages: list[Message], book: RoundBook) -> None:
        """Push the train messages, check each reply as it comes, drop the nodes that never reply."""
        gone: set[int] = set()
        replies = collect(
            self.grid,
            messages,
            self.cfg.federation.round_timeout,
            lambda reply, count, total: self.check_reply(server_round, reply, count, total, book),
            gone=gone,
        )
        self.node_book.save()  # late joiners report with their first reply
        replied = {r.metadata.src_node_id for r in replies}
        for node in book.sent:
            if node in gone:
                book.drop(node, NODE_GONE, short="gone")
                self.strategy.chain.forget(node)
                self.progress.line(f"round {server_round}/{self.cfg.rounds}  node {node}  DROPPED: {NODE_GONE}")
            elif node not in replied:
                book.drop(node, "no reply before the round timeout", short="timeout")

    def query_first(self, first: int) -> None:
        """Before the first round: what every node of a small federation has (the table and the DP
        plan cover them all), or, beyond :data:`~fedlora.server.nodes.EAGER_QUERY_MAX` nodes, what
        the first round's drawn nodes have; the others report when they are sampled."""
        if len(self.grid.get_node_ids()) <= EAGER_QUERY_MAX:
            self.query_new_nodes()
        elif first <= self.cfg.rounds:
            self.query_new_nodes(self.strategy.draw(self.grid, first))

    def query_new_nodes(self, nodes: Iterable[int] | None = None) -> None:
        """Ask the nodes (of ``nodes``; default every node) that have not reported what they have
        (:meth:`NodeBook.query_new`)."""
        self.node_book.query_new(nodes)

    def record_node(self, node: int, info: ConfigRecord) -> None:
        """Keep what ``node`` says it has (:meth:`NodeBook.record`)."""
        self.node_book.record(node, info)

    def configure(self, server_round: int, state: dict[str, torch.Tensor]) -> list[Message]:
        """The strategy's train messages for this round."""
        return list(
            self.strategy.configure_train(server_round, to_record(state), ConfigRecord(dict(self.shared)), self.grid)
        )

    def check_reply(self, server_round: int, reply: Message, count: int, total: int, book: RoundBook) -> None:
        """Validate one reply against what its node was sent; keep it, or drop it and say why
        (:meth:`ReplyIntake.check`)."""
        self.intake.check(server_round, reply, count, total, book)

    def cap_examples(self, node: int, reply: Message, metrics: dict[str, Any], entry: dict[str, Any]) -> int | None:
        """Cap the example counts ``reply`` claims (:meth:`ReplyIntake.cap_examples`)."""
        return self.intake.cap_examples(node, reply, metrics, entry)

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], book: RoundBook
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """(new global state, example-weighted train loss); the state is unchanged when no reply is valid.

        Replies are aggregated in the order their nodes were sampled, not the order they came
        in: float sums depend on order, and a run must give the same adapter however its
        clients' replies race (concurrent devices, a deployment's network).
        """
        order = {node: i for i, node in enumerate(book.sent)}
        book.valid.sort(key=lambda reply: order.get(reply.metadata.src_node_id, len(order)))
        for node, facts in self.clip(server_round, book).items():
            book.entry(node).update(facts)
        if self.central is not None:
            population = len(self.grid.get_node_ids())
            arrays, agg, dp_facts = self.central.aggregate_train(server_round, book.valid, book.reference, population)
        else:
            arrays, agg = self.strategy.aggregate_train(server_round, book.valid)
            dp_facts = {}
        if arrays is not None:
            state = from_record(arrays)
            # A non-finite global would be sent to every node, whose replies validation then drops
            # as non-finite, round after round: stop now, before it is checkpointed.
            bad = first_non_finite(state)
            if bad is not None:
                raise RunFailed(
                    f"round {server_round}/{self.cfg.rounds}: the aggregated global adapter is not finite "
                    f"(tensor {bad}); the run stopped, the last good checkpoint is kept"
                )
        for node, facts in self.strategy.client_facts().items():
            book.entry(node).update(facts)
        for node, facts in dp_facts.items():
            book.entry(node).update(facts)
        return state, (float(agg[P.TRAIN_LOSS]) if agg is not None else None)

    def clip(self, server_round: int, book: RoundBook) -> dict[int, dict[str, Any]]:
        """Clip every valid reply's update to ``robustness.update_clip``'s bound before any strategy
        (or central DP) sees it: a clipped reply's tensors become what it was sent plus the clipped
        update. Returns per-node facts (the update's norm, whether it was clipped)."""
        rob = self.cfg.robustness
        if rob.update_clip == "none" or not book.valid:
            return {}
        nodes = [reply.metadata.src_node_id for reply in book.valid]
        states = [from_record(reply.content[P.ARRAYS]) for reply in book.valid]
        clipped, norms, bound = clip_states(
            states,
            [book.reference.get(node, {}) for node in nodes],
            mode=rob.update_clip,
            multiple=rob.clip_multiple,
            fixed=rob.clip_norm,
        )
        facts: dict[int, dict[str, Any]] = {}
        for reply, node, new, norm in zip(book.valid, nodes, clipped, norms):
            cut = bound is not None and norm > bound
            facts[node] = {"robust_update_norm": round(norm, 6), "robust_clipped": cut}
            if cut:
                reply.content[P.ARRAYS] = to_record(new)
                self.progress.line(
                    f"round {server_round}/{self.cfg.rounds}  node {node}  update norm {norm:.4g} clipped to "
                    f"{bound:.4g} (robustness.update_clip = {rob.update_clip})"
                )
        return facts

    def evaluate(self, server_round: int, state: dict[str, torch.Tensor], book: RoundBook) -> dict[str, float]:
        """The global state on the server's split; for personalized strategies, the nodes' own
        models on their own data (``eval_*``) beside the shared part (``global_eval_*``)."""
        metrics = evaluate_state(self.prepared, state, self.strategy)
        if not self.strategy.personalized:
            return metrics
        shared = {f"global_{k}": v for k, v in metrics.items()}
        return {**self.evaluate_on_nodes(server_round, state, book), **shared}

    def evaluate_on_nodes(self, server_round: int, state: dict[str, torch.Tensor], book: RoundBook) -> dict[str, float]:
        """The nodes ``[evaluation]`` picks evaluate their own model (:func:`.personal.evaluate_on_nodes`)."""
        return evaluate_on_nodes(self, server_round, state, book)

    def record(
        self,
        server_round: int,
        book: RoundBook,
        train_loss: float | None,
        eval_metrics: dict[str, float],
        started: float,
        result: RunResult,
    ) -> dict[str, Any]:
        """metrics.jsonl's line for this round (also to TensorBoard and the progress output)."""
        clients = book.clients
        record: dict[str, Any] = {
            "round": server_round,
            "strategy": self.cfg.strategy.name,
            "train_loss": train_loss,
            **eval_metrics,
            **self.strategy.round_metrics(),
            **self.privacy.round_fields(self.central),
            **(self.secure.round_fields() if self.secure is not None else {}),
            "bytes_down": int(sum(c.get("bytes_down", 0) for c in clients.values())),
            "bytes_up": int(sum(c.get("bytes_up", 0) for c in clients.values())),
            "clients_sampled": len(book.sent),
            "clients_ok": len(book.valid),
            "clients": [clients[k] for k in sorted(clients)],
            "dropped": book.dropped,
            "seconds": round(time.perf_counter() - started, 4),
        }
        self.run_dir.append_metrics(record)
        if self.scalars is not None:
            self.scalars.round(record, result.initial if server_round == 1 else None)
        self.progress.line(
            f"round {server_round}/{self.cfg.rounds}  global adapter  {fmt_metrics(eval_metrics)}  "
            f"bytes down {record['bytes_down']:,} up {record['bytes_up']:,}  {record['seconds']:.1f}s"
        )
        return record

    def checkpoint(self, server_round: int, state: dict[str, torch.Tensor], result: RunResult) -> None:
        """The round's global state and strategy state, written atomically (``--resume`` reads it)."""
        extra: dict[str, Any] = {
            "strategy": self.strategy.state_dict(),
            "initial": result.initial,
            "privacy": self.privacy.state_dict(),
            "adapter": adapter_shape(self.cfg),
            "run_uid": self.run_uid,
        }
        if self.central is not None:
            extra["central_dp"] = self.central.state_dict()
        # The nodes' own state (FedSA's private B, HetLoRA's pruning, error-feedback residuals,
        # privacy ledgers) where the grid holds it in this process: the in-process simulation.
        # Only the nodes served since the last checkpoint: the files of rounds 1..k hold them all.
        node_states = getattr(self.grid, "node_states", None)
        self.run_dir.save_checkpoint(
            server_round,
            state,
            extra,
            nodes=node_states() if node_states else None,
            server=self.strategy.tensor_state(),
        )
        if node_states:  # on disk now: those nodes leave memory until they are sampled again
            self.grid.node_states_saved(self.run_dir.node_state_path(server_round))

    def export(self, state: dict[str, torch.Tensor], result: RunResult) -> None:
        """The final adapter(s) in peft's format (base deltas folded in) and summary.json."""
        cfg, prepared = self.cfg, self.prepared
        adapter_dir = self.run_dir.adapter_dir
        views = self.strategy.views(state)
        export_views(prepared.host, views, adapter_dir, cfg, prepared.data.labels, prepared.data.task_labels)
        result.adapter_dir = str(adapter_dir)
        self.run_dir.write_json(
            "summary.json",
            {
                "name": cfg.name,
                "strategy": cfg.strategy.name,
                "rounds": cfg.rounds,
                "initial": result.initial,
                "final": {k: v for k, v in result.rounds[-1].items() if k.startswith("eval_")} if result.rounds else {},
                "adapter": "adapter",
                **({"privacy": result.rounds[-1].get("privacy")} if result.rounds and self.cfg.privacy.enabled else {}),
            },
        )
