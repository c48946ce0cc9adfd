"""Node bookkeeping: what every node reported (rank, device, precision, memory, examples,
tasks), the capability table printed before round 1, ``nodes.json``, and the in-process nodes'
own state restored on ``--resume``.

Costs follow the nodes that take part, not the federation's size: a small federation (at most
:data:`EAGER_QUERY_MAX` nodes) is asked for its capabilities once before round 1, a larger one
only for the nodes about to be sampled (a node also reports with its first reply), the table on
screen summarises (counts per device, precision and rank) once there are more than
:data:`TABLE_ROWS` nodes, and ``nodes.json`` grows by the nodes that joined, appended in place."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.files import atomic_write_bytes
from fedlora.run.directory import RunDirectory, finite_json
from fedlora.run.progress import Progress
from fedlora.strategies import NodeDirectory, NodeInfo
from fedlora.wire import protocol as P

from .intake import collect
from .validation import ReplyError, check_info, error_text

NODES_FILE = "nodes.json"
#: Rows of the capability table printed at the start of a run; beyond them it is a summary (all
#: the nodes are in nodes.json).
TABLE_ROWS = 16
#: Federations of up to this many nodes are asked for their capabilities all at once before round 1
#: (the table and the DP plan then cover every node); larger ones as their nodes are sampled.
EAGER_QUERY_MAX = 100
_CLOSE = b"\n]\n"  # how nodes.json ends: new nodes are written over it


def describe_node(node: NodeInfo) -> str:
    """One node's capabilities in a line (``node N joined: ...`` on a deployment)."""
    return (
        f"rank {node.rank}{_auto(node, 'rank')}, {node.quantization}{_auto(node, 'quantization')} {node.dtype} "
        f"on {node.device}, {node.memory_gb:g} GB, {node.num_examples} examples"
    )


def _auto(node: NodeInfo, what: str) -> str:
    """`` (auto)`` when the node chose ``what`` itself from its free memory."""
    return " (auto)" if what in str(node.chosen.get("auto", "")).split(",") else ""


def capability_table(nodes: list[NodeInfo], total: int | None = None) -> list[str]:
    """The lines of the table of the nodes' capabilities printed at the start of a run: one row
    per node up to :data:`TABLE_ROWS` nodes (``auto`` marking what a device chose by itself), else
    the count of nodes per device, precision, dtype and rank. ``total``: the federation's size,
    when more nodes are in it than have reported."""
    if not nodes:
        return [f"{total:,} node(s): capabilities are learnt as the nodes are sampled"] if total else []
    known = f"{len(nodes):,} node(s)" + (
        f" of {total:,} (the others report when sampled)" if total and total > len(nodes) else ""
    )
    if len(nodes) > TABLE_ROWS:
        return [f"{known}:", *_summary(nodes), f"  every node: {NODES_FILE}"]
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
        for n in nodes
    ]
    return [f"{known}:", *_columns([header, *rows])]


def _summary(nodes: list[NodeInfo]) -> list[str]:
    """Rows of (nodes, device, precision, dtype, rank, examples min-max), one per kind of node."""
    groups: dict[tuple[str, str, str, str], list[NodeInfo]] = {}
    for n in nodes:
        key = (n.device, n.quantization + _auto(n, "quantization"), n.dtype, str(n.rank) + _auto(n, "rank"))
        groups.setdefault(key, []).append(n)
    header = ("nodes", "device", "precision", "dtype", "rank", "examples")
    rows = []
    for key, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        sizes = [m.num_examples for m in members]
        rows.append(
            (f"{len(members):,}", *key, f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0]))
        )
    return _columns([header, *rows])


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


class NodeBook:
    """The run's :class:`~fedlora.strategies.NodeDirectory` and how it is filled and kept.

    Parameters
    ----------
    directory : NodeDirectory
        What nodes reported (the strategy reads it too).
    grid : Grid
        Where the nodes are.
    run_dir : RunDirectory
        Where ``nodes.json`` goes.
    progress : Progress
        Where the lines go.
    shared : dict
        The ConfigRecord entries a capability query carries (the run, its classes and tasks).
    timeout : float
        How long a query waits for answers (the round timeout).
    announce : bool
        Print a line per node as it joins (a deployment's real devices).
    """

    def __init__(
        self,
        directory: NodeDirectory,
        grid: Grid,
        run_dir: RunDirectory,
        progress: Progress,
        shared: dict,
        timeout: float,
        announce: bool = False,
    ) -> None:
        self.directory, self.grid, self.run_dir, self.progress = directory, grid, run_dir, progress
        self.shared, self.timeout, self.announce = shared, timeout, announce
        self._saved: set[int] = set()  # nodes in nodes.json

    def query_new(self, nodes: Iterable[int] | None = None) -> None:
        """Ask the nodes among ``nodes`` (default: every node) that have not reported what they
        have; record it in the node directory.

        A node that cannot answer (its data does not fit the run, say) is reported and asked
        again next round; the round goes on with the others.
        """
        unknown = self.directory.unknown(self.grid.get_node_ids() if nodes is None else nodes)
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
        for reply in collect(self.grid, messages, self.timeout):
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
            self.record(node, info)
        self.save()

    def record(self, node: int, info: ConfigRecord) -> None:
        """Keep what ``node`` says it has (a malformed record is ignored) in the directory;
        announce it if asked.
        :meth:`save` writes the directory out."""
        got = self.directory.record(node, info)
        if got is not None and self.announce:
            self.progress.line(f"node {node} joined: {describe_node(got)}")

    def save(self) -> None:
        """Add the nodes that reported since the last write to the run directory's nodes.json
        (once per query or round, not once per node). The first write is atomic; later ones
        append in place over the closing bracket, so a large federation's list costs what joined."""
        new = [n for n in self.directory.all() if n.node_id not in self._saved]
        if not new:
            return
        entries = [json.dumps(finite_json(dataclasses.asdict(n)), sort_keys=True).encode() for n in new]
        path = self.run_dir.path / NODES_FILE
        if not self._saved or not path.is_file():
            self._saved = set()
            atomic_write_bytes(path, b"[\n" + b",\n".join(entries) + _CLOSE)
        else:
            with path.open("r+b") as f:
                f.seek(-len(_CLOSE), 2)
                f.write(b",\n" + b",\n".join(entries) + _CLOSE)
        self._saved.update(n.node_id for n in new)

    def restore(self, chain: list[Path], personalized: bool) -> None:
        """Give the in-process grid's nodes back the state the checkpoint files of rounds 1..k
        (``chain``, oldest first: each holds the nodes served in its round) saved for them."""
        restore = getattr(self.grid, "restore_node_states", None)
        if restore is None:
            return
        if not chain:
            if personalized:  # its nodes' own factors (FedSA's B) were in that state
                self.progress.line("checkpoint has no node state: the nodes' private factors start again from zero")
            return
        restore(chain)
