"""FedEx-LoRA: averaged factors plus the exact residual folded into the frozen weight.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models" (arXiv 2410.09432). The server averages A and B as FedIT does, and adds
the error of that average, ``sum_k p_k s B_k @ A_k - s mean(B) @ mean(A)``, to the frozen
weight, so the global model is exactly the mean of the clients' models while the adapter
keeps its rank. Clients of lower rank (device profiles) are zero-padded before averaging, as
HetLoRA does; the residual keeps the result exact.

The residual is kept as base-delta factors (cumulative, compacted to their numerical rank:
:func:`fedlora.model.lowrank.compact`); a node that holds last round's base receives only the
round's residual (:mod:`.basechain`), a new one the whole base (at most the dense matrices).
The exported adapter folds it in: ``B' = [s B, B_d]``, ``A' = [A; A_d]`` per module, rank
``r + rank(residual)`` with scaling 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.model.adapters import lora_keys, lora_modules
from fedlora.model.lowrank import compact, stack

from .base import ClientUpdate
from .basechain import Increment, fold
from .fedavg import weighted_mean
from .ranks import HeterogeneousRankStrategy, pad
from .registry import register


def fedex_mean(
    state: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FedAvg of the clients' tensors, lower ranks zero-padded to the global adapter's."""
    a_key0 = next(k for k in state if k.endswith(".lora_A.weight"))
    r_max = state[a_key0].shape[0]
    return weighted_mean([pad(u, r_max) for u in updates], weights)


def fedex_increment(
    mean: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    scaling: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, factors of the residual ``sum_k p_k s B_k @ A_k - s B_mean @ A_mean``, compacted
    to their numerical rank."""
    total = float(sum(weights))
    out = {}
    for module in lora_modules(mean):
        a_key, b_key = lora_keys(module)
        terms = [(u[b_key], u[a_key], scaling * float(w) / total) for u, w in zip(updates, weights)]
        terms.append((mean[b_key], mean[a_key], -scaling))
        out[module] = compact(*stack(terms))
    return out


def fedex_aggregate(
    state: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    scaling: float,
    increment: Increment | None = None,
) -> dict[str, torch.Tensor]:
    """Averaged (zero-padded) factors and head, plus the exact residual added to the base delta.

    After this, for every module ``D' + s B_mean @ A_mean = D + sum_k p_k s B_k @ A_k``.
    ``increment`` is :func:`fedex_increment` of the same updates when the caller has it already.
    """
    mean = fedex_mean(state, updates, weights)
    if increment is None:
        increment = fedex_increment(mean, updates, weights, scaling)
    out = dict(state)
    out.update(mean)
    return fold(out, increment)


@register
class FedExLoRA(HeterogeneousRankStrategy):
    """``fedex``: FedAvg of A and B plus the exact residual in the frozen weight (the default
    client half folds the received residual factors into its frozen weights)."""

    name = "fedex"
    secure_aggregation_refusal = "its residual is built from each node's own product B_k A_k"
    central_dp_refusal = (
        "its residual is built from each node's own product B_k A_k, which a single noisy mean of "
        "updates does not provide"
    )
    needs_float_base = True
    #: Its residual makes the model's update exactly the weighted mean of the nodes' products
    #: B_k A_k whatever the factors' average is: a median of the factors would change the split
    #: between factors and residual, not what a hostile node contributes. update_clip does.
    robust_aggregators = ("mean",)
    server_optimizer_refusal = (
        "it folds into the base the residual that makes the averaged factors exactly the mean of the nodes' "
        "models; a server step on the factors after that would break the exactness that is the method"
    )

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        trained, weights = [u.state for u in updates], [u.num_examples for u in updates]
        increment = fedex_increment(fedex_mean(state, trained, weights), trained, weights, self.spec.scaling)
        out = fedex_aggregate(state, trained, weights, self.spec.scaling, increment)
        self.chain.advance(state, increment, out)
        return out
