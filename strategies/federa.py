"""FeDeRA: federated LoRA initialised from the pretrained weights' singular vectors.

Yan et al., "FeDeRA: Efficient Fine-tuning of Language Models in Federated Learning Leveraging
Weight Decomposition" (arXiv 2404.18848). Each target weight ``W`` is split by its truncated
SVD: A and B start from the top-r singular vectors (``scaling * B0 @ A0 = U_r S_r V_r^T``) and
the frozen base becomes the residual ``W - scaling * B0 @ A0``, so at round 0 the model's
outputs equal the pretrained model's. Rounds then average A and B as FedIT does.

The SVD is peft's own PiSSA initialisation (:func:`fedlora.model.lowrank.svd_init`). Every client
computes the residual locally from its copy of the base (``svd-rank`` in the round config), so
it never crosses the network: FeDeRA costs the same bytes as FedIT. The server keeps the delta
``-scaling * B0 @ A0`` in its state (as base-delta factors) for evaluation and export; the
exported adapter folds it in: ``B' = [scaling * B, -scaling * B0]``, ``A' = [A; A0]`` at rank
2r with scaling 1, which loads on the original base model with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterHost, delta_keys, is_base_delta, lora_keys, lora_modules
from fedlora.model.lowrank import svd_init
from fedlora.process import DERIVED, process_state

from .base import ClientUpdate, LoRAStrategy
from .fedavg import weighted_mean
from .hooks import ClientHooks, digest, fold_factors
from .registry import register

#: Round config key: the rank of the SVD whose residual each client makes its frozen base.
SVD_RANK = "svd-rank"


def federa_init(weights: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Round-0 state of every module: SVD-initialised A, B and the base delta that makes the
    frozen weight the residual.

    Parameters
    ----------
    weights : mapping from module path to Tensor
        Pretrained (out x in) weights of the target modules.
    rank, alpha : int, float
        LoRA rank and alpha.

    Returns
    -------
    dict of str to Tensor
        ``lora_A``/``lora_B`` keys and ``base_delta_A``/``base_delta_B`` keys per module, with
        ``W + B_d @ A_d`` the residual and ``scaling * B @ A`` the rank-r SVD approximation.
    """
    scaling = alpha / rank
    out = {}
    for module, weight in weights.items():
        a, b, _ = svd_init(weight, rank, alpha)
        a_key, b_key = lora_keys(module)
        da_key, db_key = delta_keys(module)
        out[a_key], out[b_key] = a, b
        out[da_key], out[db_key] = a.clone(), -scaling * b
    return out


def residual_delta(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """``W_res - W``: what turns the pretrained weight into FeDeRA's residual at ``rank``."""
    _, _, residual = svd_init(weight, rank, float(rank))
    return residual - weight


class FeDeRAClient(ClientHooks):
    """Client half: replace each target weight by its SVD residual, computed here from this
    node's copy of the base (once per process), so it never crosses the network."""

    def base_delta(self, host, modules, factors):
        rank = int(self.config[SVD_RANK])
        dense = {
            m: process_state().get(
                DERIVED,
                ("federa-residual", host.loaded.key, m, rank),
                lambda m=m: residual_delta(host.base_weight(m), rank),
            )
            for m in modules
        }
        for module, delta in fold_factors(factors).items():
            dense[module] = dense[module] + delta if module in dense else delta
        return dense, digest(factors, f"svd{rank}")


@register
class FeDeRA(LoRAStrategy):
    """``federa``: SVD-initialised A and B, residual base, FedAvg of both factors."""

    name = "federa"
    #: Secure aggregation serves it: FedIT's weighted mean of A and B: the masked sum gives it exactly.
    secure_aggregation_refusal = ""
    needs_float_base = True
    client_hooks = FeDeRAClient
    #: FedIT's per-factor average: any coordinate-wise reducer fits.
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: A and B are averaged as FedIT's (a pseudo-gradient); the fixed SVD residual is a base delta,
    #: which the server optimizer never touches.
    server_optimizer_refusal = ""

    def initialize(self, state: dict[str, torch.Tensor], host: AdapterHost | None = None) -> dict[str, torch.Tensor]:
        if host is None:
            raise ValueError("FeDeRA initialises from the base weights: a host is required")
        modules = lora_modules(state)
        try:
            init = federa_init({m: host.base_weight(m) for m in modules}, self.spec.rank, self.spec.alpha)
        except ValueError as err:
            raise ConfigError(
                f"config key 'lora.rank': FeDeRA cannot take a rank-{self.spec.rank} SVD: {err}"
            ) from None
        state = dict(state)
        state.update(init)
        return state

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not is_base_delta(k)}

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        return {SVD_RANK: self.spec.rank}

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        state.update(self.average(weighted_mean)([u.state for u in updates], [u.num_examples for u in updates]))
        return state
