"""Node bookkeeping: what every node reported (rank, device, precision, memory, examples,
tasks), the capability table printed before round 1, ``nodes.json``, and the in-process nodes'
own state restored on ``--resume``."""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.run.directory import RunDirectory
from fedlora.run.progress import Progress
from fedlora.strategies import NodeDirectory, NodeInfo
from fedlora.wire import protocol as P

from .intake import collect
from .validation import ReplyError, check_info, error_text

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
        self._saved = 0  # nodes in nodes.json

    def query_new(self) -> None:
        """Ask nodes that have not reported what they have; record it in the node directory.

        A node that cannot answer (its data does not fit the run, say) is reported and asked
        again next round; the round goes on with the others.
        """
        unknown = self.directory.unknown(self.grid.get_node_ids())
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
        """Write every node's report to the run directory's nodes.json when nodes joined since the
        last write (once per query or round, not once per node: a run starts with all its nodes)."""
        if len(self.directory) != self._saved:
            self.run_dir.write_json(NODES_FILE, [dataclasses.asdict(n) for n in self.directory.all()])
            self._saved = len(self.directory)

    def restore(self, nodes: bytes | None, personalized: bool) -> None:
        """Give the in-process grid's nodes back the state the checkpoint saved for them."""
        restore = getattr(self.grid, "restore_node_states", None)
        if restore is None:
            return
        if nodes is None:
            if personalized:  # its nodes' own factors (FedSA's B) were in that state
                self.progress.line("checkpoint has no node state: the nodes' private factors start again from zero")
            return
        restore(nodes)
