"""Where the in-process simulation keeps its virtual nodes' own state (``Context.state``).

Personalized strategies leave state on their nodes: FedSA's private B, HetLoRA's pruning,
error-feedback residuals, privacy ledgers. A cross-device federation has a million nodes of which
a few dozen train per round, so the state of every node cannot sit in memory, nor be written
whole with every checkpoint. :class:`NodeStateStore` keeps in memory only the nodes served since
the last checkpoint; each checkpoint writes those (and only those) into the round's
``round_NNNN.nodes.pb``, after which the store drops them from memory and reads a node back from
that file the next time it is sampled. A resumed run rebuilds where each node's newest state is
from the chain of checkpoint files up to the round it resumes from, without reading the states
themselves.

File format (:data:`DELTA_MAGIC`): the magic line, then per node its id (8 bytes, little endian),
the length of its state (8 bytes) and the state as Flower's ``RecordDict`` protobuf. A file of
the earlier format (:data:`FULL_MAGIC`: every node, written whole each round) still resumes: it
replaces what the files before it said.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import RecordDict

from fedlora.errors import RunFailed

#: First bytes of a checkpoint's node-state file holding the nodes served since the previous one.
DELTA_MAGIC = b"fedlora-node-states-2\n"
#: First bytes of the earlier format, every node's state in each round's file.
FULL_MAGIC = b"fedlora-node-states-1\n"
_HEADER = 16  # node id (8 bytes) + state length (8 bytes)


def encode_states(states: Iterable[tuple[int, RecordDict]]) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """(file bytes, node -> (offset, length) of its state in them) for ``states``."""
    from flwr.common.serde import recorddict_to_proto

    parts, where, pos = [DELTA_MAGIC], {}, len(DELTA_MAGIC)
    for node_id, state in states:
        body = recorddict_to_proto(state).SerializeToString()
        parts.append(node_id.to_bytes(8, "little") + len(body).to_bytes(8, "little") + body)
        where[node_id] = (pos + _HEADER, len(body))
        pos += _HEADER + len(body)
    return b"".join(parts), where


def scan(path: Path) -> tuple[bool, dict[int, tuple[int, int]]]:
    """(whether the file holds every node, node -> (offset, length)) of a node-state file, read
    by its headers alone (the states are skipped, not parsed).

    Raises
    ------
    RunFailed
        Not a node-state file, or truncated.
    """
    where: dict[int, tuple[int, int]] = {}
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(len(DELTA_MAGIC))
        if magic not in (DELTA_MAGIC, FULL_MAGIC):
            raise RunFailed(f"checkpoint node state {path.name}: not a fedlora node-state file")
        pos = len(magic)
        while pos < size:
            head = f.read(_HEADER)
            if len(head) != _HEADER:
                raise RunFailed(f"checkpoint node state {path.name}: truncated")
            node_id, length = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
            if pos + _HEADER + length > size:
                raise RunFailed(f"checkpoint node state {path.name}: truncated")
            where[node_id] = (pos + _HEADER, length)
            pos += _HEADER + length
            f.seek(pos)
    return magic == FULL_MAGIC, where


def read_state(path: Path, offset: int, length: int) -> RecordDict:
    """One node's state from a node-state file."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    with path.open("rb") as f:
        f.seek(offset)
        body = f.read(length)
    if len(body) != length:
        raise RunFailed(f"checkpoint node state {path.name}: truncated")
    proto = ProtoRecordDict()
    proto.ParseFromString(body)
    return recorddict_from_proto(proto)


class NodeStateStore:
    """The nodes' state: in memory since the last checkpoint, else in the checkpoint files.

    Parameters
    ----------
    node_ids : range
        The federation's nodes (a restore naming another node is refused).
    """

    def __init__(self, node_ids: range) -> None:
        self.node_ids = node_ids
        #: Nodes served since the last checkpoint, by id: their state as the ClientApp left it.
        self._live: dict[int, RecordDict] = {}
        #: Where each node's newest checkpointed state is: (file, offset, length).
        self._saved: dict[int, tuple[Path, int, int]] = {}
        #: What :meth:`delta` encoded, waiting for :meth:`saved` to learn the file's path.
        self._pending: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        """How many nodes have state in memory now."""
        return len(self._live)

    def state(self, node_id: int) -> RecordDict:
        """``node_id``'s state, to hand to its ClientApp (mutated in place, or replaced by :meth:`put`)."""
        live = self._live.get(node_id)
        if live is None:
            saved = self._saved.get(node_id)
            live = read_state(*saved) if saved is not None else RecordDict()
            self._live[node_id] = live
        return live

    def put(self, node_id: int, state: RecordDict) -> None:
        """The state ``node_id`` left (a worker lane hands back a new object)."""
        self._live[node_id] = state

    def delta(self) -> bytes:
        """The checkpoint file's bytes: every node served since the last one (an empty state is
        left out unless it replaces a saved one). Call :meth:`saved` once it is written."""
        keep = [(n, s) for n, s in sorted(self._live.items()) if len(s) or n in self._saved]
        blob, self._pending = encode_states(keep)
        return blob

    def saved(self, path: Path) -> None:
        """:meth:`delta`'s bytes are now in ``path``: the nodes it holds are read from there from
        now on, and leave memory."""
        for node_id, (offset, length) in self._pending.items():
            self._saved[node_id] = (path, offset, length)
        self._pending = {}
        self._live.clear()

    def restore(self, files: list[Path]) -> None:
        """Rebuild where every node's state is from the checkpoint files of rounds 1..k, oldest
        first (the chain of a resume from round k); nothing stays in memory.

        Raises
        ------
        RunFailed
            A file is malformed or names a node this federation does not have.
        """
        saved: dict[int, tuple[Path, int, int]] = {}
        for path in files:
            full, where = scan(path)
            if full:  # the earlier format: this file alone says what every node holds
                saved = {}
                if set(where) != set(self.node_ids):
                    raise RunFailed(
                        f"checkpoint node state: saved for {len(where)} node(s), this federation has "
                        f"{len(self.node_ids)}"
                    )
            stray = next((n for n in where if n not in self.node_ids), None)
            if stray is not None:
                raise RunFailed(f"checkpoint node state {path.name}: node {stray} is not in this federation")
            saved.update({n: (path, offset, length) for n, (offset, length) in where.items()})
        self._saved, self._live, self._pending = saved, {}, {}
