"""The round loop, in named steps.

:meth:`RoundLoop.run` is the whole run; each round is :meth:`RoundLoop.round`::

    query_new_nodes   nodes not heard from report rank, device, precision, memory, examples,
                      tasks (all nodes once before round 1: the capability table, nodes.json;
                      later only for strategies whose payload depends on it)
    configure         strategy.configure_train: one message per sampled node
    collect           push, then pull replies as they arrive (until all are in or the timeout)
    check_reply       validate each against what that node was sent (payload, every metric and
                      info value, the strategy's own check_reply); cap claimed example counts;
                      drop bad ones, named
    aggregate         [robustness] clip each update, then strategy.aggregate_train over the
                      valid replies in sampling order; a non-finite result stops the run
    evaluate          the global state on the server's held-out split (+ on the nodes for
                      personalized strategies)
    record            one line in metrics.jsonl, TensorBoard scalars, a progress line
    checkpoint        the global state and the strategy's state, atomically

and after the last round :meth:`RoundLoop.export` writes the peft adapter(s) and summary.json
(a run in which no reply of any round was usable fails instead: it trained nothing).

The loop owns the run's bookkeeping (the :class:`~fedlora.strategies.NodeDirectory` of what
nodes reported, the per-round client entries); the strategy gets what it needs through its
constructor and arguments and hands back what it sent (its messages) and what it computed.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Array, ConfigRecord, Message, MessageType, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedlora import protocol as P
from fedlora.adapters import from_record, to_record
from fedlora.errors import FedLoraError, RunFailed
from fedlora.export import export_adapter, fold_base_delta
from fedlora.runlog import Progress, RunDirectory, ScalarLog
from fedlora.strategies import LoRAStrategy, NodeDirectory, NodeInfo, create
from fedlora.strategies.robust import clip_states, first_non_finite
from fedlora.transport import Wire, arrays_of, decode_update, message_bytes

from .evaluation import evaluate_state
from .privacy import CentralDP, PrivacyBook
from .validation import (
    NODE_GONE,
    ReplyError,
    budget_stop_epsilons,
    check_eval_metrics,
    check_info,
    error_text,
    example_cap,
    validate_reply,
)

if TYPE_CHECKING:
    from .server_app import Prepared

PULL_INTERVAL_S = 0.2
#: How often a round checks that the nodes it waits for are still in the federation.
ROLL_CALL_S = 2.0


@dataclass
class RunResult:
    """What a finished run reports back to the CLI."""

    run_dir: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    adapter_dir: str = ""


@dataclass
class RoundBook:
    """What happened to each node this round.

    Attributes
    ----------
    sent : dict of int to dict
        What each sampled node was sent (the arrays of its message, unpacked once per distinct
        payload: replies are validated against them).
    reference : dict of int to dict
        The same, float32 and base change aside (what a node's upload is relative to on a
        lossy wire, and what central DP measures its update against).
    clients : dict of int to dict
        metrics.jsonl's entry per node (bytes, loss, examples, seconds, rank, why dropped).
    valid : list of Message
        The replies that passed validation (in arrival order; sampling order once aggregated).
    dropped : list of dict
        ``{"node_id", "reason"}`` per dropped reply or missing node.
    """

    sent: dict[int, dict[str, Array]]
    reference: dict[int, dict[str, torch.Tensor]]
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    valid: list[Message] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, messages: list[Message], reference: dict[int, dict[str, torch.Tensor]]) -> RoundBook:
        """The book of a round whose train ``messages`` were built from ``reference``; each node's
        ``bytes_down`` is what Flower moves for its message."""
        unpacked: dict[int, dict[str, Array]] = {}  # nodes sent the very same record share its arrays
        sent = {}
        for m in messages:
            record = m.content[P.ARRAYS]
            if id(record) not in unpacked:
                unpacked[id(record)] = arrays_of(record)
            sent[m.metadata.dst_node_id] = unpacked[id(record)]
        book = cls(sent=sent, reference=reference)
        for m in messages:
            book.clients[m.metadata.dst_node_id] = {"node_id": m.metadata.dst_node_id, "bytes_down": message_bytes(m)}
        return book

    def entry(self, node: int) -> dict[str, Any]:
        return self.clients.setdefault(node, {"node_id": node, "bytes_down": 0})

    def drop(self, node: int, reason: str, short: str | None = None) -> None:
        self.dropped.append({"node_id": node, "reason": reason})
        self.entry(node)["dropped"] = short or reason


def collect(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    on_reply: Callable[[Message, int, int], None] | None = None,
    gone: set[int] | None = None,
) -> list[Message]:
    """Push ``messages`` and pull replies as they arrive, until all are in or ``timeout``.

    A reply the SuperLink writes on a node's behalf (the node stopped sending heartbeats, its
    message was withdrawn) comes from the SuperLink's own id; it is returned as coming from the
    node it concerns, so the round names that node instead of "a node that was not sent a
    message". A node that leaves the federation while its reply is awaited (Flower stops
    listing it once its heartbeats stop) is not waited for until the timeout: it is added to
    ``gone`` (when given) and the round goes on without it.
    """
    pushed = grid.push_messages(messages)
    owner = {i: m.metadata.dst_node_id for i, m in zip(pushed, messages) if i}
    pending = dict.fromkeys(owner)  # ordered: the in-process grid delivers in sampling order
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    next_roll_call = time.monotonic() + ROLL_CALL_S
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending)))
        for reply in got:
            asked = reply.metadata.reply_to_message_id
            if asked in pending:
                del pending[asked]
                reply = on_behalf_of(reply, owner[asked])
                replies.append(reply)
                if on_reply is not None:
                    on_reply(reply, len(replies), len(owner))
        if gone is not None and pending and time.monotonic() >= next_roll_call:
            next_roll_call = time.monotonic() + ROLL_CALL_S
            online = set(grid.get_node_ids())
            for asked in [a for a in pending if owner[a] not in online]:
                del pending[asked]
                gone.add(owner[asked])
        if not got:
            time.sleep(PULL_INTERVAL_S)
    return replies


def on_behalf_of(reply: Message, node: int) -> Message:
    """``reply`` as coming from ``node`` when the SuperLink wrote it for that node (an error reply
    from :data:`SUPERLINK_NODE_ID`); any other reply unchanged."""
    md = reply.metadata
    if md.src_node_id != SUPERLINK_NODE_ID or not reply.has_error():
        return reply
    return make_message(
        metadata=Metadata(
            run_id=md.run_id,
            message_id=md.message_id,
            src_node_id=node,
            dst_node_id=md.dst_node_id,
            reply_to_message_id=md.reply_to_message_id,
            group_id=md.group_id,
            created_at=md.created_at,
            ttl=md.ttl,
            message_type=md.message_type,
        ),
        error=reply.error,
    )


NODES_FILE = "nodes.json"
#: Rows of the capability table printed at the start of a run (all of them are in nodes.json).
TABLE_ROWS = 16


def describe_node(node: NodeInfo) -> str:
    """One node's capabilities in a line (``node N joined: ...`` on a deployment)."""
    return (
        f"rank {node.rank}{_auto(node, 'rank')}, {node.quantization}{_auto(node, 'quantization')} {node.dtype} "
        f"on {node.device}, {node.memory_gb:g} GB, {node.num_examples} examples"
    )


