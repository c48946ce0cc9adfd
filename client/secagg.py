"""The client's stages of secure aggregation (SecAgg+), over fedlora's train messages.

A train message whose content holds the :data:`~fedlora.wire.secagg.RECORD` record is a stage of
the protocol (:mod:`fedlora.server.secagg` sends them in order each round)::

    advertise-keys  make two key pairs (Flower's ECDH keys): pk1 for the pairwise masks, pk2 to
                    encrypt shares to a neighbour; reply both public keys
    share-keys      check the neighbours' keys; draw the self-mask seed; split it and the first
                    secret key into Shamir shares (Flower's), one per neighbour; reply each share
                    encrypted to its neighbour (Flower's Fernet over an ECDH key), and a digest
                    of the seed
    masked-input    decrypt the shares addressed to this node; train as any round does (the
                    message without the record); reply the weighted, clipped, quantized update
                    (plus this node's share of the noise under distributed DP) with the self
                    mask and one pairwise mask per neighbour added, and no tensor
    unmask          reply the seed shares of the neighbours that survived and the key shares of
                    those that dropped (never both for one node), then forget the round

The secrets live in ``Context.state`` (:data:`~fedlora.wire.secagg.STATE`) between the stages of
one round, never in a reply but as shares encrypted to a neighbour, and are cleared after
unmask. A stage out of order, a session that is not the round's, or a malformed value raises:
the node's reply is then an error and the server counts it as dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedlora.model.adapters import from_record
from fedlora.strategies.hooks import split_received
from fedlora.wire import protocol as P
from fedlora.wire import secagg as S

Train = Callable[[Message, Context], Message]


@dataclass
class Secrets:
    """What a node holds between the stages of one round (all of it stays on the node)."""

    session: str
    stage: str
    node: int
    threshold: int
    clipping_range: float
    quantization_bits: int
    modulus_bits: int
    max_weight: float
    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes
    seed: bytes = b""
    neighbours: list[int] = field(default_factory=list)
    neighbour_pk1: list[bytes] = field(default_factory=list)
    neighbour_pk2: list[bytes] = field(default_factory=list)
    #: Shares held for each owner (this node's own among them): seed shares, first-key shares.
    owners: list[int] = field(default_factory=list)
    seed_shares: list[bytes] = field(default_factory=list)
    key_shares: list[bytes] = field(default_factory=list)
    #: Central DP (``privacy.mode = "central"``): the L2 bound of the update; 0 without DP.
    clip_norm: float = 0.0
    #: Distributed DP (``privacy.noise = "distributed"``): the std of this node's share of the noise; 0: none.
    noise_std: float = 0.0

    @property
    def field_spec(self) -> S.FieldSpec:
        return S.FieldSpec(self.clipping_range, self.quantization_bits, self.modulus_bits, self.max_weight)

    def save(self, context: Context) -> None:
        context.state.config_records[S.STATE] = ConfigRecord(asdict(self))

    @classmethod
    def load(cls, context: Context, session: str, after: str) -> Secrets:
        """This round's secrets, whose last stage was ``after``; ValueError otherwise."""
        record = context.state.config_records.get(S.STATE)
        if record is None:
            raise ValueError("secure aggregation: no keys were made for this round on this node")
        secrets = cls(**dict(record))
        if secrets.session != session:
            raise ValueError("secure aggregation: the message names another round's session")
        if secrets.stage != after:
            raise ValueError(f"secure aggregation: expected the stage after {secrets.stage}, got the one after {after}")
        return secrets


