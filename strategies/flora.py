"""FLoRA: exact aggregation of heterogeneous-rank LoRA by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024 (arXiv 2409.05976). Averaging A and B separately is inexact
(mean(B) @ mean(A) != mean(B @ A)). FLoRA instead stacks the clients' factors,
``B_s = [p_1 s_1 B_1, ..., p_K s_K B_K]`` and ``A_s = [A_1; ...; A_K]``, whose product is exactly
``sum_k p_k s_k B_k @ A_k`` for any mix of ranks, merges it into the frozen base and starts
every client on a fresh LoRA next round.

Here the merged part is the global state's base delta ``D = B_d @ A_d`` (cumulative over
rounds), sent to clients as factors and re-compressed to its numerical rank every round
(:func:`fedlora.model.lowrank.compact`), so its bytes are at most those of the dense matrices; a node
that holds last round's base receives only this round's stacked update
(:mod:`.basechain`). The
fresh LoRA of each round is peft's init drawn from a per-round seed. Weights ``p_k`` are
example counts; each client's scaling is the global ``alpha / r_max`` (see :mod:`.hetlora`).
The exported adapter is the delta itself as a LoRA of rank ``rank(D)`` per module (alpha equal
to that rank), exact on the original base model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.model.adapters import AdapterHost, is_lora_a, is_lora_b, lora_keys, lora_modules, seeded_lora_a
from fedlora.model.lowrank import compact, stack

from .base import ClientUpdate, GlobalView, split_base_delta
from .basechain import Increment, fold
from .fedavg import weighted_mean
from .ranks import HeterogeneousRankStrategy
from .registry import register


def stacked_update(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], scaling: float, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_s, A_s) with ``B_s @ A_s = sum_k w_k * scaling * B_k @ A_k / sum_k w_k`` for ``module``."""
    total = float(sum(weights))
    a_key, b_key = lora_keys(module)
    return stack([(u[b_key], u[a_key], scaling * float(w) / total) for u, w in zip(updates, weights)])


def flora_increment(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], scaling: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, factors ``(B, A)`` of the round's exact weighted mean update: the stacked
    factors compacted to their numerical rank (what a node that holds last round's base receives)."""
    return {m: compact(*stacked_update(updates, weights, scaling, m)) for m in lora_modules(updates[0])}


def flora_aggregate(
    state: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    scaling: float,
    increment: Increment | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the exact weighted mean of the clients' updates into the base delta; average the rest.

    LoRA factors of the returned state are left as they were: the caller re-initialises them.
    ``increment`` is :func:`flora_increment` of the same updates when the caller has it already.
    """
    out = fold(state, increment if increment is not None else flora_increment(updates, weights, scaling))
    others = [{k: v for k, v in u.items() if not (is_lora_a(k) or is_lora_b(k))} for u in updates]
    if others[0]:
        out.update(weighted_mean(others, weights))
    return out


@register
class FLoRA(HeterogeneousRankStrategy):
    """``flora``: stacking aggregation, merged into the base each round; ranks may differ. The
    client half is the default: it folds the received merge (base-delta factors) into its frozen
    weights and trains the fresh LoRA."""

    name = "flora"
    secure_aggregation_refusal = "it stacks each node's own factors"
    central_dp_refusal = (
        "it stacks each node's own factors into the base, which a single noisy mean of updates does not provide"
    )
    needs_float_base = True
    #: It stacks every node's factors (no average of tensors): a median of stacks is not defined.
    robust_aggregators = ("mean",)
    server_optimizer_refusal = (
        "it merges each round's update into the base and restarts the LoRA factors from a fresh init, so "
        "there is no tensor whose change across rounds is a pseudo-gradient"
    )

    def _fresh_lora(self, state: dict[str, torch.Tensor], server_round: int) -> dict[str, torch.Tensor]:
        shapes = {k: tuple(v.shape) for k, v in state.items() if is_lora_a(k)}
        state = dict(state)
        state.update(seeded_lora_a(shapes, self.settings.seed * 1_000_003 + 7_777 + server_round))
        for key in [k for k in state if is_lora_b(k)]:
            state[key] = torch.zeros_like(state[key])
        return state

    def initialize(self, state: dict[str, torch.Tensor], host: AdapterHost | None = None) -> dict[str, torch.Tensor]:
        return self._fresh_lora(state, 0)

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        trained, weights = [u.state for u in updates], [u.num_examples for u in updates]
        increment = flora_increment(trained, weights, self.spec.scaling)
        merged = flora_aggregate(state, trained, weights, self.spec.scaling, increment)
        self.chain.advance(state, increment, merged)
        return self._fresh_lora(merged, server_round)

    def views(self, state: Mapping[str, torch.Tensor]) -> list[GlobalView]:
        adapter, deltas = split_base_delta(state)
        # B is zero after every merge: the model is W0 + D, exported as D alone.
        adapter = {
            k: v
            for k, v in adapter.items()
            if not ((is_lora_a(k) or is_lora_b(k)) and any(k.startswith(m + ".") for m in deltas))
        }
        return [GlobalView(name="", spec=self.spec, state=adapter, base_delta=deltas)]
