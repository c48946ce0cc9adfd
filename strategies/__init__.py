"""Aggregation strategies for federated LoRA, one module each, behind a name registry.

``create(cfg, spec)`` builds the strategy that ``strategy.name`` names; new strategies join with
:func:`register`.
"""

from __future__ import annotations

from fedlora.adapters import AdapterSpec
from fedlora.config import RunConfig
from fedlora.errors import ConfigError

from .base import ClientUpdate, GlobalView, LoRAStrategy, NodeInfo
from .fedavg import FedAvgLoRA, weighted_mean
from .ffa import FFALoRA, ffa_aggregate
from .federa import FeDeRA, federa_init
from .fedex import FedExLoRA, fedex_aggregate
from .fedsa import FedSALoRA
from .flora import FLoRA, flora_aggregate
from .fltac import FLTAC, cluster_purity, fltac_aggregate, kmeans
from .hetlora import HetLoRA, hetlora_aggregate

STRATEGIES: dict[str, type[LoRAStrategy]] = {}


def register(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """Make ``cls`` selectable as ``strategy.name = cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (FedAvgLoRA, FFALoRA, FeDeRA, HetLoRA, FLTAC, FLoRA, FedSALoRA, FedExLoRA):
    register(_cls)


def get_strategy_class(name: str) -> type[LoRAStrategy]:
    """The registered class for ``name``; ConfigError listing the known names otherwise."""
    if name not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy.name': unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})"
        )
    return STRATEGIES[name]


def create(cfg: RunConfig, spec: AdapterSpec) -> LoRAStrategy:
    """Instantiate the configured strategy (options validated)."""
    return get_strategy_class(cfg.strategy.name)(cfg, spec)


__all__ = [
    "STRATEGIES", "ClientUpdate", "GlobalView", "LoRAStrategy", "NodeInfo", "FedAvgLoRA", "FFALoRA", "FeDeRA",
    "FedExLoRA", "FedSALoRA", "FLoRA", "FLTAC", "HetLoRA", "cluster_purity", "create", "federa_init", "fedex_aggregate",
    "ffa_aggregate", "flora_aggregate", "fltac_aggregate", "get_strategy_class", "hetlora_aggregate", "kmeans",
    "register", "weighted_mean",
]
