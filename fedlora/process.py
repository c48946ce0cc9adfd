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


class ProcessState:
    """A keyed store of per-process objects, built once on first use.

    Builders run under one re-entrant lock, so two threads never build the same entry twice
    and a builder may itself ask for another entry (a partition asks for the task data).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, Hashable], Any] = {}

    def get(self, kind: str, key: Hashable, build: Callable[[], T]) -> T:
        """The entry ``(kind, key)``, built with ``build()`` the first time it is asked for."""
        with self._lock:
            full = (kind, key)
            if full not in self._entries:
                self._entries[full] = build()
            return self._entries[full]

    def peek(self, kind: str, key: Hashable) -> Any | None:
        """The entry if it exists, else None (never builds)."""
        with self._lock:
            return self._entries.get((kind, key))

    def put(self, kind: str, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[(kind, key)] = value

    def clear(self, kind: str | None = None) -> None:
        """Forget every entry, or those of one ``kind``."""
        with self._lock:
            if kind is None:
                self._entries.clear()
            else:
                for full in [k for k in self._entries if k[0] == kind]:
                    del self._entries[full]

    def count(self, kind: str | None = None) -> int:
        """How many entries (of ``kind``) are held."""
        with self._lock:
            return sum(1 for k in self._entries if kind is None or k[0] == kind)


_STATE = ProcessState()


def process_state() -> ProcessState:
    """This process's store."""
    return _STATE
