"""FedIT: federated instruction tuning with LoRA, i.e. FedAvg over A and B separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024
(arXiv 2305.05644). Each client trains A and B; the server takes the example-weighted mean of
each factor on its own. Note that mean(B) @ mean(A) is not the mean of the clients' B @ A: the
aggregate is inexact, which is what FFA-LoRA and the exact strategies fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import ClientUpdate, LoRAStrategy
from .registry import register


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of each tensor across ``states``.

    Parameters
    ----------
    states : sequence of mappings from key to Tensor
        One mapping per client; every mapping has the same keys and shapes.
    weights : sequence of float
        Non-negative, not all zero (typically examples per client); normalised here.

    Returns
    -------
    dict of str to Tensor
        ``sum_k w_k * state_k[key] / sum_k w_k`` for every key, accumulated in float64.
    """
    if not states:
        raise ValueError("weighted_mean of no states")
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    w = torch.tensor([float(x) / total for x in weights], dtype=torch.float64)
    out = {}
    for key in states[0]:
        # One stacked contraction per key: a Python loop over a thousand clients costs more
        # than the arithmetic.
        stacked = torch.stack([state[key] for state in states]).to(torch.float64)
        out[key] = torch.tensordot(w, stacked, dims=1).to(torch.float32)
    return out


@register
class FedAvgLoRA(LoRAStrategy):
    """``fedavg``: every client trains and sends A, B (and a trained head); the server averages
    each tensor weighted by the number of examples. The client half is the default
    :class:`~fedlora.strategies.hooks.ClientHooks`: train what was received, send it back."""

    name = "fedavg"
    #: Secure aggregation serves it: each factor is the weighted mean of the replies: the masked sum of the weighted
    #: updates gives it exactly.
    secure_aggregation_refusal = ""
    #: Each factor is averaged on its own, coordinate by coordinate: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: Every factor is kept by the server and replaced by its average: aggregate - old is a
    #: pseudo-gradient of each tensor (FedOpt as Reddi et al. define it).
    server_optimizer_refusal = ""

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        averaged = self.average(weighted_mean)([u.state for u in updates], [u.num_examples for u in updates])
        state.update(averaged)
        return state