def _typed(record: Any, key: str, kind: type | tuple[type, ...], list_of: type | None = None) -> Any:
    """``record[key]``, checked to be of ``kind`` (a list of ``list_of`` when given); ValueError naming it."""
    if key not in record:
        raise ValueError(f"secure aggregation: the message has no {key!r}")
    value = record[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (kind,))
    if ok and list_of is not None:
        ok = all(isinstance(v, list_of) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ValueError(f"secure aggregation: {key!r} has the wrong type")
    return value


def advertise(record: Any, node: int) -> tuple[Secrets, dict[str, Any]]:
    """Stage advertise-keys: fresh key pairs; (the secrets, the reply's entries)."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    secrets = Secrets(
        session=_typed(record, S.SESSION, str),
        stage=S.ADVERTISE,
        node=node,
        threshold=_typed(record, S.THRESHOLD, int),
        clipping_range=float(_typed(record, S.CLIPPING_RANGE, float)),
        quantization_bits=_typed(record, S.QUANTIZATION_BITS, int),
        modulus_bits=_typed(record, S.MODULUS_BITS, int),
        max_weight=float(_typed(record, S.MAX_WEIGHT, float)),
        sk1=private_key_to_bytes(sk1),
        pk1=public_key_to_bytes(pk1),
        sk2=private_key_to_bytes(sk2),
        pk2=public_key_to_bytes(pk2),
        clip_norm=float(_typed(record, S.CLIP_NORM, float)),
        noise_std=float(_typed(record, S.NOISE_STD, float)),
    )
    if (
        secrets.clip_norm < 0
        or not 0 <= secrets.noise_std < math.inf
        or (secrets.noise_std > 0 and secrets.clip_norm == 0)
        or secrets.threshold < 2
        or not 2 <= secrets.quantization_bits < secrets.modulus_bits <= 62
    ):
        raise ValueError("secure aggregation: the threshold or field the server asks for is unsafe")
    return secrets, {S.PK1: secrets.pk1, S.PK2: secrets.pk2}


def share_keys(secrets: Secrets, record: Any) -> dict[str, Any]:
    """Stage share-keys: Shamir shares of the self-mask seed and of sk1, one per neighbour (in the
    order of the neighbour list), each encrypted to its neighbour; the reply's entries."""
    neighbours = _typed(record, S.NEIGHBOURS, list, int)
    pk1s = _typed(record, S.NEIGHBOUR_PK1, list, bytes)
    pk2s = _typed(record, S.NEIGHBOUR_PK2, list, bytes)
    if not len(neighbours) == len(pk1s) == len(pk2s) or len(set(neighbours)) != len(neighbours):
        raise ValueError("secure aggregation: the neighbour list and its keys do not match")
    if len(neighbours) < secrets.threshold:
        raise ValueError(f"secure aggregation: {len(neighbours)} neighbours, below the threshold {secrets.threshold}")
    if len(set(pk1s) | set(pk2s)) != 2 * len(neighbours):
        raise ValueError("secure aggregation: two neighbours advertise the same key")
    if secrets.node not in neighbours:
        raise ValueError("secure aggregation: this node is not among its own neighbours")
    me = neighbours.index(secrets.node)
    if (pk1s[me], pk2s[me]) != (secrets.pk1, secrets.pk2):
        raise ValueError("secure aggregation: the server relays other keys for this node than it made")
    secrets.seed = os.urandom(S.SEED_BYTES)
    seed_shares = create_shares(secrets.seed, secrets.threshold, len(neighbours))
    key_shares = create_shares(S.scalar_of(secrets.sk1), secrets.threshold, len(neighbours))
    own = bytes_to_private_key(secrets.sk2)
    destinations, ciphertexts = [], []
    for i, other in enumerate(neighbours):
        if other == secrets.node:
            secrets.owners, secrets.seed_shares, secrets.key_shares = [other], [seed_shares[i]], [key_shares[i]]
            continue
        key = generate_shared_key(own, bytes_to_public_key(pk2s[i]))
        plaintext = share_keys_plaintext_concat(secrets.node, other, seed_shares[i], key_shares[i])
        destinations.append(other)
        ciphertexts.append(encrypt(key, plaintext))
    secrets.neighbours, secrets.neighbour_pk1, secrets.neighbour_pk2 = list(neighbours), list(pk1s), list(pk2s)
    secrets.stage = S.SHARE_KEYS
    return {S.DESTINATIONS: destinations, S.CIPHERTEXTS: ciphertexts, S.SEED_DIGEST: S.seed_digest(secrets.seed)}


def receive_shares(secrets: Secrets, record: Any) -> list[int]:
    """Decrypt the shares the server forwards (masked-input); the neighbours they came from, with
    whom this node shares a pairwise mask. ValueError for a share that is not from its sender to
    this node, or when fewer than the threshold remain."""
    sources = _typed(record, S.SOURCES, list, int)
    ciphertexts = _typed(record, S.CIPHERTEXTS, list, bytes)
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise ValueError("secure aggregation: the forwarded shares do not match their sources")
    if len(sources) + 1 < secrets.threshold:
        raise ValueError(f"secure aggregation: shares from {len(sources)} neighbours, below the threshold")
    own = bytes_to_private_key(secrets.sk2)
    for source, ciphertext in zip(sources, ciphertexts):
        if source not in secrets.neighbours or source == secrets.node:
            raise ValueError(f"secure aggregation: a share from node {source}, not a neighbour")
        pk2 = secrets.neighbour_pk2[secrets.neighbours.index(source)]
        try:
            plaintext = decrypt(generate_shared_key(own, bytes_to_public_key(pk2)), ciphertext)
        except Exception:  # Fernet's InvalidToken, a malformed token: one reason either way
            raise ValueError(f"secure aggregation: the share from node {source} does not decrypt") from None
        src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (src, dst) != (source, secrets.node):
            raise ValueError(f"secure aggregation: the share from node {source} names nodes {src} -> {dst}")
        secrets.owners.append(source)
        secrets.seed_shares.append(seed_share)
        secrets.key_shares.append(key_share)
    return list(sources)


def masked_vector(
    secrets: Secrets,
    partners: list[int],
    delta: np.ndarray,
    num_examples: int,
    loss: float,
    rng: np.random.Generator,
    noise_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The masked summand of this node (:func:`fedlora.wire.secagg.mask_input`). Under central DP
    the update is first clipped to ``clip_norm`` (L2) and weighs as every other (DP-FedAvg's
    equal weights: the sensitivity of the sum is the clip). Under distributed DP this node's share
    of the noise is added in the field (:func:`fedlora.wire.secagg.noised_input`), drawn from
    ``noise_rng`` (default: seeded from the OS's entropy: the server knows the run's seeds, and a
    noise it could replay it could subtract)."""
    spec = secrets.field_spec
    if secrets.clip_norm > 0:
        norm = float(np.linalg.norm(delta))
        delta = delta * min(1.0, secrets.clip_norm / norm) if norm > 0 else delta
        num_examples = math.ceil(spec.max_weight)
    encoded = S.encode_input(delta, num_examples, loss, spec, rng)
    if secrets.noise_std > 0:
        noise_rng = noise_rng if noise_rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32)))
        encoded = S.noised_input(encoded, secrets.noise_std, spec, noise_rng)
    keys = {p: S.pair_key(secrets.sk1, secrets.neighbour_pk1[secrets.neighbours.index(p)]) for p in partners}
    secrets.stage = S.MASKED_INPUT
    return S.mask_input(encoded, secrets.seed, keys, secrets.node, secrets.session, spec)


def unmask(secrets: Secrets, record: Any) -> dict[str, Any]:
    """Stage unmask: the seed share of every surviving neighbour and the key share of every dropped
    one; ValueError when the request is inconsistent or leaves fewer than the threshold."""
    active = _typed(record, S.ACTIVE, list, int)
    dead = _typed(record, S.DEAD, list, int)
    if set(active) & set(dead) or not set(active) | set(dead) <= set(secrets.owners):
        raise ValueError("secure aggregation: the unmask request names a node twice or one this node holds nothing of")
    if len(active) < secrets.threshold:
        raise ValueError(f"secure aggregation: {len(active)} surviving neighbours, below the threshold")
    index = {owner: i for i, owner in enumerate(secrets.owners)}
    shares = [secrets.seed_shares[index[n]] for n in active] + [secrets.key_shares[index[n]] for n in dead]
    return {S.OWNERS: list(active) + list(dead), S.SHARES: shares}


def train_masked(msg: Message, context: Context, secrets: Secrets, record: Any, train: Train) -> Message:
    """Stage masked-input: train on the message as any round does, then reply the masked summand
    in place of the tensors (and only the training time besides)."""
    partners = receive_shares(secrets, record)
    config = msg.content[P.CONFIG]
    # The upload is the field vector: train and reply on an exact wire, the vector replaces the tensors.
    config[P.TRANSPORT_DTYPE], config[P.TRANSPORT_QUANTIZE], config[P.ERROR_FEEDBACK] = "float32", "none", False
    received, _ = split_received(from_record(msg.content[P.ARRAYS]))
    reply = train(msg, context)
    if reply.has_error() or P.ARRAYS not in reply.content.array_records:
        raise ValueError("secure aggregation: local training gave no tensors")
    trained = from_record(reply.content[P.ARRAYS])
    if set(trained) != set(received):
        raise ValueError("secure aggregation: the trained tensors are not the ones received")
    spec = S.layout(received)
    delta = S.flatten(trained, spec) - S.flatten(received, spec)
    metrics = dict(reply.content[P.METRICS])
    rng = np.random.default_rng([int(config[P.SEED]) & 0xFFFFFFFF, secrets.node & 0xFFFFFFFF])
    vector = masked_vector(secrets, partners, delta, int(metrics[P.NUM_EXAMPLES]), float(metrics[P.TRAIN_LOSS]), rng)
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({S.MASKED: Array(vector)}),
            P.METRICS: MetricRecord({P.TRAIN_SECONDS: float(metrics.get(P.TRAIN_SECONDS, 0.0))}),
        }
    )
    return Message(content=content, reply_to=msg)


def handle(msg: Message, context: Context, train: Train) -> Message:
    """Answer one stage of secure aggregation (see the module docstring)."""
    record = msg.content.config_records[S.RECORD]
    stage = _typed(record, S.STAGE, str)
    session = _typed(record, S.SESSION, str)
    node = msg.metadata.dst_node_id
    del msg.content[S.RECORD]  # the masked-input stage trains on the message as it would be without it
    reply: Message | None = None
    if stage == S.ADVERTISE:
        secrets, entries = advertise(record, node)
    elif stage == S.SHARE_KEYS:
        secrets = Secrets.load(context, session, S.ADVERTISE)
        entries = share_keys(secrets, record)
    elif stage == S.MASKED_INPUT:
        secrets = Secrets.load(context, session, S.SHARE_KEYS)
        reply, entries = train_masked(msg, context, secrets, record, train), {}
    elif stage == S.UNMASK:
        secrets = Secrets.load(context, session, S.MASKED_INPUT)
        entries = unmask(secrets, record)
    else:
        raise ValueError(f"secure aggregation: unknown stage {stage!r}")
    if stage == S.UNMASK:
        del context.state.config_records[S.STATE]  # the round is over: nothing of it stays
    else:
        secrets.save(context)
    if reply is None:
        reply = Message(content=RecordDict(), reply_to=msg)
    entries.update({S.STAGE: stage, S.SESSION: session})
    reply.content[S.RECORD] = ConfigRecord(entries)
    return reply


def is_stage(msg: Message) -> bool:
    """Whether ``msg`` is a stage of secure aggregation (it holds the protocol's record)."""
    return S.RECORD in msg.content.config_records
