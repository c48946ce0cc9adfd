"""Personalized evaluation: the clients that judge their own model each round, and who exports it.

Personalized strategies (fedsa, pfedlora) give each client a model of its own: the shared part
plus what the client keeps. The server asks clients to evaluate it on their own held-out
examples. Which clients is ``[evaluation]``'s choice (:func:`evaluation_nodes`), so that a round
of a million-client federation costs its sampled clients, not a million evaluations, and the
end of the run writes the adapters asked for, not a million folders.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedlora.config import EvaluationConfig
from fedlora.model.adapters import to_record
from fedlora.wire import protocol as P

from .intake import RoundBook, collect
from .validation import ReplyError, check_eval_metrics

if TYPE_CHECKING:
    from .rounds import RoundLoop

#: The metrics of a node's own evaluation that land in its client entry.
EVAL_KEYS = ("eval_accuracy", "eval_loss", "eval_perplexity")


def evaluation_nodes(
    ev: EvaluationConfig, node_ids: Sequence[int], trained: Sequence[int], server_round: int, rounds: int, seed: int
) -> list[int]:
    """The nodes that evaluate their own model in ``server_round``, sorted.

    ``trained``: the nodes whose update of the round was used. The last round of a federation of
    at most ``ev.final_all_up_to`` nodes evaluates every node. O(nodes chosen) for a ``range`` of
    node ids (the in-process grid's).
    """
    if ev.clients == "all" or (server_round == rounds and len(node_ids) <= ev.final_all_up_to):
        return list(node_ids)
    if ev.clients == "trained":
        return sorted(set(trained))
    count = min(len(node_ids), max(1, math.floor(ev.fraction * len(node_ids) + 0.5)))
    # A stream of its own, apart from the training sample's: the same seed draws other nodes.
    rng = random.Random(seed * 100_019 + server_round * 7 + 3)
    return sorted(rng.sample(node_ids, count))


def export_nodes(ev: EvaluationConfig, node_ids: Sequence[int], evaluated: Sequence[int], grid: Grid) -> list[int]:
    """The nodes that write their personalized adapter in the last round. A list of partition ids
    is mapped to node ids by the grid when it knows them (the in-process simulation); a deployment's
    node ids are taken as they are."""
    if ev.export_clients == "none":
        return []
    if ev.export_clients == "all":
        return list(node_ids)
    if ev.export_clients == "auto":
        return list(evaluated) if len(evaluated) == len(node_ids) else []
    of_partition = getattr(grid, "node_of_partition", None)
    wanted = [of_partition(k) if of_partition is not None else k for k in ev.export_clients]
    return sorted({n for n in wanted if n is not None and n in node_ids})


def evaluate_on_nodes(
    loop: RoundLoop, server_round: int, state: dict[str, torch.Tensor], book: RoundBook
) -> dict[str, float]:
    """The chosen nodes evaluate their own model; each node's numbers land in its client entry,
    their example-weighted mean is returned (``eval_*``)."""
    cfg, grid = loop.cfg, loop.grid
    node_ids = grid.get_node_ids()
    trained = [reply.metadata.src_node_id for reply in book.valid]
    nodes = evaluation_nodes(cfg.evaluation, node_ids, trained, server_round, cfg.rounds, cfg.seed)
    export = export_nodes(cfg.evaluation, node_ids, nodes, grid) if server_round == cfg.rounds else []
    nodes = sorted(set(nodes) | set(export))  # a node writes its adapter while it evaluates
    messages = list(
        loop.strategy.configure_evaluate(
            server_round, to_record(state), ConfigRecord(dict(loop.shared)), grid, nodes=nodes, export=export
        )
    )
    replies = collect(grid, messages, cfg.federation.round_timeout)
    sent = {m.metadata.dst_node_id for m in messages}
    good = [reply for reply in replies if _take(loop, server_round, reply, sent, book)]
    agg = loop.strategy.aggregate_evaluate(server_round, good)
    return {k: float(v) for k, v in dict(agg).items()} if agg is not None else {}


def _take(loop: RoundLoop, server_round: int, reply: Any, sent: set[int], book: RoundBook) -> bool:
    """Check one evaluate reply; keep its numbers in the node's entry, or say why not."""
    node = reply.metadata.src_node_id
    if reply.has_error() or P.METRICS not in reply.content.metric_records:
        return False
    got = dict(reply.content.metric_records[P.METRICS])
    try:
        if node not in sent:
            raise ReplyError("evaluate reply from a node that was not sent a message this round")
        check_eval_metrics(got)
    except ReplyError as err:  # its numbers stay out of the entry and the mean
        book.entry(node)["eval_dropped"] = str(err)
        loop.progress.line(f"round {server_round}/{loop.cfg.rounds}  evaluate  node {node}  DROPPED: {err}")
        return False
    # The mean over nodes is weighted by it; its own eval split, so only the run's cap applies.
    cap = loop.cfg.robustness.max_examples
    if P.NUM_EXAMPLES in got and got[P.NUM_EXAMPLES] > cap:
        book.entry(node)["eval_examples_capped_from"] = got[P.NUM_EXAMPLES]
        reply.content.metric_records[P.METRICS][P.NUM_EXAMPLES] = cap
    book.entry(node).update({k: float(v) for k, v in got.items() if k in EVAL_KEYS})
    return True
