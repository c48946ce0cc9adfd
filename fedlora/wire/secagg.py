"""Secure aggregation's wire: the message keys of its stages, the field encoding of an update, the masks.

Under ``[secure_aggregation] mode = "secagg+"`` (Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020) a client never sends its tensors. It sends one vector
of integers modulo ``M = 2**modulus_bits``: its weighted, clipped update quantized into
``[0, T]`` (``T = 2**quantization_bits``), followed by three entries that also enter the sum
(its weight, its weighted train loss, the fraction of its coordinates that the clipping range
cut), plus a self mask and pairwise masks that cancel in the sum. What is summed, per client k::

    f_k   = round(min(n_k, max_weight) / max_weight * T) / T        the capped, quantized weight
    u_k   = clip(f_k * (trained_k - received_k), -c, c)             c = clipping_range
    q_k   = stochastic_round((u_k + c) * T / (2c))                  in [0, T]
    extra = [f_k * T, stochastic_round(f_k * loss_k / LOSS_RANGE * T), stochastic_round(cut_k * T)]

so the unmasked sum of ``s`` survivors gives ``sum_k u_k = sum q * 2c / T - s * c``, their total
weight ``sum_k f_k`` and the mean update ``sum_k u_k / sum_k f_k``: exactly the weighted mean a
FedAvg-type strategy takes, with weights ``f_k`` and each coordinate within :func:`error_bound`.
``M`` must exceed ``s * T`` (the configuration checks it against ``federation.clients``).

Under distributed DP (``privacy.noise = "distributed"``) each client also adds integer Skellam
noise to its update's entries (:func:`noised_input`) and zeroes its loss and clipped fraction;
the noisy sum may wrap around the field, and :func:`decode_sum` reads each entry back as the
value nearest the middle of ``[0, s T]`` (:func:`signed_levels`), which the field must hold
with the noise's tails (:func:`holds_noise`).

The masks are keystreams of ChaCha20 (from ``cryptography``) keyed by 32-byte secrets: the self
mask's seed, or a pairwise key from Flower's ECDH + HKDF (:func:`pair_key`). Flower's own
``pseudo_rand_gen`` folds a seed into 32 bits of numpy's Mersenne Twister, which a curious
server could search exhaustively; a stream cipher keyed by the full secret is what the protocol
assumes. Stochastic rounding is seeded here (numpy's ``Generator``) where Flower's ``quantize``
draws from numpy's global state: a run stays repeatable, and what the server sees is masked.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, private_key_to_bytes

# -- the record and its keys (every stage's message and reply carries RECORD) ----------------------
RECORD = "secagg"
STAGE = "stage"
SESSION = "session"  # a fresh token per round: a reply echoes it, so one replayed from another round is known
ROUND = "round"
ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK = "advertise-keys", "share-keys", "masked-input", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK)
# advertise-keys (server -> node): the field and protocol settings; reply: two public keys
THRESHOLD = "threshold"
CLIPPING_RANGE = "clipping-range"
QUANTIZATION_BITS = "quantization-bits"
MODULUS_BITS = "modulus-bits"
MAX_WEIGHT = "max-weight"
CLIP_NORM = "clip-norm"  # central DP: each client clips its update's L2 norm here and weighs 1 (0: no DP)
NOISE_STD = "noise-std"  # distributed DP: the std (update units) of the noise each client adds (0: none)
PK1, PK2 = "pk1", "pk2"  # pk1: pairwise masks; pk2: encrypting shares to a neighbour
# share-keys (server -> node): its neighbours and their keys; reply: encrypted shares, a seed digest
NEIGHBOURS = "neighbours"
NEIGHBOUR_PK1, NEIGHBOUR_PK2 = "neighbour-pk1", "neighbour-pk2"
DESTINATIONS = "destinations"
CIPHERTEXTS = "ciphertexts"
SEED_DIGEST = "seed-digest"  # SHA-256 of the self-mask seed: the server checks what it reconstructs
# masked-input (server -> node: the train message plus the shares addressed to it); reply: MASKED
SOURCES = "sources"
MASKED = "masked"  # the key of the masked vector in the reply's ArrayRecord
# unmask (server -> node): which neighbours survived, which dropped; reply: one share per owner
ACTIVE = "active"
DEAD = "dead"
OWNERS = "owners"
SHARES = "shares"
#: Where a node keeps its secrets between the stages of a round (``Context.state``; cleared after unmask).
STATE = "fedlora-secagg"

#: Bytes of a self-mask seed. Flower's Shamir shares 16-byte blocks after padding (a whole block
#: more on an exact multiple) and combining costs O(threshold^2) per block: 31 bytes (248 bits)
#: take two blocks where 32 would take three. The mask's key is its SHA-256 (:func:`seed_key`).
SEED_BYTES = 31
#: Bytes of a secret key's scalar on Flower's curve (SECP384R1): what is shared instead of its
#: 306-byte PEM (4 blocks instead of 20).
SCALAR_BYTES = 48
#: A train loss enters the sum clipped to ``[0, LOSS_RANGE]`` (cross-entropy of any real vocabulary).
LOSS_RANGE = 64.0
#: Entries after the update: weight, weighted loss, clipped fraction.
EXTRAS = 3
#: Distributed noise: the sum of ``s`` clients' noise is read back within this many of its stds
#: (a coordinate beyond it has probability below 1e-30): what the field must hold besides the sum.
NOISE_TAIL = 12.0
#: The largest std, in levels, of one client's noise: numpy draws Poisson means up to about 9e18
#: (a Skellam of std ``L`` draws two of mean ``L**2 / 2``); 1.4e9 levels keeps them below 1e18.
MAX_NOISE_LEVELS = 1.4e9


@dataclass(frozen=True)
class FieldSpec:
    """The integer field an update is encoded in.

    Attributes
    ----------
    clipping_range : float
        c: every coordinate of a weighted update is clipped to ``[-c, c]``.
    quantization_bits : int
        ``T = 2**quantization_bits`` levels per coordinate.
    modulus_bits : int
        ``M = 2**modulus_bits``: the sum is taken modulo M.
    max_weight : float
        Example counts are capped here and scaled by it into ``(0, 1]``.
    """

    clipping_range: float
    quantization_bits: int
    modulus_bits: int
    max_weight: float

    @property
    def target(self) -> int:
        return 1 << self.quantization_bits

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def wire_dtype(self) -> np.dtype:
        """The narrowest unsigned dtype that holds an element of the field."""
        return np.dtype(np.uint32) if self.modulus_bits <= 32 else np.dtype(np.uint64)

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """``values mod M`` as uint64 (uint64 arithmetic wraps mod 2**64, a multiple of M)."""
        return values.astype(np.uint64, copy=False) & np.uint64(self.modulus - 1)


Layout = list[tuple[str, tuple[int, ...]]]


def layout(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """(key, shape) of every tensor, sorted by key: the order both sides flatten in."""
    return [(k, tuple(tensors[k].shape)) for k in sorted(tensors)]


def length(spec: Layout) -> int:
    """Entries of the vector a client sends for ``spec`` (its coordinates and :data:`EXTRAS`)."""
    return sum(int(np.prod(shape)) for _, shape in spec) + EXTRAS


def flatten(tensors: Mapping[str, torch.Tensor], spec: Layout) -> np.ndarray:
    """The tensors of ``spec``, concatenated in its order (float64)."""
    parts = [tensors[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k, _ in spec]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, spec: Layout, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` (tensors of ``dtype``)."""
    out, at = {}, 0
    for key, shape in spec:
        size = int(np.prod(shape))
        out[key] = torch.from_numpy(np.ascontiguousarray(vector[at : at + size])).to(dtype).reshape(shape)
        at += size
    return out


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased rounding of non-negative ``values`` to integers (uint64): up with probability
    equal to the fractional part."""
    low = np.floor(values)
    return (low + (rng.random(values.shape) < values - low)).astype(np.uint64)


def quantize_weight(num_examples: int, field: FieldSpec) -> int:
    """``f * T``: the example count capped at ``max_weight``, in units of ``max_weight / T``
    (at least 1 for a client that trained on anything, so none weighs zero by rounding)."""
    capped = min(max(int(num_examples), 0), field.max_weight)
    return max(1, round(capped / field.max_weight * field.target)) if capped > 0 else 0


def encode_input(
    delta: np.ndarray, num_examples: int, loss: float, field: FieldSpec, rng: np.random.Generator
) -> np.ndarray:
    """One client's summand, unmasked (see the module docstring): its weighted, clipped, quantized
    update ``delta`` (trained minus received, flattened) and the three extra entries (uint64, each
    in ``[0, T]``)."""
    c, t = field.clipping_range, field.target
    q_weight = quantize_weight(num_examples, field)
    weight = q_weight / t
    scaled = weight * np.asarray(delta, dtype=np.float64)
    cut = float(np.mean(np.abs(scaled) > c)) if scaled.size else 0.0
    clipped = np.clip(scaled, -c, c)
    q_update = stochastic_round((clipped + c) * (t / (2 * c)), rng)
    q_loss = stochastic_round(np.array([min(max(weight * float(loss), 0.0), LOSS_RANGE) / LOSS_RANGE * t]), rng)
    q_cut = stochastic_round(np.array([cut * t]), rng)
    return np.concatenate([q_update, np.array([q_weight], dtype=np.uint64), q_loss, q_cut])


@dataclass
class DecodedSum:
    """What the unmasked sum of ``survivors`` clients' summands tells the server (and no more).

    Attributes
    ----------
    mean_update : ndarray
        ``sum_k u_k / sum_k f_k``: the weighted mean update (float64).
    total_weight : float
        ``sum_k f_k`` (in units of ``max_weight``).
    loss : float
        The weighted mean train loss.
    clipped_fraction : float
        The mean, over the survivors, of the fraction of coordinates the clipping range cut.
    """

    mean_update: np.ndarray
    total_weight: float
    loss: float
    clipped_fraction: float


def decode_sum(total: np.ndarray, survivors: int, field: FieldSpec, noise_levels: float = 0.0) -> DecodedSum:
    """Read the unmasked sum (uint64, already mod M) of ``survivors`` summands; ValueError when
    it cannot be one (a total weight of zero, an entry out of the range ``survivors`` give).
    ``noise_levels``: the std, in levels, of the distributed noise each survivor added to its
    update's entries (:func:`noised_input`), whose sum may wrap below 0 or above ``s T``."""
    c, t = field.clipping_range, field.target
    values = np.asarray(total, dtype=np.uint64)
    if survivors < 1 or values.size < EXTRAS or int(values[-EXTRAS:].max()) > survivors * t:
        raise ValueError("the unmasked sum is out of range: the masks did not cancel")
    if noise_levels > 0:
        levels = signed_levels(values[:-EXTRAS], survivors, noise_levels, field)
    elif int(values[:-EXTRAS].max(initial=0)) > survivors * t:
        raise ValueError("the unmasked sum is out of range: the masks did not cancel")
    else:
        levels = values[:-EXTRAS].astype(np.float64)
    q_weight, q_loss, q_cut = (int(v) for v in values[-EXTRAS:])
    if q_weight == 0:
        raise ValueError("the survivors' total weight is zero")
    weight = q_weight / t
    update_sum = levels * (2 * c / t) - survivors * c
    return DecodedSum(
        mean_update=update_sum / weight,
        total_weight=weight,
        loss=q_loss / t * LOSS_RANGE / weight,
        clipped_fraction=q_cut / t / survivors,
    )


