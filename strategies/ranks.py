"""Clients of different ranks under one global adapter: truncation down, zero-padding up.

Shared by the strategies that accept device profiles (HetLoRA, FLoRA, FedEx-LoRA). The global
adapter has rank ``r_max = lora.rank``; a client of rank ``r_k`` trains the first ``r_k``
components, ``A[:r_k, :]`` and ``B[:, :r_k]``. Every client uses the global scaling
``alpha / r_max`` (its adapter's alpha is ``alpha * r_k / r_max``), so a truncated adapter is
exactly the leading part of the global one and zero-padding a reply changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from fedlora.model.adapters import AdapterSpec, is_lora_a, is_lora_b, rank_dim
from fedlora.model.lowrank import pad_rank, truncate_rank

from .base import LoRAStrategy
from .settings import StrategySettings


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The rank-``rank`` truncation of every LoRA factor (other tensors unchanged)."""
    return {k: truncate_rank(v, rank, rank_dim(k)) if is_lora_a(k) or is_lora_b(k) else v for k, v in state.items()}


def pad(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Zero-pad every LoRA factor up to ``rank`` (other tensors unchanged)."""
    return {k: pad_rank(v, rank, rank_dim(k)) if is_lora_a(k) or is_lora_b(k) else v for k, v in state.items()}


class HeterogeneousRankStrategy(LoRAStrategy):
    """A strategy whose clients train the rank they report (capped at the global rank) and
    receive the global adapter truncated to it; one truncation per rank per round is shared by
    all the nodes of that rank."""

    heterogeneous_ranks = True
    needs_node_info = True

    def __init__(self, settings: StrategySettings, spec: AdapterSpec, **kwargs) -> None:
        super().__init__(settings, spec, **kwargs)
        self._truncated: dict[int, dict[str, torch.Tensor]] = {}

    def node_rank(self, node_id: int) -> int:
        info = self.nodes.get(node_id)
        return min(info.rank, self.spec.rank) if info is not None else self.spec.rank

    def node_spec(self, node_id: int) -> AdapterSpec:
        rank = self.node_rank(node_id)
        return replace(self.spec, rank=rank, alpha=self.spec.alpha * rank / self.spec.rank)

    def configure_train(self, server_round, arrays, config, grid):
        self._truncated = {}
        return super().configure_train(server_round, arrays, config, grid)

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rank = self.node_rank(node_id)
        if rank not in self._truncated:
            self._truncated[rank] = truncate(state, rank)
        return self._truncated[rank]
