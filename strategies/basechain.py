"""The base change on the downlink: what a node already holds is never sent again.

flora and fedex fold each round's update into the frozen weights: the global state keeps the
cumulative base delta ``D = B_d @ A_d`` as factors, compacted every round to their numerical
rank (so at most the dense matrices' bytes). Sent whole, it makes the downlink grow round after
round. Here the base change is a chain instead:

* each round's fold, ``D_k = fold(D_{k-1}, increment_k)``, is a *link*; its increment is the
  factors folded in that round (the stacked clients' update, or the fedex residual);
* every state of the base is named by :func:`base_digest` (a SHA-256 of its factors);
* a node keeps the base it built (factors and digest) in its own ``Context.state``
  (:func:`resolve`) and reports the digest in each reply; the server (:class:`BaseChain`)
  then sends it only the links since that digest, and the node replays them with the very
  same :func:`fold` and checks that it arrives at the server's digest;
* a node the server has no acknowledged digest for (new, restarted, failed last time) or one
  so far behind that the links would outweigh the base itself gets the whole ``D_k``.

The digest check makes the node's frozen weights bit-identical to the server's or the round
fails loudly on that node (a replay on different hardware whose linear algebra rounds
differently is caught the same way; the server then sends it the whole base next time).
Base-delta factors and links always travel as exact float32 (:func:`fedlora.model.adapters.to_record`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from fedlora.model.adapters import LINK_SEP, delta_keys, from_record, is_base_delta, is_base_link, module_of, to_record
from fedlora.model.lowrank import compact, stack
from fedlora.process import BASE_CHANGE, process_state
from fedlora.wire import protocol as P

#: What a node keeps in ``Context.state``: the base's factors and its digest.
STATE_FACTORS = "fedlora-base"
STATE_DIGEST = "fedlora-base-digest"

Increment = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B, A) folded in


def accumulate_delta(
    state: Mapping[str, torch.Tensor], module: str, b: torch.Tensor, a: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The module's base-delta factors after adding ``b @ a`` (compacted)."""
    da_key, db_key = delta_keys(module)
    terms = [(b, a, 1.0)]
    if da_key in state:
        terms.insert(0, (state[db_key], state[da_key], 1.0))
    new_b, new_a = compact(*stack(terms))
    return {da_key: new_a, db_key: new_b}


def fold(state: Mapping[str, torch.Tensor], increment: Increment) -> dict[str, torch.Tensor]:
    """``state`` with every module's base delta grown by its increment (modules in sorted order,
    so server and node compute the very same floats)."""
    out = dict(state)
    for module in sorted(increment):
        b, a = increment[module]
        out.update(accumulate_delta(out, module, b, a))
    return out


def base_factors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_base_delta(k)}


def base_digest(factors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex, 32 characters) of base-delta factors: keys, shapes and float32 bytes."""
    h = hashlib.sha256()
    for key in sorted(factors):
        t = factors[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _link_tensors(index: int, increment: Increment) -> dict[str, torch.Tensor]:
    out = {}
    for module, (b, a) in increment.items():
        a_key, b_key = delta_keys(module)
        out[f"{a_key}{LINK_SEP}{index}"] = a
        out[f"{b_key}{LINK_SEP}{index}"] = b
    return out


def _links_of(received: Mapping[str, torch.Tensor]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The received links as increments, in chain order."""
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in received.items():
        if is_base_link(key):
            base_key, _, index = key.rpartition(LINK_SEP)
            by_index.setdefault(int(index), {})[base_key] = value
    links = []
    for index in sorted(by_index):
        tensors = by_index[index]
        modules = sorted({module_of(k) for k in tensors})
        try:
            links.append({m: (tensors[delta_keys(m)[1]], tensors[delta_keys(m)[0]]) for m in modules})
        except KeyError as err:
            raise ValueError(f"base link {index} lacks {err.args[0]}") from None
    return links


