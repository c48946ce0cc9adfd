"""FFA-LoRA: federated freeze-A LoRA.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv 2403.12313). Every client's A is the same seeded random init, frozen; only B (and a
trained head) is trained and sent. Because A is shared, the mean of the clients' updates
(alpha / r) * B_k @ A equals (alpha / r) * mean(B_k) @ A: averaging B is exact, and each round
carries half the LoRA bytes of FedIT at the same rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedlora.model.adapters import is_lora_a, seeded_lora_a

from .base import ClientUpdate, LoRAStrategy
from .fedavg import weighted_mean
from .hooks import ClientHooks, TrainGroup
from .options import StrategyOptions, option
from .registry import register
from .robust import Reducer

#: Round config key: the seed of the shared frozen A, from which every client rebuilds it.
A_SEED = "a-seed"


def ffa_aggregate(
    state: Mapping[str, torch.Tensor],
    updates: list[Mapping[str, torch.Tensor]],
    weights: list[float],
    mean: Reducer = weighted_mean,
) -> dict[str, torch.Tensor]:
    """New global state: the frozen A factors unchanged, every sent tensor (B, head) averaged.

    Parameters
    ----------
    state : mapping from key to Tensor
        Current global state, including the shared A factors.
    updates : list of mappings
        The clients' trained tensors (never containing an A factor).
    weights : list of float
        Example counts per client.
    mean : callable
        The average of the sent tensors (weighted mean, or a robust reducer).
    """
    if any(is_lora_a(k) for u in updates for k in u):
        raise ValueError("FFA-LoRA clients must not send A factors")
    out = dict(state)
    out.update(mean(updates, weights))
    return out


class FFAOptions(StrategyOptions):
    a_seed: int | None = option(None, "seed of the shared frozen A factors (default: the run's seed)")


class FFAClient(ClientHooks):
    """Client half: rebuild the shared frozen A from its seed (it never travels), train B."""

    def frozen(self, shapes, group: TrainGroup) -> dict[str, torch.Tensor]:
        untrained = {k: s for k, s in shapes.items() if k not in group.tensors}
        return seeded_lora_a(untrained, int(self.config[A_SEED]))


@register
class FFALoRA(LoRAStrategy):
    """``ffa``: A frozen at a seeded init shared by all (option ``a_seed``, default the run seed),
    only B and the head travel."""

    name = "ffa"
    #: Secure aggregation serves it: B (and the head) is the weighted mean of the replies over the shared A: the masked
    #: sum gives it exactly.
    secure_aggregation_refusal = ""
    options_class = FFAOptions
    client_hooks = FFAClient
    #: Averaging B over a shared A is coordinate-wise (and stays exact for any reducer: A is common).
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: B (and the head) are averaged as FedIT's: a pseudo-gradient; the frozen A never changes, so
    #: its pseudo-gradient is zero and a server step leaves it exactly as it is.
    server_optimizer_refusal = ""

    @property
    def a_seed(self) -> int:
        return self.settings.seed if self.options.a_seed is None else self.options.a_seed

    def initialize(self, state: dict[str, torch.Tensor], host=None) -> dict[str, torch.Tensor]:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        state = dict(state)
        state.update(seeded_lora_a(shapes, self.a_seed))
        return state

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not is_lora_a(k)}

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        return {A_SEED: self.a_seed}

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        return ffa_aggregate(
            state, [u.state for u in updates], [u.num_examples for u in updates], self.average(weighted_mean)
        )
