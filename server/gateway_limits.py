"""What the fleet port allows and keeps count of: its limits, the open connections, the refusals.

The bookkeeping half of :mod:`fedlora.server.gateway`, free of I/O: :class:`GatewayLimits` (every
bound, from the command line), :func:`request_limit` (the largest honest message of a run),
:class:`RefusalLog` (refusals counted per reason, reported at most once a minute) and the table of
open connections that picks which one to drop at a cap.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MIB = 1 << 20
#: Bytes a TLS connection reads at a time (see :meth:`FleetGateway._run`).
TLS_READ_BUFFER = 32 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    """What one fleet port accepts (``fedlora-server --help`` names the flags that set them)."""

    #: Largest request body (``--max-request-mb``; by default :func:`request_limit` of the run).
    max_request_bytes: int = 64 * MIB
    #: Bytes of accepted request bodies being forwarded at once, all connections together.
    max_inflight_bytes: int = 1 << 30
    #: Open connections in all (``--max-connections``) and from one address (``--max-connections-per-peer``).
    max_connections: int = 1000
    max_connections_per_peer: int = 200
    #: Seconds for the TLS handshake, request line and headers of a new request.
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept (Flower's SuperNode polls every few seconds).
    keepalive_timeout: float = 30.0
    #: Slowest accepted body (bytes per second, averaged) once ``body_grace`` seconds have passed.
    min_body_rate: float = 16 * 1024
    body_grace: float = 10.0
    #: Seconds the SuperLink may take to answer a forwarded call.
    upstream_timeout: float = 300.0
    #: Largest request line plus headers.
    max_header_bytes: int = 16 * 1024


def request_limit(adapter_values: int, bytes_per_value: int) -> int:
    """The largest Fleet request a run can legitimately need, in bytes.

    A device's reply carries at most its whole adapter: ``adapter_values`` trainable values at
    ``bytes_per_value`` on the wire, twice over for headroom (a packed record's index, scales,
    a strategy's extra tensors), plus 16 MiB for protobuf framing and the small RPCs. Flower
    itself splits arrays into 5 MiB objects, so real requests stay far below this; the bound is
    what matters when an outsider declares a gigabyte.
    """
    return 2 * adapter_values * bytes_per_value + 16 * MIB


class RefusalLog:
    """Refusals counted per reason, reported through ``emit`` at most once per ``every`` seconds."""

    def __init__(self, emit: Callable[[str], None], every: float = 60.0):
        self.emit = emit
        self.every = every
        self.counts: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self._last = -float("inf")

    def note(self, reason: str) -> None:
        self.counts[reason] += 1
        self.total[reason] += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.counts or (not force and now - self._last < self.every):
            return
        self._last = now
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        self.counts.clear()
        self.emit(f"fedlora-server: fleet port refused: {parts}")


class _Gone(Exception):
    """The client was too slow or went away: the connection is closed with no further answer."""


class _Conn:
    """One client connection: its peer address, its task, and whether it may be dropped."""

    def __init__(self, peer: str, writer: asyncio.StreamWriter):
        self.peer = peer
        self.writer = writer
        self.task = asyncio.current_task()
        self.busy = False  # a request is being served: never dropped for a newcomer

    def abort(self) -> None:
        # abort(), not close(): no TLS close_notify exchange for a peer that may never answer it.
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


class _Table:
    """Open connections, with the droppable ones (no request yet, or idle) oldest first."""

    def __init__(self, limits: GatewayLimits, note: Callable[[str], None]):
        self.limits = limits
        self.note = note  # counts a connection dropped for a newcomer (RefusalLog.note)
        self.open: set[_Conn] = set()
        self.per_peer: Counter[str] = Counter()
        self.idle: OrderedDict[_Conn, None] = OrderedDict()

    def admit(self, conn: _Conn) -> str | None:
        """Take ``conn`` in, dropping an idle one at a cap; the refusal reason when it cannot."""
        if self.per_peer[conn.peer] >= self.limits.max_connections_per_peer:
            victim = next((c for c in self.idle if c.peer == conn.peer), None)
            if victim is None:
                return "connections from one address (all busy)"
            self.drop(victim)
            self.note("idle connections dropped at the per-address cap")
        if len(self.open) >= self.limits.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                return "connections (all busy)"
            self.drop(victim)
            self.note("idle connections dropped at the connection cap")
        self.open.add(conn)
        self.per_peer[conn.peer] += 1
        self.idle[conn] = None
        return None

    def drop(self, conn: _Conn) -> None:
        self.remove(conn)
        conn.abort()
        if conn.task is not None:
            conn.task.cancel()

    def remove(self, conn: _Conn) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self.per_peer[conn.peer] -= 1
            if self.per_peer[conn.peer] <= 0:
                del self.per_peer[conn.peer]
        self.idle.pop(conn, None)

    def set_busy(self, conn: _Conn, busy: bool) -> None:
        conn.busy = busy
        if busy:
            self.idle.pop(conn, None)
        elif conn in self.open:
            self.idle[conn] = None
            self.idle.move_to_end(conn)
