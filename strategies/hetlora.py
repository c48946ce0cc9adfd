"""HetLoRA: heterogeneous-rank LoRA with zero-padding, sparsity-weighted aggregation and
local rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024 (arXiv 2401.06432). The server keeps the global adapter at the largest rank
``r_max`` (``lora.rank``); client k trains rank ``r_k <= r_max`` (its device profile) on the
first ``r_k`` components: A[:r_k, :] and B[:, :r_k]. Replies are zero-padded back to ``r_max``
and combined with weights proportional to the Frobenius norm of each client's update
``||scaling * B_k @ A_k||_F`` (the paper's sparsity weights: clients whose update is larger
carry more information). During local training a client penalises the norm of its tail
components ``[floor(gamma * r_k), r_k)``; when, after training, the tail carries less than
``threshold`` of the update's norm, the client prunes its rank to ``floor(gamma * r_k)`` (never
below ``min_rank``) and keeps it for later rounds.

Scaling convention: every client uses the global scaling ``alpha / r_max`` (see
:mod:`.ranks`), so a truncated adapter is exactly the first components of the global one and
padding changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.model.adapters import AdapterSpec, is_lora_a, is_lora_b, lora_keys, lora_modules
from fedlora.wire.protocol import RANK

from .base import ClientUpdate
from .fedavg import weighted_mean
from .hooks import ClientHooks
from .options import StrategyOptions, option, require
from .ranks import HeterogeneousRankStrategy
from .registry import register
from .settings import StrategySettings

# Round config keys: the pruning settings the server sends with every train message.
PRUNE_GAMMA = "prune-gamma"
PRUNE_THRESHOLD = "prune-threshold"
PRUNE_LAMBDA = "prune-lambda"
MIN_RANK = "min-rank"


def update_norm(state: Mapping[str, torch.Tensor], scaling: float) -> float:
    """Frobenius norm of the whole update: sqrt(sum over modules ||scaling * B @ A||_F^2).

    Computed from the r x r Gram matrices, ``||B A||_F^2 = sum((A A^T) * (B^T B))``, which costs
    r^2 (in + out) instead of forming the out x in product.
    """
    total = 0.0
    for module in lora_modules(state):
        a_key, b_key = lora_keys(module)
        a, b = state[a_key].to(torch.float64), state[b_key].to(torch.float64)
        total += float(((a @ a.T) * (b.T @ b)).sum())
    return abs(scaling) * math.sqrt(max(total, 0.0))


def sparsity_weights(states: Sequence[Mapping[str, torch.Tensor]], scaling: float) -> list[float]:
    """HetLoRA's aggregation weights: each client's update norm over the sum of all (sum to 1).

    All-zero updates fall back to equal weights.
    """
    norms = [update_norm(s, scaling) for s in states]
    total = sum(norms)
    if total <= 0:
        return [1.0 / len(states)] * len(states)
    return [n / total for n in norms]


def hetlora_aggregate(
    state: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], scaling: float
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Pad every client's factors to the global rank and take their sparsity-weighted sum.

    Parameters
    ----------
    state : mapping
        The current global state at rank ``r_max``.
    updates : sequence of mappings
        The clients' trained tensors, each at its own rank.
    scaling : float
        The common scaling ``alpha / r_max``.

    Returns
    -------
    tuple
        New global state and the weights used (in the order of ``updates``).
    """
    a_key = next(k for k in state if is_lora_a(k))
    r_max = state[a_key].shape[0]
    weights = sparsity_weights(updates, scaling)
    out = dict(state)
    # Zero-padding then averaging equals summing each rank group into the leading components,
    # which spares a padded copy of every reply.
    by_rank: dict[int, list[int]] = {}
    for i, update in enumerate(updates):
        by_rank.setdefault(int(next(v for k, v in update.items() if is_lora_a(k)).shape[0]), []).append(i)
    groups = {
        rank: (
            weighted_mean([updates[i] for i in members], [weights[i] for i in members]),
            sum(weights[i] for i in members),
        )
        for rank, members in by_rank.items()
    }
    for key in updates[0]:
        shape = list(updates[0][key].shape)
        if is_lora_a(key) or is_lora_b(key):
            shape[0 if is_lora_a(key) else 1] = r_max
        acc = torch.zeros(shape, dtype=torch.float64)
        for rank, (mean, share) in groups.items():
            part = mean[key].to(torch.float64)
            if is_lora_a(key):
                acc[:rank] += share * part
            elif is_lora_b(key):
                acc[:, :rank] += share * part
            else:
                acc += share * part
        out[key] = acc.to(torch.float32)
    return out, weights


