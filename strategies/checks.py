"""Before anything is built: whether a strategy can run a configuration at all.

Each rule reads one of the class attributes a strategy declares (:class:`LoRAStrategy`'s
``needs_float_base``, ``central_dp_refusal``, ``robust_aggregators`` ...) against the keys it
constrains, and refuses in one line naming the key. Where a message suggests other strategies,
the names come from the registry, so the suggestion stays true as strategies are added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config import RunConfig

    from .base import LoRAStrategy


def check_run(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    """Raise ConfigError naming the first key of ``cfg`` that strategy ``cls`` cannot serve."""
    rules = (_server_optimizer, _float_base, _local_dp, _central_dp, _secure_aggregation, _aggregator, _ranks, _models)
    for rule in rules:
        rule(cls, cfg)


def _those(allowed) -> str:
    """The registered strategy names for which ``allowed(cls)`` holds, for a suggestion."""
    from .registry import STRATEGIES

    return ", ".join(sorted(name for name, other in STRATEGIES.items() if allowed(other)))


def _server_optimizer(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    options = cls.parse_options(cfg.strategy.options)
    if options.server_optimizer != "none" and cls.server_optimizer_refusal:
        raise ConfigError(
            f"config key 'strategy.server_optimizer': strategy '{cls.name}' cannot take a server optimizer: "
            f"{cls.server_optimizer_refusal}; use server_optimizer = 'none'"
        )


def quantized(cfg: RunConfig) -> list[tuple[str, str]]:
    """The keys of ``cfg`` that ask for a quantized base (the run's and each profile's), with
    the quantization asked: what a strategy that changes the base weights must refuse."""
    asked = [("model.quantization", cfg.model.quantization)] + [
        (f"federation.profiles[{i}].quantization", p.quantization) for i, p in enumerate(cfg.federation.profiles)
    ]
    return [(key, quantization) for key, quantization in asked if quantization not in ("", "none")]


def _float_base(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    for key, quantization in quantized(cfg) if cls.needs_float_base else []:
        raise ConfigError(
            f"config key '{key}': strategy '{cls.name}' folds updates into the frozen base weights, "
            f"which cannot be done exactly on a {quantization} base; use quantization = 'none'"
        )


def _local_dp(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    if cfg.privacy.mode == "local" and cls.local_dp_refusal:
        raise ConfigError(f"config key 'privacy.mode': strategy '{cls.name}' {cls.local_dp_refusal}")


def _central_dp(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    if cfg.privacy.mode == "central" and cls.central_dp_refusal:
        raise ConfigError(
            f"config key 'privacy.mode': strategy '{cls.name}' cannot run under central (user-level) DP: "
            f"{cls.central_dp_refusal}; use privacy.mode = 'local' or {_those(lambda c: not c.central_dp_refusal)}"
        )


def _secure_aggregation(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    if cfg.secure_aggregation.enabled and cls.secure_aggregation_refusal:
        served = _those(lambda c: not c.secure_aggregation_refusal)
        raise ConfigError(
            f"config key 'secure_aggregation.mode': strategy '{cls.name}' cannot run under secure aggregation: "
            f"{cls.secure_aggregation_refusal}; use mode = 'off' or {served}"
        )


def _aggregator(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    aggregator = cfg.robustness.aggregator
    if aggregator not in cls.robust_aggregators:
        raise ConfigError(
            f"config key 'robustness.aggregator': strategy '{cls.name}' cannot aggregate by {aggregator!r} "
            f"(it allows {', '.join(cls.robust_aggregators)}); use update_clip to bound hostile updates instead"
        )
    if aggregator != "mean" and cfg.privacy.mode == "central":
        raise ConfigError(
            "config key 'robustness.aggregator': central DP releases one noisy mean of clipped updates; "
            "use aggregator = 'mean' (its clip already bounds every node)"
        )


def _ranks(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    ranks = {p.rank for p in cfg.federation.profiles}
    if not cls.heterogeneous_ranks and ranks - {cfg.lora.rank}:
        raise ConfigError(
            f"config key 'federation.profiles': strategy '{cls.name}' trains every client at lora.rank = "
            f"{cfg.lora.rank}; profiles with ranks {sorted(ranks)} need a heterogeneous-rank strategy "
            f"({_those(lambda c: c.heterogeneous_ranks)})"
        )


def _models(cls: type[LoRAStrategy], cfg: RunConfig) -> None:
    """A profile naming another base than ``model.name`` needs a strategy that takes clients of
    different bases (``heterogeneous_models``)."""
    for i, profile in enumerate(cfg.federation.profiles):
        if profile.model and profile.model != cfg.model.name and not cls.heterogeneous_models:
            raise ConfigError(
                f"config key 'federation.profiles[{i}].model': strategy '{cls.name}' aggregates adapters of one "
                f"base model ({cfg.model.name!r}); clients on other bases need strategy "
                f"{_those(lambda c: c.heterogeneous_models)}"
            )
