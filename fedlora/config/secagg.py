"""The ``[secure_aggregation]`` table: SecAgg+ over the round's replies (:mod:`fedlora.server.secagg`).

The keys here are the protocol's knobs (Bell et al. 2020; Flower's ``SecAggPlusWorkflow`` takes the
same): how many neighbours hold a share of each client's secrets, how many of them rebuild one,
and the integer field an update is encoded in. :func:`secure_aggregation_rules` holds the rules
that tie them to the rest of the run (how many clients a round samples, what cannot be computed
without seeing a client's update).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import Field, model_validator

from .errors import check
from .model import ConfigModel

if TYPE_CHECKING:
    from .run import RunConfig

SecAggMode = Literal["off", "secagg+"]
SECAGG_MODES = get_args(SecAggMode)


class SecureAggregationConfig(ConfigModel):
    """Secure aggregation (``[secure_aggregation]``): the server learns the sum of the round's
    updates and nothing about any one client's; see docs/secure-aggregation.md."""

    KEY_PREFIX = "secure_aggregation."
    mode: SecAggMode = Field(
        "off",
        description="``off``, or ``secagg+``: each client sends its weighted, clipped update quantized and masked "
        "(SecAgg+, Bell et al. 2020); the server unmasks only the sum of the survivors'.",
    )
    num_shares: int | None = Field(
        None,
        ge=3,
        description="Neighbours (itself included) that hold a share of each client's secrets; odd (a ring with "
        "as many on each side). Default: SecAgg+'s logarithmic 2 ceil(log2 n) + 1 of a round's n clients (all of "
        "them up to 7); as many as the round has for SecAgg's complete graph.",
    )
    reconstruction_threshold: int | None = Field(
        None,
        ge=2,
        description="Shares that rebuild a secret: a round needs this many survivors in every neighbourhood, "
        "and the server must corrupt this many clients to learn one's update. Default: a majority of the "
        "neighbourhood.",
    )
    clipping_range: float = Field(
        1.0,
        gt=0,
        description="Every coordinate of a client's weighted update (weight x (trained - received)) is clipped to "
        "[-clipping_range, clipping_range] before quantization.",
    )
    quantization_bits: int = Field(
        22, ge=4, le=56, description="Levels per coordinate: 2**quantization_bits over the clipping range."
    )
    modulus_bits: int = Field(
        32,
        ge=8,
        le=62,
        description="The field: sums are taken modulo 2**modulus_bits (4 bytes per coordinate up to 32, else 8); "
        "it must exceed clients x 2**quantization_bits.",
    )
    max_weight: float = Field(
        1000.0,
        gt=0,
        description="Example counts are capped here and quantized inside the sum (no client can claim a larger "
        "weight); a client with more examples counts as max_weight.",
    )
    timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds the server waits for the replies of each key stage (advertise, share, unmask); "
        "the masked-input stage, which trains, waits federation.round_timeout.",
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def round_threshold(self, sampled: int) -> tuple[int, int]:
        """(shares, threshold) for a round of ``sampled`` clients: the neighbourhood size (odd
        unless it is the whole round) and the shares that rebuild a secret."""
        wanted = 2 * math.ceil(math.log2(max(sampled, 2))) + 1 if self.num_shares is None else self.num_shares
        shares = min(wanted, sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1  # a ring has as many neighbours on each side
        threshold = self.reconstruction_threshold or max(2, shares // 2 + 1)
        return shares, threshold

    @model_validator(mode="after")
    def _rules(self) -> SecureAggregationConfig:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        check(shares is None or shares % 2 == 1, "num_shares", f"must be odd (a ring of neighbours), got {shares}")
        check(
            shares is None or threshold is None or threshold <= shares,
            "reconstruction_threshold",
            f"= {threshold} exceeds secure_aggregation.num_shares = {shares}",
        )
        check(
            self.quantization_bits < self.modulus_bits,
            "quantization_bits",
            f"= {self.quantization_bits} must be below secure_aggregation.modulus_bits = {self.modulus_bits}",
        )
        return self


def secure_aggregation_rules(cfg: RunConfig) -> None:
    """The rules between ``[secure_aggregation]`` and the rest of the run (raises the key's error)."""
    sa = cfg.secure_aggregation
    check(
        cfg.privacy.noise == "server" or (sa.enabled and cfg.privacy.mode == "central"),
        "privacy.noise",
        "= 'distributed' needs privacy.mode = 'central' and secure_aggregation.mode = 'secagg+' (the clients "
        f"noise a sum that only the masks hide); got privacy.mode = {cfg.privacy.mode!r}, "
        f"secure_aggregation.mode = {sa.mode!r}",
    )
    if not sa.enabled:
        return
    fed = cfg.federation
    sampled = max(1, min(fed.clients, math.floor(fed.fraction * fed.clients + 0.5)))
    check(sampled >= 2, "federation.clients", "must sample at least 2 clients a round under secure aggregation")
    _, threshold = sa.round_threshold(sampled)
    check(
        threshold <= sampled,
        "secure_aggregation.reconstruction_threshold",
        f"= {threshold} exceeds the {sampled} clients a round samples: every round would be skipped",
    )
    check(
        fed.clients < 2 ** (sa.modulus_bits - sa.quantization_bits),
        "secure_aggregation.modulus_bits",
        f"= {sa.modulus_bits} cannot hold the sum of {fed.clients} clients at quantization_bits = "
        f"{sa.quantization_bits}; raise it to {sa.quantization_bits + fed.clients.bit_length()}",
    )
    refused = [
        ("privacy.mode", cfg.privacy.mode == "local", "a masked reply carries no epsilon; use 'central'"),
        ("robustness.aggregator", cfg.robustness.aggregator != "mean", "a median needs each client's update"),
        ("robustness.update_clip", cfg.robustness.update_clip != "none", "the server sees no update norm"),
        ("federation.error_feedback", fed.error_feedback, "the upload is the masked field vector, not rounded"),
    ]
    for key, bad, why in refused:
        check(not bad, key, f"cannot be used with secure_aggregation.mode = 'secagg+': {why}")