def tail_penalty(params: Mapping[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Differentiable sum over modules of ``||B[:, keep:] @ A[keep:, :]||_F`` (the tail's update)."""
    total = None
    for module in lora_modules(params):
        a_key, b_key = lora_keys(module)
        tail = params[b_key][:, keep:] @ params[a_key][keep:, :]
        term = torch.linalg.matrix_norm(tail)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def tail_ratio(state: Mapping[str, torch.Tensor], keep: int) -> float:
    """Share of the update's Frobenius norm carried by components ``[keep, r)``."""
    full = update_norm(state, 1.0)
    if full == 0.0:
        return 0.0
    tail = {k: (v[keep:] if is_lora_a(k) else v[:, keep:]) for k, v in state.items() if is_lora_a(k) or is_lora_b(k)}
    return update_norm(tail, 1.0) / full


def self_prune(
    state: Mapping[str, torch.Tensor], rank: int, *, gamma: float, threshold: float, min_rank: int
) -> tuple[dict[str, torch.Tensor], int]:
    """HetLoRA's local rank self-pruning after a round of training.

    Parameters
    ----------
    state : mapping
        The client's trained tensors at ``rank``.
    rank : int
        Its current rank.
    gamma : float
        Decay factor in (0, 1): a pruned rank is ``floor(gamma * rank)``.
    threshold : float
        Prune when the tail ``[floor(gamma * rank), rank)`` carries less than this share of the
        update's norm.
    min_rank : int
        Never prune below this.

    Returns
    -------
    tuple
        The state (tail components zeroed when pruned, shapes unchanged) and the new rank.
    """
    keep = max(min_rank, int(math.floor(gamma * rank)))
    if keep >= rank or tail_ratio(state, keep) >= threshold:
        return dict(state), rank
    out = {}
    for key, value in state.items():
        if is_lora_a(key):
            value = value.clone()
            value[keep:] = 0
        elif is_lora_b(key):
            value = value.clone()
            value[:, keep:] = 0
        out[key] = value
    return out, keep


class HetLoRAOptions(StrategyOptions):
    prune_gamma: float = option(0.75, "decay: a pruned rank is floor(gamma * rank); 1 turns pruning off", gt=0, le=1)
    prune_threshold: float = option(
        0.05, "prune when the tail carries less than this share of the update's norm", ge=0, lt=1
    )
    prune_lambda: float = option(0.01, "weight of the tail-norm regulariser in the local loss (0: none)", ge=0)
    min_rank: int = option(1, "never prune below this rank (at most lora.rank)")


class HetLoRAClient(ClientHooks):
    """Client half: penalise the tail components while training; prune them after training when
    they carry little of the update (the new rank goes back in the reply's ``rank``)."""

    def _keep(self, rank: int) -> int:
        return max(int(self.config[MIN_RANK]), int(float(self.config[PRUNE_GAMMA]) * rank))

    def regularizer(self, params, rank):
        lam = float(self.config[PRUNE_LAMBDA])
        if lam <= 0:
            return None
        keep = self._keep(rank)
        return lambda: lam * tail_penalty(params, keep)

    def after_train(self, trained, rank):
        out, new_rank = self_prune(
            trained,
            rank,
            gamma=float(self.config[PRUNE_GAMMA]),
            threshold=float(self.config[PRUNE_THRESHOLD]),
            min_rank=int(self.config[MIN_RANK]),
        )
        return out, {RANK: new_rank}


@register
class HetLoRA(HeterogeneousRankStrategy):
    """``hetlora``: per-client ranks from ``[[federation.profiles]]`` (or ``fedlora-client --rank``),
    global adapter at ``lora.rank``, sparsity-weighted aggregation of zero-padded replies, local
    rank self-pruning (options ``prune_gamma``, ``prune_threshold``, ``prune_lambda``,
    ``min_rank``; ``prune_gamma = 1`` turns pruning off)."""

    name = "hetlora"
    secure_aggregation_refusal = "it weights each node's update by that node's own norms and sizes payloads by rank"
    central_dp_refusal = (
        "it sizes each node's payload by that node's rank and weights updates by their norms, so one "
        "clipped, equally weighted mean cannot stand for its aggregate"
    )
    options_class = HetLoRAOptions
    client_hooks = HetLoRAClient
    #: Its aggregate is a norm-weighted sum of zero-padded factors: a coordinate-wise median would
    #: count a lower rank's padding as votes for zero and drop the sparsity weights that are the
    #: method. update_clip bounds a hostile node here (its norm, hence its weight, is clipped).
    robust_aggregators = ("mean",)
    server_optimizer_refusal = (
        "its zero-padding writes zero, not 'unchanged', into components above the replying nodes' ranks "
        "(shrinking them is the method), so a server step on that change would overshoot past zero and undo "
        "the ranks the nodes prune to"
    )

    def __init__(self, settings: StrategySettings, spec: AdapterSpec, **kwargs: Any) -> None:
        super().__init__(settings, spec, **kwargs)
        self.ranks: dict[int, int] = {}  # ranks the clients pruned themselves to

    @classmethod
    def check_setup(cls, cfg, tasks: list[str]) -> None:
        super().check_setup(cfg, tasks)
        opts = cls.parse_options(cfg.strategy.options)
        require(1 <= opts.min_rank <= cfg.lora.rank, "min_rank", f"must be in [1, lora.rank], got {opts.min_rank}")

    def node_rank(self, node_id: int) -> int:
        return self.ranks.get(node_id, super().node_rank(node_id))

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        return {
            PRUNE_GAMMA: float(self.options.prune_gamma),
            PRUNE_THRESHOLD: float(self.options.prune_threshold),
            PRUNE_LAMBDA: float(self.options.prune_lambda),
            MIN_RANK: int(self.options.min_rank),
        }

    def check_reply(self, node_id: int, metrics: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
        # The reply's rank is the node's next payload size: never above what it trained, never
        # below the run's min_rank (a pruned node cannot go under it).
        if RANK in metrics:
            rank, trained = metrics[RANK], self.node_rank(node_id)
            least = min(self.options.min_rank, trained)
            if not isinstance(rank, int) or not least <= rank <= trained:
                raise ValueError(f"{RANK} must be in [{least}, {trained}], got {rank!r:.40}")

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        new_state, weights = hetlora_aggregate(state, [u.state for u in updates], self.spec.scaling)
        for update, weight in zip(updates, weights):
            trained = self.node_rank(update.node_id)
            reported = int(update.metrics.get(RANK, trained))
            self.ranks[update.node_id] = max(1, min(reported, trained))
            self._client_facts[update.node_id] = {
                "aggregation_weight": round(weight, 6),
                "rank_trained": trained,
                "rank_next": self.ranks[update.node_id],
            }
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": {str(k): v for k, v in self.ranks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ranks = {int(k): int(v) for k, v in state.get("ranks", {}).items()}