def _auto(node: NodeInfo, what: str) -> str:
    """`` (auto)`` when the node chose ``what`` itself from its free memory."""
    return " (auto)" if what in str(node.chosen.get("auto", "")).split(",") else ""


def capability_table(nodes: list[NodeInfo]) -> list[str]:
    """The lines of the table of the nodes' capabilities printed at the start of a run: one row
    per node (the first :data:`TABLE_ROWS`), ``auto`` marking what a device chose by itself."""
    if not nodes:
        return []
    header = ("node", "device", "precision", "dtype", "rank", "memory GB", "examples")
    rows = [
        (
            str(n.node_id),
            n.device,
            n.quantization + _auto(n, "quantization"),
            n.dtype,
            str(n.rank) + _auto(n, "rank"),
            f"{n.memory_gb:g}",
            str(n.num_examples),
        )
        for n in nodes[:TABLE_ROWS]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"{len(nodes)} node(s):"] + [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]
    ]
    if len(nodes) > TABLE_ROWS:
        lines.append(f"  ... and {len(nodes) - TABLE_ROWS} more (see {NODES_FILE})")
    return lines


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
        self._nodes_saved = 0  # nodes in nodes.json
        self.max_reply_bytes = int(self.cfg.federation.max_reply_mb * 1024 * 1024)
        self.wire = Wire(self.cfg.federation.transport_dtype, self.cfg.federation.transport_quantize)
        #: User-level DP around the strategy's aggregation (``privacy.mode = "central"``).
        self.central = CentralDP(self.cfg, self.strategy) if self.cfg.privacy.mode == "central" else None
        self.privacy = PrivacyBook(self.cfg)
        self.scalars: ScalarLog | None = None

    # -- the run -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> RunResult:
        """Every configured round, then the export."""
        state, result, first = self.start(resume)
        self.shared[P.RUN_UID] = self.run_uid  # made or restored by start(): names what devices save
        self.query_new_nodes()  # what every node has, printed and kept before the first round
        for line in capability_table(self.nodes.all()):
            self.progress.line(line)
        self.scalars = ScalarLog(self.run_dir.path)
        try:
            for server_round in range(first, self.cfg.rounds + 1):
                state = self.round(server_round, state, result)
            check_trained(result.rounds)
            self.export(state, result)
        finally:
            self.scalars.close()
        return result

    def start(self, resume: bool) -> tuple[dict[str, torch.Tensor], RunResult, int]:
        """(global state, result so far, first round to run): the strategy's round-0 adapter
        (evaluated, config written), or the latest checkpoint when resuming."""
        cfg, host = self.cfg, self.prepared.host
        with host.lock:
            name = host.ensure(self.prepared.spec, seed=cfg.seed)
            initial_state = host.initial_state(name, cfg.seed)
        state = self.strategy.initialize(initial_state, host)
        result = RunResult(run_dir=str(self.run_dir.path))
        if resume and self.run_dir.latest_checkpoint_round() is None:
            self.progress.line(f"--resume: no round of {cfg.name} was completed before it stopped; starting at round 1")
            self.run_dir.truncate_metrics(0)
            resume = False
        if resume:
            ckpt = self.run_dir.load_round(report=self.progress.line)
            last, extra = ckpt.round, ckpt.extra
            if cfg.rounds < last:
                raise FedLoraError(f"--resume: rounds = {cfg.rounds} but the run has already done {last} rounds")
            self.check_adapter_shape(extra.get("adapter"), ckpt.state, state)
            state = ckpt.state
            self.restore_nodes(ckpt.nodes)
            self.run_uid = str(extra.get("run_uid", self.run_uid))  # a device's saved state is this run's
            self.run_dir.write_config(cfg)  # `rounds` may have been extended: config.toml says what runs
            self.strategy.load_state_dict(extra.get("strategy", {}))
            self.strategy.load_tensor_state(ckpt.server or {})
            self.privacy.load_state_dict(extra.get("privacy", {}))
            if self.central is not None:
                self.central.load_state_dict(extra.get("central_dp", {}))
            self.run_dir.truncate_metrics(last)
            result.rounds = self.run_dir.read_metrics()
            result.initial = extra.get("initial", {})
            self.progress.line(f"resuming {cfg.name} after round {last}/{cfg.rounds}")
            return state, result, last + 1
        self.run_dir.write_config(cfg)
        result.initial = evaluate_state(self.prepared, state, self.strategy)
        self.progress.line(f"round 0/{cfg.rounds}  initial global adapter  {fmt_metrics(result.initial)}")
        return state, result, 1

    def round(self, server_round: int, state: dict[str, torch.Tensor], result: RunResult) -> dict[str, torch.Tensor]:
        """One round, step by step; returns the new global state."""
        started = time.perf_counter()
        if self.strategy.needs_node_info:
            self.query_new_nodes()
        messages = self.configure(server_round, state)
        book = RoundBook.of(messages, dict(self.strategy.sent))
        gone: set[int] = set()
        replies = collect(
            self.grid,
            messages,
            self.cfg.federation.round_timeout,
            lambda reply, count, total: self.check_reply(server_round, reply, count, total, book),
            gone=gone,
        )
        self.save_nodes()  # late joiners report with their first reply
        replied = {r.metadata.src_node_id for r in replies}
        for node in book.sent:
            if node in gone:
                book.drop(node, NODE_GONE, short="gone")
                self.strategy.chain.forget(node)
                self.progress.line(f"round {server_round}/{self.cfg.rounds}  node {node}  DROPPED: {NODE_GONE}")
            elif node not in replied:
                book.drop(node, "no reply before the round timeout", short="timeout")
        state, train_loss = self.aggregate(server_round, state, book)
        eval_metrics = self.evaluate(server_round, state, book)
        record = self.record(server_round, book, train_loss, eval_metrics, started, result)
        self.checkpoint(server_round, state, result)
        result.rounds.append(record)
        return state

    # -- the steps -----------------------------------------------------------------------------

    def query_new_nodes(self) -> None:
        """Ask nodes that have not reported what they have; record it in the node directory.

        A node that cannot answer (its data does not fit the run, say) is reported and asked
        again next round; the round goes on with the others.
        """
        unknown = self.nodes.unknown(self.grid.get_node_ids())
        if not unknown:
            return
        messages = [
            Message(
                content=RecordDict({P.CONFIG: ConfigRecord(dict(self.shared))}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
                group_id="query",
            )
            for node in unknown
        ]
        for reply in collect(self.grid, messages, self.cfg.federation.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or P.INFO not in reply.content.config_records:
                reason = error_text(reply) if reply.has_error() else "no capability record"
                self.progress.line(f"node {node} could not report its capabilities: {reason}")
                continue
            info = reply.content.config_records[P.INFO]
            try:
                check_info(node, info)
            except ReplyError as err:  # ignored, named; the node is asked again next round
                self.progress.line(f"node {node} sent malformed capabilities (ignored): {err}")
                continue
            self.record_node(node, info)
        self.save_nodes()

    def record_node(self, node: int, info: ConfigRecord) -> None:
        """Keep what ``node`` says it has (a malformed record is ignored) in the directory;
        announce it if asked. :meth:`save_nodes` writes the directory out."""
        got = self.nodes.record(node, info)
        if got is not None and self.announce_nodes:
            self.progress.line(f"node {node} joined: {describe_node(got)}")

    def save_nodes(self) -> None:
        """Write every node's report to the run directory's nodes.json when nodes joined since the
        last write (once per query or round, not once per node: a run starts with all its nodes)."""
        if len(self.nodes) != self._nodes_saved:
            self.run_dir.write_json(NODES_FILE, [dataclasses.asdict(n) for n in self.nodes.all()])
            self._nodes_saved = len(self.nodes)

    def configure(self, server_round: int, state: dict[str, torch.Tensor]) -> list[Message]:
        """The strategy's train messages for this round."""
        return list(
            self.strategy.configure_train(server_round, to_record(state), ConfigRecord(dict(self.shared)), self.grid)
        )

    def check_reply(self, server_round: int, reply: Message, count: int, total: int, book: RoundBook) -> None:
        """Validate one reply against what its node was sent; keep it, or drop it and say why."""
        node = reply.metadata.src_node_id
        entry = book.entry(node)
        where = f"round {server_round}/{self.cfg.rounds}  client {count}/{total}  node {node}"
        if node in book.sent and self.budget_stopped(reply, entry, where):
            return
        try:
            if node not in book.sent:
                raise ReplyError("reply from a node that was not sent a message this round")
            decoded = validate_reply(
                reply,
                book.sent[node],
                wire=self.wire,
                max_bytes=self.max_reply_bytes,
                epsilon=self.cfg.privacy.mode == "local",
            )
            info = reply.content.config_records.get(P.INFO)
            reported = check_info(node, info) if info is not None else None
            metrics = dict(reply.content[P.METRICS])
            try:
                self.strategy.check_reply(node, metrics, decoded)  # what only this strategy reads
            except ValueError as err:  # a strategy's one-line reason, dropped like the server's own
                raise ReplyError(str(err)) from None
        except ReplyError as err:
            book.drop(node, str(err))
            self.strategy.chain.forget(node)  # what it holds is unknown: the whole base next time
            self.progress.line(f"{where}  DROPPED: {err}")
            return
        capped = self.cap_examples(node, reply, metrics, entry)
        if node not in self.nodes and reported is not None:
            self.record_node(node, info)
        self.strategy.chain.ack(node, info.get(P.INFO_BASE_DIGEST) if info is not None else None)
        bytes_up = message_bytes(reply)
        # From here on the reply holds what the node trained, float32 (on a lossy wire the node
        # sent what changed since what it was sent; it is added to the float32 tensors it was sent).
        reply.content[P.ARRAYS] = to_record(decode_update(decoded, book.reference.get(node, {}), self.wire))
        entry.update(
            {
                "train_loss": float(metrics[P.TRAIN_LOSS]),
                "num_examples": int(metrics[P.NUM_EXAMPLES]),
                "bytes_up": bytes_up,
                "seconds": round(float(metrics.get(P.TRAIN_SECONDS, 0.0)), 4),
                "rank": int(metrics.get(P.RANK, self.prepared.spec.rank)),
            }
        )
        tasks = {task: int(v) for task, v in P.task_metrics(metrics, P.NUM_EXAMPLES).items()}
        if tasks:
            entry["tasks"] = tasks
        if self.cfg.privacy.mode == "local":
            entry["epsilon"] = self.privacy.node_epsilon[node] = float(metrics[P.EPSILON])
        book.valid.append(reply)
        eps = f"  epsilon {entry['epsilon']:.4g}" if "epsilon" in entry else ""
        self.progress.line(
            f"{where}  loss {entry['train_loss']:.4f}  examples {entry['num_examples']}  {entry['seconds']:.1f}s{eps}"
            + (f"  (capped from {capped:,})" if capped is not None else "")
        )

    def cap_examples(self, node: int, reply: Message, metrics: dict[str, Any], entry: dict[str, Any]) -> int | None:
        """Cap the example counts ``reply`` claims (``metrics`` and the reply's own record, which
        the strategy reads) at :func:`example_cap`, so no node owns the aggregate by claiming
        more than it has; the entry records what was claimed. Returns the claimed total when it
        was capped, else None."""
        limit = self.cfg.robustness.max_examples
        known = self.nodes.get(node)  # what the node reported before this reply, if it did
        record = reply.content[P.METRICS]
        claimed = int(metrics[P.NUM_EXAMPLES])
        cap = example_cap(limit, known.num_examples if known is not None else None)
        over = None
        if claimed > cap:
            metrics[P.NUM_EXAMPLES] = record[P.NUM_EXAMPLES] = cap
            entry["examples_capped_from"] = over = claimed
        for task, value in P.task_metrics(dict(metrics), P.NUM_EXAMPLES).items():
            task_cap = example_cap(limit, known.tasks.get(task) if known is not None else None)
            if int(value) > task_cap:
                key = P.task_metric(P.NUM_EXAMPLES, task)
                metrics[key] = record[key] = task_cap
                entry.setdefault("task_examples_capped_from", {})[task] = int(value)
        return over

    def budget_stopped(self, reply: Message, entry: dict[str, Any], where: str) -> bool:
        """Whether ``reply`` says its node's privacy budget would be exceeded (it trained nothing);
        the entry then says so and the round goes on without it."""
        if reply.has_error() or P.METRICS not in reply.content.metric_records:
            return False
        metrics = dict(reply.content.metric_records[P.METRICS])
        if not metrics.get(P.BUDGET_STOP) or self.cfg.privacy.mode != "local":
            return False
        epsilons = budget_stop_epsilons(metrics)
        if epsilons is None:
            return False  # malformed: validation drops it
        spent, reached = epsilons
        budget = self.cfg.privacy.budget
        entry["stopped"] = (
            f"privacy budget: epsilon {spent:.4g} spent, this round would reach {reached:.4g} > {budget:g}"
        )
        entry["epsilon"] = self.privacy.node_epsilon[reply.metadata.src_node_id] = spent
        self.progress.line(f"{where}  STOPPED: {entry['stopped']}")
        return True

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
            population = len(list(self.grid.get_node_ids()))
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
        """Every node evaluates its own model; each node's numbers land in its client entry."""
        messages = list(
            self.strategy.configure_evaluate(server_round, to_record(state), ConfigRecord(dict(self.shared)), self.grid)
        )
        replies = collect(self.grid, messages, self.cfg.federation.round_timeout)
        sent = {m.metadata.dst_node_id for m in messages}
        good = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or P.METRICS not in reply.content.metric_records:
                continue
            got = dict(reply.content.metric_records[P.METRICS])
            try:
                if node not in sent:
                    raise ReplyError("evaluate reply from a node that was not sent a message this round")
                check_eval_metrics(got)
            except ReplyError as err:  # its numbers stay out of the entry and the mean
                book.entry(node)["eval_dropped"] = str(err)
                self.progress.line(f"round {server_round}/{self.cfg.rounds}  evaluate  node {node}  DROPPED: {err}")
                continue
            # The mean over nodes is weighted by it; its own eval split, so only the run's cap applies.
            cap = self.cfg.robustness.max_examples
            if P.NUM_EXAMPLES in got:
                if got[P.NUM_EXAMPLES] > cap:
                    book.entry(node)["eval_examples_capped_from"] = got[P.NUM_EXAMPLES]
                    reply.content.metric_records[P.METRICS][P.NUM_EXAMPLES] = cap
            book.entry(node).update(
                {k: float(v) for k, v in got.items() if k in ("eval_accuracy", "eval_loss", "eval_perplexity")}
            )
            good.append(reply)
        agg = self.strategy.aggregate_evaluate(server_round, good)
        return {k: float(v) for k, v in dict(agg).items()} if agg is not None else {}

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
            "adapter": self.adapter_shape(),
            "run_uid": self.run_uid,
        }
        if self.central is not None:
            extra["central_dp"] = self.central.state_dict()
        # The nodes' own state (FedSA's private B, HetLoRA's pruning, error-feedback residuals,
        # privacy ledgers) where the grid holds it in this process: the in-process simulation.
        node_states = getattr(self.grid, "node_states", None)
        self.run_dir.save_checkpoint(
            server_round,
            state,
            extra,
            nodes=node_states() if node_states else None,
            server=self.strategy.tensor_state(),
        )

    def adapter_shape(self) -> dict[str, Any]:
        """What fixes the global adapter's shape, kept in each checkpoint so a resume that would
        change it is refused even when config.toml was edited by hand."""
        cfg = self.cfg
        return {
            "strategy.name": cfg.strategy.name,
            "model.name": cfg.model.name,
            "lora.rank": cfg.lora.rank,
            "lora.target_modules": list(cfg.lora.target_modules),
        }

    def check_adapter_shape(
        self, saved: dict[str, Any] | None, loaded: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
    ) -> None:
        """Refuse, in one line naming the key, a resume whose configuration changes the adapter."""
        for key, value in self.adapter_shape().items():
            if saved is not None and key in saved and saved[key] != value:
                raise FedLoraError(
                    f"--resume: {key} = {value!r} but the checkpoint was made with {saved[key]!r}; "
                    "the adapter's shape cannot change in a resumed run (start a new run with --out DIR)"
                )
        # The fresh adapter's tensors must all be there, shaped alike (strategies may keep more,
        # such as FedEx's base deltas).
        wrong = sorted(k for k in fresh if k not in loaded or loaded[k].shape != fresh[k].shape)
        if wrong:
            raise FedLoraError(
                f"--resume: the checkpoint's adapter does not match this configuration (tensor {wrong[0]}); "
                "check lora.target_modules, lora.rank and strategy.name against the run's config.toml"
            )

    def restore_nodes(self, nodes: bytes | None) -> None:
        """Give the in-process grid's nodes back the state the checkpoint saved for them."""
        restore = getattr(self.grid, "restore_node_states", None)
        if restore is None:
            return
        if nodes is None:
            if self.strategy.personalized:  # its nodes' own factors (FedSA's B) were in that state
                self.progress.line("checkpoint has no node state: the nodes' private factors start again from zero")
            return
        restore(nodes)

    def export(self, state: dict[str, torch.Tensor], result: RunResult) -> None:
        """The final adapter(s) in peft's format (base deltas folded in) and summary.json."""
        cfg, prepared, host = self.cfg, self.prepared, self.prepared.host
        adapter_dir = self.run_dir.adapter_dir
        for view in self.strategy.views(state):
            spec, tensors = fold_base_delta(view.spec, view.state, view.base_delta)
            extra: dict[str, Any] = {}
            if view.name:
                extra = {"task": view.name, "task_label_ids": prepared.data.task_labels.get(view.name, [])}
            with host.lock:
                host.set_base_delta({}, "")
                export_adapter(
                    host,
                    host.ensure(spec, seed=cfg.seed),
                    tensors,
                    adapter_dir / view.name if view.name else adapter_dir,
                    cfg,
                    prepared.data.labels,
                    extra,
                )
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