# -- distributed noise -----------------------------------------------------------------------------


def noise_levels(std: float, field: FieldSpec) -> float:
    """``std`` (in the update's units) in levels of the field: one level is ``2c / T``."""
    return std * field.target / (2 * field.clipping_range)


def noise_reach(survivors: int, levels: float) -> float:
    """How far, in levels, the sum of ``survivors`` clients' noise of ``levels`` std each is read
    back from the noiseless sum (:data:`NOISE_TAIL` of its stds)."""
    return NOISE_TAIL * float(np.sqrt(survivors)) * levels


def holds_noise(survivors: int, levels: float, field: FieldSpec) -> bool:
    """Whether the field tells the noisy sum of ``survivors`` summands apart from its wraps: the
    sum's range ``[0, s T]`` widened by :func:`noise_reach` on both sides fits below M."""
    return survivors * field.target + 2 * noise_reach(survivors, levels) < field.modulus


def skellam(size: int, levels: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the symmetric Skellam distribution of std ``levels`` (int64): the
    difference of two Poisson draws of mean ``levels**2 / 2``. Integer-valued, so it is added in
    the field exactly, and closed under sums: the survivors' noises add up to a Skellam of the
    summed variance, whose Renyi DP is the Gaussian's up to a small term (Agarwal, Kairouz, Liu,
    "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021)."""
    if levels > MAX_NOISE_LEVELS:
        raise ValueError(f"a noise of {levels:.3g} levels is beyond the Poisson sampler (at most {MAX_NOISE_LEVELS:g})")
    mean = levels * levels / 2
    return rng.poisson(mean, size).astype(np.int64) - rng.poisson(mean, size).astype(np.int64)


def noised_input(encoded: np.ndarray, std: float, field: FieldSpec, rng: np.random.Generator) -> np.ndarray:
    """A summand of :func:`encode_input` with this client's share of the distributed noise: Skellam
    noise of ``std`` (update units) on every update entry, mod M (uint64). The weighted loss and
    the clipped fraction are set to 0: no noise covers them, so they stay on the node; the
    weight (1 under central DP) stays, the server knows the survivors anyway."""
    out = np.asarray(encoded, dtype=np.uint64).copy()
    size = out.size - EXTRAS
    noise = skellam(size, noise_levels(std, field), rng)
    out[:size] = field.reduce(out[:size] + noise.astype(np.uint64))  # int64 -> uint64 wraps mod 2**64
    out[-2:] = 0
    return out


def signed_levels(values: np.ndarray, survivors: int, levels: float, field: FieldSpec) -> np.ndarray:
    """The noisy sum's update entries (mod M) as signed levels (float64): each read as the value
    nearest the middle of ``[0, s T]`` (the noise may carry it below 0, which wraps to near M);
    ValueError for an entry farther out than :func:`noise_reach` (the masks did not cancel)."""
    middle, half = survivors * field.target // 2, field.modulus // 2
    offset = (values.astype(np.int64) - middle) % field.modulus  # in [0, M); M <= 2**62
    offset = np.where(offset >= half, offset - field.modulus, offset)
    if offset.size and np.abs(offset).max() > middle + noise_reach(survivors, levels):
        raise ValueError("the unmasked sum is out of range: the masks did not cancel")
    return (offset + middle).astype(np.float64)


def error_bound(survivors: int, total_weight: float, field: FieldSpec) -> float:
    """The largest error of a coordinate of :attr:`DecodedSum.mean_update` against the exact
    weighted mean (same weights ``f_k``, nothing clipped): each summand's stochastic rounding is
    off by less than one step ``2c / T``."""
    return survivors * (2 * field.clipping_range / field.target) / total_weight


# -- masks ------------------------------------------------------------------------------------------


def keystream(key: bytes, session: str, size: int, field: FieldSpec) -> np.ndarray:
    """``size`` field elements, uniform mod M, from ChaCha20 keyed by the 32-byte ``key`` (the
    nonce binds the round's session)."""
    if len(key) != 32:
        raise ValueError(f"a mask key has 32 bytes, got {len(key)}")
    nonce = bytes(4) + hashlib.sha256(session.encode()).digest()[:12]  # 4-byte block counter at 0
    width = 4 if field.modulus_bits <= 32 else 8
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(size * width))
    return field.reduce(np.frombuffer(stream, dtype=np.uint32 if width == 4 else np.uint64))


