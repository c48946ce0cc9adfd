"""Aggregation strategies for federated LoRA, one module each, behind a name registry.

``create(cfg, spec)`` builds the strategy that ``strategy.name`` names; new strategies join with
:func:`register`.
"""

from __future__ import annotations

from fedlora.adapters import AdapterSpec
from fedlora.config import RunConfig
from fedlora.errors import ConfigError

from .base import ClientUpdate, LoRAStrategy
from .fedavg import FedAvgLoRA, weighted_mean
from .ffa import FFALoRA, ffa_aggregate

STRATEGIES: dict[str, type[LoRAStrategy]] = {}


def register(cls: type[LoRAStrategy]) -> type[LoRAStrategy]:
    """Make ``cls`` selectable as ``strategy.name = cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (FedAvgLoRA, FFALoRA):
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
    "STRATEGIES", "ClientUpdate", "LoRAStrategy", "FedAvgLoRA", "FFALoRA", "create", "ffa_aggregate",
    "get_strategy_class", "register", "weighted_mean",
]