class BaseChain:
    """The server half: the links of recent rounds and the digest each node acknowledged."""

    def __init__(self) -> None:
        #: (digest before, digest after, link tensors), oldest first.
        self.links: list[tuple[str, str, dict[str, torch.Tensor]]] = []
        self.acks: dict[int, str] = {}
        self._next = 0
        #: (the base tensors last hashed, their digest): every node of a round is sent the same
        #: tensors, so the base is hashed once per round, not once per node. Holding the tensors
        #: keeps their identity from being reused by others.
        self._head: tuple[list[tuple[str, torch.Tensor]], str] = ([], "")

    def advance(self, before: Mapping[str, torch.Tensor], increment: Increment, after: Mapping[str, torch.Tensor]):
        """Record one fold, ``base(after) = fold(base(before), increment)``; keep only as many
        links as together weigh less than the base itself (older nodes get it whole)."""
        self._next += 1
        tensors = _link_tensors(self._next, increment)
        self.links.append((self.digest(base_factors(before)), self.digest(base_factors(after)), tensors))
        full = _nbytes(base_factors(after))
        while self.links and sum(_nbytes(t) for _, _, t in self.links) > full:
            self.links.pop(0)

    def digest(self, base: Mapping[str, torch.Tensor]) -> str:
        """:func:`base_digest` of ``base``, remembered for the very same tensors."""
        items = [(k, base[k]) for k in sorted(base)]
        held = self._head[0]
        if not items or len(items) != len(held) or any(a != c or b is not d for (a, b), (c, d) in zip(items, held)):
            self._head = (items, base_digest(base))
        return self._head[1]

    def ack(self, node: int, digest: Any) -> None:
        """``node`` replied holding the base named ``digest`` (a non-string: it holds nothing known)."""
        if isinstance(digest, str):
            self.acks[node] = digest
        else:
            self.acks.pop(node, None)

    def forget(self, node: int) -> None:
        """``node`` failed: what it holds is unknown, so it gets the whole base next time."""
        self.acks.pop(node, None)

    def downlink(self, node: int, payload: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """``payload`` with its base delta replaced by the links ``node`` lacks when it holds an
        earlier base, and the config entries naming the base it builds to."""
        base = base_factors(payload)
        if not base and not self.links:
            return dict(payload), {}
        head = self.digest(base)
        entries: dict[str, Any] = {P.BASE_DIGEST: head}
        held = self.acks.get(node)
        if held is None or held == head:
            if held == head:  # nothing new: no base tensors at all
                entries[P.BASE_FROM] = held
                return {k: v for k, v in payload.items() if not is_base_delta(k)}, entries
            return dict(payload), entries
        path: list[dict[str, torch.Tensor]] = []
        digest = held
        for before, after, tensors in self.links:
            if before == digest:
                path.append(tensors)
                digest = after
        if digest != head or not path:
            return dict(payload), entries  # not reachable from what it holds: the whole base
        out = {k: v for k, v in payload.items() if not is_base_delta(k)}
        for tensors in path:
            out.update(tensors)
        entries[P.BASE_FROM] = held
        return out, entries


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in tensors.values())


def resolve(received: Mapping[str, torch.Tensor], config: ConfigRecord, state: RecordDict) -> dict[str, torch.Tensor]:
    """The node half: the base-delta factors this message builds to, from the whole base in it or
    from the links after what the node holds; kept (with their digest) in ``state``.

    Raises
    ------
    ValueError
        The links build on a base this node does not hold, or what it built is not the
        server's base (one line; the server then sends the whole base next time).
    """
    if P.BASE_DIGEST not in config:
        return base_factors(received)
    target = str(config[P.BASE_DIGEST])
    # Virtual clients of one process (the in-process simulation) share one copy of each base and
    # build it once: the first node that reaches ``target`` checks and keeps it for the others.
    shared = process_state().peek(BASE_CHANGE, target)
    if P.BASE_FROM in config:
        held = str(state[STATE_DIGEST][STATE_DIGEST]) if STATE_DIGEST in state else None
        if held != str(config[P.BASE_FROM]):
            raise ValueError(
                f"base change out of date: this node holds {held or 'none'}, the message builds on "
                f"{config[P.BASE_FROM]} (the server sends the whole base next round)"
            )
        if shared is not None:
            factors = shared[0]
        else:
            factors = from_record(state[STATE_FACTORS]) if STATE_FACTORS in state else {}
            for increment in _links_of(received):
                factors = fold(factors, increment)
    else:
        factors = base_factors(received)
    if shared is None or P.BASE_FROM not in config:  # what arrived whole is checked every time
        got = base_digest(factors)
        if got != target:
            raise ValueError(
                f"base change digest {got} != the server's {target} (the server sends it whole next round)"
            )
    if shared is None:
        process_state().clear(BASE_CHANGE)  # the newest base only
        shared = (factors, to_record(factors))
        process_state().put(BASE_CHANGE, target, shared)
    if STATE_DIGEST not in state or str(state[STATE_DIGEST][STATE_DIGEST]) != target:
        state[STATE_FACTORS] = shared[1]
        state[STATE_DIGEST] = ConfigRecord({STATE_DIGEST: target})
    return shared[0]


def held_digest(state: RecordDict) -> str | None:
    """The digest of the base this node holds (reported in its replies)."""
    return str(state[STATE_DIGEST][STATE_DIGEST]) if STATE_DIGEST in state else None
