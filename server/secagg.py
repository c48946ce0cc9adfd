"""The server's side of secure aggregation (SecAgg+): one round's protocol, as a state machine.

:class:`Protocol` holds what the server knows in one round and checks every reply before it uses
it; it sends and receives nothing itself (:mod:`.secure_round` moves its messages over the Grid),
so tests drive it with the client stages of :mod:`fedlora.client.secagg` alone. Per round::

    advertise-keys   every sampled node: the field and threshold  ->  two public keys
    share-keys       each keyed node: its neighbours' keys  ->  its shares, encrypted to each
    masked-input     the train message + the shares addressed to it  ->  its masked summand
    unmask           each node that sent one: which neighbours survived, which dropped
                     ->  seed shares of survivors, key shares of the dropped

after which the sum of the masked vectors, minus the survivors' self masks (rebuilt from their
seed shares, checked against the digest each committed to) and minus the pairwise masks of the
nodes that dropped after sharing (rebuilt from their key shares, checked against their public
key), is the sum of the survivors' summands (:func:`fedlora.wire.secagg.decode_sum`). The
neighbourhoods are a ring over a seeded shuffle of the round's nodes (``num_shares`` wide), or
every node (SecAgg) by default.

A reply that fails a check raises :class:`SecAggError` (one line; the node is dropped from the
round, and its masks are recovered if it had sent shares); a round that can no longer reach the
threshold raises :class:`RoundSkipped` (one line; nothing is aggregated).
"""

from __future__ import annotations

import random
import secrets as token
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from fedlora.config import SecureAggregationConfig
from fedlora.privacy.central import distributed_noise_std
from fedlora.wire import protocol as P
from fedlora.wire import secagg as S

#: Bounds on what a node may send in a key stage (a PEM public key of Flower's curve is ~215 bytes;
#: a Fernet token of two shares under 2 KB).
MAX_KEY_BYTES = 1024
MAX_CIPHERTEXT_BYTES = 8192
MAX_SHARE_BYTES = 4096


class SecAggError(ValueError):
    """A node's reply that the protocol cannot use (the one-line reason it is dropped)."""


class RoundSkipped(Exception):
    """The round cannot be completed securely (too few survivors): nothing is aggregated."""


def ring(nodes: list[int], shares: int, seed: int) -> dict[int, list[int]]:
    """Each node's neighbourhood (itself included, sorted): ``shares`` consecutive nodes around it
    on a seeded shuffle of ``nodes``, or all of them when ``shares >= len(nodes)``."""
    if shares >= len(nodes):
        return {n: sorted(nodes) for n in nodes}
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    half = shares // 2
    return {n: sorted(order[(i + d) % len(order)] for d in range(-half, half + 1)) for i, n in enumerate(order)}


def _entry(record: Any, key: str, kind: type, list_of: type | None = None) -> Any:
    value = record.get(key) if record is not None else None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and list_of is not None:
        ok = all(isinstance(v, list_of) and not isinstance(v, bool) for v in value)
    if not ok:
        raise SecAggError(f"secure aggregation: its reply's {key!r} is missing or malformed")
    return value


def check_echo(reply: Message, session: str, stage: str) -> Any:
    """The reply's secure-aggregation record, once it is shown to answer ``stage`` of this round's
    ``session``; SecAggError naming what it answers instead (a reply replayed from an earlier round)."""
    if reply.has_error():
        raise SecAggError(f"secure aggregation {stage}: the node failed: {str(reply.error.reason)[:200]}")
    record = reply.content.config_records.get(S.RECORD)
    if record is None:
        raise SecAggError(f"secure aggregation {stage}: the reply has no {S.RECORD!r} record")
    if record.get(S.SESSION) != session:
        raise SecAggError(f"secure aggregation {stage}: a replayed reply (it names another round's session)")
    if record.get(S.STAGE) != stage:
        raise SecAggError(f"secure aggregation {stage}: the reply answers stage {str(record.get(S.STAGE))[:40]!r}")
    return record


