"""The one owner of what a process keeps between messages.

A process may serve many virtual clients (the in-process simulation), one Ray worker's share of
them, or one deployed device. What is expensive to build and identical from one message to the
next is kept here and only here: base models (:mod:`fedlora.model.loading`), the adapter host on each
(:mod:`fedlora.model.adapters`), read and split datasets, partitioners and partitions
(:mod:`fedlora.data`), tokenized examples (the ClientApp). Every entry is keyed by the
configuration that determines it, so a hundred virtual clients with the same data config read
the data once and share one base model.

``process_state().clear()`` forgets everything (tests, memory benchmarks); ``clear(kind)`` one kind.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

#: Kinds of entries, named so that ``clear(kind)`` and debugging output say what they hold.
MODEL = "model"
HOST = "host"
TASK_DATA = "task-data"
PARTITIONER = "partitioner"
NODE_DATA = "node-data"
ENCODED = "encoded"
DERIVED = "derived"
BASE_CHANGE = "base-change"  # the newest base change a node built (strategies.basechain)

#: Kinds with one entry per virtual client (its partition, local split, tokens), and how many of
#: each a process keeps, least recently used first out. A cross-device simulation samples a few
#: dozen of a million clients per round: the entries of the clients sampled lately stay, the
#: others are rebuilt when sampled again (a partition is a cheap view of the shared pool), so
#: memory follows the clients sampled, not every client ever sampled.
PER_NODE_LIMITS: dict[str, int] = {NODE_DATA: 2048, DERIVED: 2048, ENCODED: 2048}


class ProcessState:
    """A keyed store of per-process objects, built once on first use.

    Builders run under one re-entrant lock, so two threads never build the same entry twice
    and a builder may itself ask for another entry (a partition asks for the task data).
    """

    def __init__(self, limits: dict[str, int] | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, Hashable], Any] = {}
        #: Per bounded kind, its keys in order of last use (:data:`PER_NODE_LIMITS`).
        self._limits = dict(PER_NODE_LIMITS if limits is None else limits)
        self._recent: dict[str, OrderedDict[Hashable, None]] = {kind: OrderedDict() for kind in self._limits}

    def get(self, kind: str, key: Hashable, build: Callable[[], T]) -> T:
        """The entry ``(kind, key)``, built with ``build()`` the first time it is asked for (again
        after a bounded kind let it go)."""
        with self._lock:
            full = (kind, key)
            if full not in self._entries:
                self._entries[full] = build()
            self._used(kind, key)
            return self._entries[full]

    def _used(self, kind: str, key: Hashable) -> None:
        """Mark ``key`` used now; drop the least recently used entries beyond the kind's limit."""
        recent = self._recent.get(kind)
        if recent is None:
            return
        recent[key] = None
        recent.move_to_end(key)
        while len(recent) > self._limits[kind]:
            old, _ = recent.popitem(last=False)
            self._entries.pop((kind, old), None)

    def peek(self, kind: str, key: Hashable) -> Any | None:
        """The entry if it exists, else None (never builds)."""
        with self._lock:
            return self._entries.get((kind, key))

    def put(self, kind: str, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[(kind, key)] = value
            self._used(kind, key)

    def clear(self, kind: str | None = None) -> None:
        """Forget every entry, or those of one ``kind``."""
        with self._lock:
            if kind is None:
                self._entries.clear()
                for recent in self._recent.values():
                    recent.clear()
            else:
                for full in [k for k in self._entries if k[0] == kind]:
                    del self._entries[full]
                if kind in self._recent:
                    self._recent[kind].clear()

    def count(self, kind: str | None = None) -> int:
        """How many entries (of ``kind``) are held."""
        with self._lock:
            return sum(1 for k in self._entries if kind is None or k[0] == kind)


_STATE = ProcessState()


def process_state() -> ProcessState:
    """This process's store."""
    return _STATE
