"""Aggregation strategies for federated LoRA: one module per strategy, both halves in it.

Each module holds a server half (a :class:`LoRAStrategy`, with its aggregation math in pure
functions), a client half (a :class:`ClientHooks` subclass the generic ClientApp calls around
local training) and, when it has options, a :class:`StrategyOptions` model (pydantic); the module
registers its class once with :func:`register`. ``create(cfg, spec)`` builds the strategy that
``strategy.name`` names.

To add a strategy, write one module like ``ffa.py`` and import it below (or, outside this
package, call :func:`register` before the run starts).
"""

from __future__ import annotations

from .base import ClientUpdate, GlobalView, LoRAStrategy, NodeDirectory, NodeInfo
from .hooks import ClientHooks, NodeStore, TrainGroup
from .options import StrategyOptions, option, require
from .registry import STRATEGIES, create, get_strategy_class, register, unregister
from .settings import StrategySettings

# The built-in strategies register themselves on import.
from .fedavg import FedAvgLoRA, weighted_mean  # noqa: E402  isort: skip
from .ffa import FFALoRA, ffa_aggregate  # noqa: E402  isort: skip
from .federa import FeDeRA, federa_init  # noqa: E402  isort: skip
from .hetlora import HetLoRA, hetlora_aggregate  # noqa: E402  isort: skip
from .fltac import FLTAC, cluster_purity, fltac_aggregate, kmeans  # noqa: E402  isort: skip
from .flora import FLoRA, flora_aggregate  # noqa: E402  isort: skip
from .fedsa import FedSALoRA  # noqa: E402  isort: skip
from .fedex import FedExLoRA, fedex_aggregate  # noqa: E402  isort: skip
from .dpdylora import DPDyLoRA, dylora_aggregate, sample_round_rank  # noqa: E402  isort: skip
from .dpdylora import truncate_adapter, truncate_adapter_dir  # noqa: E402  isort: skip
from .pfedlora import PFedLoRA, load_bundle, pfedlora_aggregate  # noqa: E402  isort: skip
from .slora import SLoRA  # noqa: E402  isort: skip

__all__ = [
    "STRATEGIES",
    "ClientHooks",
    "ClientUpdate",
    "GlobalView",
    "LoRAStrategy",
    "NodeDirectory",
    "NodeInfo",
    "NodeStore",
    "StrategyOptions",
    "TrainGroup",
    "DPDyLoRA",
    "FedAvgLoRA",
    "FFALoRA",
    "FeDeRA",
    "FedExLoRA",
    "FedSALoRA",
    "FLoRA",
    "FLTAC",
    "HetLoRA",
    "PFedLoRA",
    "SLoRA",
    "cluster_purity",
    "StrategySettings",
    "create",
    "dylora_aggregate",
    "federa_init",
    "fedex_aggregate",
    "ffa_aggregate",
    "flora_aggregate",
    "fltac_aggregate",
    "get_strategy_class",
    "hetlora_aggregate",
    "kmeans",
    "load_bundle",
    "option",
    "pfedlora_aggregate",
    "register",
    "require",
    "sample_round_rank",
    "truncate_adapter",
    "truncate_adapter_dir",
    "unregister",
    "weighted_mean",
]
