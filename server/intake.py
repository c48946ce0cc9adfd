"""Reply intake: push a round's messages, pull the replies as they come, and check each one.

:func:`collect` moves messages through any :class:`~flwr.serverapp.Grid`; :class:`ReplyIntake`
validates one reply against what its node was sent (payload, every metric and info value, the
strategy's own ``check_reply``), caps the example counts it claims, and keeps it in the round's
:class:`RoundBook` or drops it with a one-line reason. Nothing here aggregates: a bad reply is
stopped before any strategy sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Array, Message, Metadata
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.model.adapters import to_record
from fedlora.run.progress import Progress
from fedlora.strategies import LoRAStrategy
from fedlora.wire import protocol as P
from fedlora.wire.transport import Wire, arrays_of, decode_update, message_bytes

from .privacy import PrivacyBook
from .validation import ReplyError, budget_stop_epsilons, check_info, example_cap, validate_reply

if TYPE_CHECKING:
    from .nodes import NodeBook

PULL_INTERVAL_S = 0.2
#: How often a round checks that the nodes it waits for are still in the federation.
ROLL_CALL_S = 2.0


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
        book = cls(sent=unpack_sent(messages), reference=reference)
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
            listed = grid.get_node_ids()
            online = listed if isinstance(listed, (range, set, frozenset)) else set(listed)
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


class ReplyIntake:
    """Checks the replies of a run's rounds (see the module docstring).

    Parameters
    ----------
    cfg : RunConfig
        The run (privacy mode, robustness caps, rounds for the progress lines).
    rank : int
        The global adapter's rank (a reply that names none trained this one).
    strategy : LoRAStrategy
        Its ``check_reply`` and base-change chain.
    nodes : NodeBook
        What nodes reported; a node's first reply may carry its report.
    wire, privacy, progress
        The transport encoding, the privacy book (epsilons), where the lines go.
    """

    def __init__(
        self,
        cfg: RunConfig,
        rank: int,
        strategy: LoRAStrategy,
        nodes: NodeBook,
        wire: Wire,
        privacy: PrivacyBook,
        progress: Progress,
    ) -> None:
        self.cfg, self.rank, self.strategy, self.nodes = cfg, rank, strategy, nodes
        self.wire, self.privacy, self.progress = wire, privacy, progress
        self.max_bytes = int(cfg.federation.max_reply_mb * 1024 * 1024)

    def check(self, server_round: int, reply: Message, count: int, total: int, book: RoundBook) -> None:
        """Validate one reply against what its node was sent; keep it, or drop it and say why."""
        node = reply.metadata.src_node_id
        entry = book.entry(node)
        where = f"round {server_round}/{self.cfg.rounds}  client {count}/{total}  node {node}"
        if node in book.sent and self.budget_stopped(reply, entry, where):
            return
        try:
            local_dp = self.cfg.privacy.mode == "local"
            decoded, metrics, info, reported = screen_reply(
                reply, book.sent, self.strategy, self.wire, self.max_bytes, local_dp
            )
        except ReplyError as err:
            book.drop(node, str(err))
            self.strategy.chain.forget(node)  # what it holds is unknown: the whole base next time
            self.progress.line(f"{where}  DROPPED: {err}")
            return
        capped = self.cap_examples(node, reply, metrics, entry)
        if node not in self.nodes.directory and reported is not None:
            self.nodes.record(node, info)
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
                "rank": int(metrics.get(P.RANK, self.rank)),
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
        known = self.nodes.directory.get(node)  # what the node reported before this reply, if it did
        return cap_claims(self.cfg.robustness.max_examples, known, reply, metrics, entry)

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


def unpack_sent(messages: list[Message]) -> dict[int, dict[str, Array]]:
    """Each node's sent arrays, unpacked once per distinct record (nodes sent the very same record
    share its arrays): what its reply is validated against."""
    unpacked: dict[int, dict[str, Array]] = {}
    sent = {}
    for m in messages:
        record = m.content[P.ARRAYS]
        if id(record) not in unpacked:
            unpacked[id(record)] = arrays_of(record)
        sent[m.metadata.dst_node_id] = unpacked[id(record)]
    return sent


def screen_reply(
    reply: Message,
    sent: dict[int, dict[str, Array]],
    strategy: LoRAStrategy,
    wire: Wire,
    max_bytes: int,
    local_dp: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any, Any]:
    """(decoded tensors, metrics, info record, the node's report in it) of a train reply that
    passes every check: its payload against what its node was sent, its metrics and info values,
    the strategy's own ``check_reply``. :class:`ReplyError` names the first that fails."""
    node = reply.metadata.src_node_id
    if node not in sent:
        raise ReplyError("reply from a node that was not sent a message this round")
    decoded = validate_reply(reply, sent[node], wire=wire, max_bytes=max_bytes, epsilon=local_dp)
    info = reply.content.config_records.get(P.INFO)
    reported = check_info(node, info) if info is not None else None
    metrics = dict(reply.content[P.METRICS])
    try:
        strategy.check_reply(node, metrics, decoded)  # what only this strategy reads
    except ValueError as err:  # a strategy's one-line reason, dropped like the server's own
        raise ReplyError(str(err)) from None
    return decoded, metrics, info, reported


def cap_claims(limit: int, known: Any, reply: Message, metrics: dict[str, Any], entry: dict[str, Any]) -> int | None:
    """Cap the example counts ``reply`` claims (``metrics`` and the reply's own record, which the
    strategy reads) at :func:`example_cap` of ``limit`` and what the node reported (``known``),
    so no node owns the aggregate by claiming more than it has; ``entry`` records what was
    claimed. Returns the claimed total when it was capped, else None."""
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