def seed_key(seed: bytes) -> bytes:
    """The 32-byte key of the self mask drawn from ``seed``."""
    return hashlib.sha256(b"fedlora-secagg-self-mask" + seed).digest()


def scalar_of(private_pem: bytes) -> bytes:
    """The private scalar of a secret key (PEM, as Flower serializes it): the secret that is shared."""
    return bytes_to_private_key(private_pem).private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def private_key_of(scalar: bytes) -> bytes:
    """The secret key (PEM) of a rebuilt scalar; ValueError for one that is no key of the curve."""
    if len(scalar) != SCALAR_BYTES:
        raise ValueError("a secret key's scalar has 48 bytes")
    return private_key_to_bytes(ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1()))


def pair_key(own_sk1: bytes, other_pk1: bytes) -> bytes:
    """The 32-byte pairwise mask key of two nodes (Flower's ECDH + HKDF; symmetric in the pair)."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(own_sk1), bytes_to_public_key(other_pk1)))


def pair_sign(own: int, other: int) -> int:
    """+1 when ``own`` adds the pair's mask, -1 when it subtracts it (Flower's convention: the larger id adds)."""
    return 1 if own > other else -1


def apply_mask(values: np.ndarray, mask: np.ndarray, sign: int, field: FieldSpec) -> np.ndarray:
    """``values + sign * mask`` mod M (uint64)."""
    out = values + mask if sign > 0 else values - mask
    return field.reduce(out)


def mask_input(
    encoded: np.ndarray,
    self_seed: bytes,
    pair_keys: Mapping[int, bytes],
    own: int,
    session: str,
    field: FieldSpec,
) -> np.ndarray:
    """The masked vector a client sends: its summand plus its self mask plus, for each neighbour
    it shares a key with, ``pair_sign`` times their pairwise mask, mod M, in the wire dtype."""
    out = field.reduce(encoded)
    out = apply_mask(out, keystream(seed_key(self_seed), session, encoded.size, field), 1, field)
    for other in sorted(pair_keys):
        out = apply_mask(out, keystream(pair_keys[other], session, encoded.size, field), pair_sign(own, other), field)
    return out.astype(field.wire_dtype)


def sum_vectors(vectors: Sequence[np.ndarray], field: FieldSpec) -> np.ndarray:
    """The sum of masked vectors mod M (uint64)."""
    total = np.zeros(vectors[0].size, dtype=np.uint64) if vectors else np.zeros(0, dtype=np.uint64)
    for vector in vectors:
        total = field.reduce(total + vector.astype(np.uint64))
    return total


def seed_digest(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: a client commits to it, the server checks its reconstruction."""
    return hashlib.sha256(seed).digest()