@dataclass
class Protocol:
    """One round of SecAgg+ on the server (see the module docstring).

    Parameters
    ----------
    server_round : int
        The round.
    nodes : list of int
        The round's sampled nodes.
    settings : SecureAggregationConfig
        ``[secure_aggregation]``.
    length : int
        Entries of a summand (:func:`fedlora.wire.secagg.length` of the payload's layout).
    seed : int
        Seeds the neighbourhoods.
    clip_norm : float
        Central DP's L2 bound each client clips its update to (0: no DP).
    sum_noise_std : float
        Distributed DP: the std the sum must carry (``noise_multiplier x clip_norm``; 0: the
        clients add none). Each client adds ``sum_noise_std / sqrt(threshold)``
        (:func:`fedlora.privacy.central.distributed_noise_std`): a round never completes with
        fewer than the threshold of survivors, so every sum it unmasks carries at least that std.
    """

    server_round: int
    nodes: list[int]
    settings: SecureAggregationConfig
    length: int
    seed: int = 0
    clip_norm: float = 0.0
    sum_noise_std: float = 0.0
    session: str = field(default_factory=lambda: token.token_hex(16))
    pk1: dict[int, bytes] = field(default_factory=dict)
    pk2: dict[int, bytes] = field(default_factory=dict)
    lists: dict[int, list[int]] = field(default_factory=dict)  # each sharer's neighbour list, as sent
    digests: dict[int, bytes] = field(default_factory=dict)
    forwards: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # owner -> holder -> share

    def __post_init__(self) -> None:
        sa = self.settings
        self.num_shares, self.threshold = sa.round_threshold(len(self.nodes))
        self.field = S.FieldSpec(sa.clipping_range, sa.quantization_bits, sa.modulus_bits, sa.max_weight)
        self.neighbours = ring(list(self.nodes), self.num_shares, self.seed * 100_003 + self.server_round)
        if len(self.nodes) << self.field.quantization_bits >= self.field.modulus:
            raise RoundSkipped(f"{len(self.nodes)} clients overflow the field of secure_aggregation.modulus_bits")
        self.noise_std = distributed_noise_std(self.sum_noise_std, 1.0, self.threshold)
        if self.noise_std > 0 and not S.holds_noise(len(self.nodes), self.noise_levels, self.field):
            raise RoundSkipped(
                f"{len(self.nodes)} clients' distributed noise overflows the field of secure_aggregation.modulus_bits"
            )
        self.require(set(self.nodes), "nodes sampled")

    @property
    def noise_levels(self) -> float:
        """The std, in levels of the field, of each client's share of the distributed noise."""
        return S.noise_levels(self.noise_std, self.field)

    def require(self, alive: set[int], what: str, needing: set[int] | None = None) -> None:
        """RoundSkipped unless every node of ``needing`` (default: ``alive``) has at least the
        threshold of ``alive`` in its neighbourhood (and ``alive`` is not empty)."""
        needing = alive if needing is None else needing
        short = [n for n in sorted(needing) if len(set(self.neighbours[n]) & alive) < self.threshold]
        if not alive or short:
            raise RoundSkipped(
                f"{len(alive)} of {len(self.nodes)} {what}, below the reconstruction threshold {self.threshold}"
                + (f" in node {short[0]}'s neighbourhood" if short and len(alive) >= self.threshold else "")
            )

    def entries(self, stage: str) -> dict[str, Any]:
        return {S.STAGE: stage, S.SESSION: self.session, S.ROUND: self.server_round}

    # -- advertise-keys ----------------------------------------------------------------------------

    def advertise(self) -> dict[str, Any]:
        f = self.field
        return {
            **self.entries(S.ADVERTISE),
            S.THRESHOLD: self.threshold,
            S.CLIPPING_RANGE: float(f.clipping_range),
            S.QUANTIZATION_BITS: f.quantization_bits,
            S.MODULUS_BITS: f.modulus_bits,
            S.MAX_WEIGHT: float(f.max_weight),
            S.CLIP_NORM: float(self.clip_norm),
            S.NOISE_STD: float(self.noise_std),
        }

    def take_keys(self, node: int, reply: Message) -> None:
        record = check_echo(reply, self.session, S.ADVERTISE)
        keys = [_entry(record, S.PK1, bytes), _entry(record, S.PK2, bytes)]
        for key in keys:
            try:
                if len(key) > MAX_KEY_BYTES:
                    raise ValueError
                bytes_to_public_key(key)
            except Exception:  # cryptography's parse errors: one reason for all
                raise SecAggError("secure aggregation advertise-keys: a public key is malformed") from None
        taken = set(self.pk1.values()) | set(self.pk2.values())
        if keys[0] == keys[1] or set(keys) & taken:
            raise SecAggError("secure aggregation advertise-keys: a public key another node advertised")
        self.pk1[node], self.pk2[node] = keys

    # -- share-keys ----------------------------------------------------------------------------------

    def share_keys(self, node: int) -> dict[str, Any]:
        """The share-keys message of ``node``: its neighbours that sent keys, and their keys."""
        neighbours = [n for n in self.neighbours[node] if n in self.pk1]
        self.lists[node] = neighbours
        return {
            **self.entries(S.SHARE_KEYS),
            S.NEIGHBOURS: neighbours,
            S.NEIGHBOUR_PK1: [self.pk1[n] for n in neighbours],
            S.NEIGHBOUR_PK2: [self.pk2[n] for n in neighbours],
        }

    def take_shares(self, node: int, reply: Message) -> None:
        record = check_echo(reply, self.session, S.SHARE_KEYS)
        destinations = _entry(record, S.DESTINATIONS, list, int)
        ciphertexts = _entry(record, S.CIPHERTEXTS, list, bytes)
        digest = _entry(record, S.SEED_DIGEST, bytes)
        expected = sorted(set(self.lists.get(node, [])) - {node})
        if sorted(destinations) != expected or len(ciphertexts) != len(destinations):
            raise SecAggError("secure aggregation share-keys: its shares are not addressed to its neighbours")
        if len(digest) != 32 or any(not 0 < len(c) <= MAX_CIPHERTEXT_BYTES for c in ciphertexts):
            raise SecAggError("secure aggregation share-keys: a malformed share or seed digest")
        self.digests[node] = digest
        for destination, ciphertext in zip(destinations, ciphertexts):
            self.forwards.setdefault(destination, []).append((node, ciphertext))

    # -- masked-input ------------------------------------------------------------------------------

    def masked_input(self, node: int) -> dict[str, Any]:
        """The record added to ``node``'s train message: the shares its neighbours sent it."""
        forwarded = [(src, c) for src, c in self.forwards.get(node, []) if src in self.digests]
        return {
            **self.entries(S.MASKED_INPUT),
            S.SOURCES: [src for src, _ in forwarded],
            S.CIPHERTEXTS: [c for _, c in forwarded],
        }

    def take_masked(self, node: int, reply: Message) -> None:
        check_echo(reply, self.session, S.MASKED_INPUT)
        arrays = reply.content.array_records.get(P.ARRAYS)
        if arrays is None or list(arrays.keys()) != [S.MASKED]:
            raise SecAggError(f"secure aggregation masked-input: the reply must hold only {S.MASKED!r}")
        array = arrays[S.MASKED]
        if array.dtype != str(self.field.wire_dtype) or tuple(array.shape) != (self.length,):
            raise SecAggError(
                f"secure aggregation masked-input: a masked vector of {array.dtype} {tuple(array.shape)}, "
                f"expected {self.field.wire_dtype} ({self.length},)"
            )
        try:
            vector = array.numpy()
        except Exception:  # bytes that are no array of the declared shape
            raise SecAggError("secure aggregation masked-input: the masked vector's bytes are malformed") from None
        if vector.shape != (self.length,) or vector.dtype != self.field.wire_dtype:
            raise SecAggError("secure aggregation masked-input: the masked vector's bytes are of another shape")
        if self.field.modulus_bits not in (32, 64) and int(vector.max(initial=0)) >= self.field.modulus:
            raise SecAggError("secure aggregation masked-input: a masked entry is outside the field")
        self.masked[node] = vector.astype(np.uint64)

    def after_masking(self) -> None:
        """RoundSkipped unless every node whose secret must be rebuilt keeps the threshold of
        neighbours that sent a masked vector."""
        self.require(set(self.masked), "nodes sent a masked input", set(self.masked) | set(self.dead))

    @property
    def dead(self) -> list[int]:
        """Nodes that shared their keys but sent no usable masked vector."""
        return sorted(set(self.digests) - set(self.masked))

    # -- unmask ------------------------------------------------------------------------------------

    def unmask(self, node: int) -> dict[str, Any]:
        """The unmask message of ``node``: which of the neighbours it holds shares of survived."""
        held = set(self.lists.get(node, []))
        return {
            **self.entries(S.UNMASK),
            S.ACTIVE: sorted(held & set(self.masked)),
            S.DEAD: sorted(held & set(self.dead)),
        }

    def take_unmask(self, node: int, reply: Message) -> None:
        record = check_echo(reply, self.session, S.UNMASK)
        owners = _entry(record, S.OWNERS, list, int)
        shares = _entry(record, S.SHARES, list, bytes)
        asked = self.unmask(node)
        if sorted(owners) != sorted(asked[S.ACTIVE] + asked[S.DEAD]) or len(owners) != len(shares):
            raise SecAggError("secure aggregation unmask: its shares are not of the nodes it was asked for")
        for owner, share in zip(owners, shares):
            # A share opens with the holder's 1-based place in the owner's neighbour list (Flower's layout).
            place = self.lists[owner].index(node) + 1 if node in self.lists.get(owner, []) else -1
            if (
                not 20 <= len(share) <= MAX_SHARE_BYTES
                or (len(share) - 4) % 16
                or share[:4] != place.to_bytes(4, "little", signed=True)
            ):
                raise SecAggError(f"secure aggregation unmask: a malformed share of node {owner}")
        for owner, share in zip(owners, shares):
            self.shares.setdefault(owner, {})[node] = share

    def rebuild(self, owner: int) -> bytes:
        """``owner``'s secret (its seed if it survived, its first key if it dropped) from the shares
        returned, checked against what it committed to; RoundSkipped when it cannot be rebuilt."""
        held = self.shares.get(owner, {})
        if len(held) < self.threshold:
            raise RoundSkipped(f"{len(held)} shares of node {owner} came back, below the threshold {self.threshold}")
        parts = [held[h] for h in sorted(held)][: self.threshold]  # any threshold of them determine it
        if len({len(p) for p in parts}) != 1:
            raise RoundSkipped(f"the shares of node {owner} differ in length: one is forged")
        try:
            secret = combine_shares(parts)
            if owner in self.masked:
                ok = S.seed_digest(secret) == self.digests[owner]
            else:
                secret = S.private_key_of(secret)
                ok = public_key_to_bytes(bytes_to_private_key(secret).public_key()) == self.pk1[owner]
        except Exception:  # a share that combines to no key: the same as a wrong one
            ok = False
        if not ok:
            raise RoundSkipped(f"the shares of node {owner} rebuild no secret it committed to: one is forged")
        return secret

    def total(self) -> np.ndarray:
        """The sum of the survivors' summands: the masked sum minus their self masks and the
        pairwise masks of the nodes that dropped after sharing."""
        size, f = self.length, self.field
        out = S.sum_vectors([self.masked[n] for n in sorted(self.masked)], f)
        for owner in sorted(self.masked):
            out = S.apply_mask(out, S.keystream(S.seed_key(self.rebuild(owner)), self.session, size, f), -1, f)
        for owner in self.dead:
            sk1 = self.rebuild(owner)
            for other in self.lists[owner]:
                if other in self.masked:  # it masked with the dropped node: take that mask back out
                    mask = S.keystream(S.pair_key(sk1, self.pk1[other]), self.session, size, f)
                    out = S.apply_mask(out, mask, -S.pair_sign(other, owner), f)
        return out

    def result(self) -> S.DecodedSum:
        """What the round's sum says (:func:`fedlora.wire.secagg.decode_sum`); RoundSkipped when
        the shares that came back leave a secret below the threshold or the sum is no sum."""
        self.require(set(self.masked), "nodes sent a masked input", set(self.masked) | set(self.dead))
        if self.noise_std > 0 and len(self.masked) < self.threshold:  # what require implies, stated: the noise
            raise RoundSkipped(  # is calibrated for the threshold, never for fewer survivors
                f"{len(self.masked)} survivors carry less distributed noise than the {self.threshold} it is made for"
            )
        try:
            return S.decode_sum(self.total(), len(self.masked), self.field, self.noise_levels)
        except ValueError as err:
            raise RoundSkipped(str(err)) from None
