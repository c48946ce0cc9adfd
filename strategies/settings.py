"""What a strategy reads of the run: its own settings, not the whole configuration.

A strategy decides what each node is sent and how replies combine; for that it needs the seed,
the number of rounds (schedules, the last round's exports), the federation section (sampling
fraction, local budget, learning rate, transport) and the robustness section (the average it may
take), plus its own ``[strategy]`` options. The model, data, privacy and deployment sections are
the runtime's business: a strategy that could read them would grow to depend on them. What a
strategy needs to *refuse* a run (:meth:`~fedlora.strategies.base.LoRAStrategy.check_setup`)
sees the whole configuration once, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.config.run import FederationConfig, RobustnessConfig


@dataclass(frozen=True)
class StrategySettings:
    """The part of a run a strategy instance reads (built by :meth:`of_run`).

    Parameters
    ----------
    seed : int
        ``seed``: every random choice of the strategy derives from it (sampling, seeded factors).
    rounds : int
        ``rounds``: how many rounds the run plans (learning-rate schedules, last-round exports).
    federation : FederationConfig
        ``[federation]``: sampling fraction, local budget, learning rate, transport.
    robustness : RobustnessConfig
        ``[robustness]``: which average of same-shape tensors the strategy takes.
    options : StrategyOptions
        ``[strategy]`` besides ``name``, parsed into the strategy's ``options_class``.
    """

    seed: int
    rounds: int
    federation: FederationConfig
    robustness: RobustnessConfig
    options: Any

    @classmethod
    def of_run(cls, cfg: RunConfig, options: Any) -> StrategySettings:
        """The settings of run ``cfg`` with ``options`` already parsed (a ConfigError names a bad one)."""
        return cls(
            seed=cfg.seed, rounds=cfg.rounds, federation=cfg.federation, robustness=cfg.robustness, options=options
        )

    def replace(self, **changes: Any) -> StrategySettings:
        """A copy with ``changes`` (``rounds`` extended on resume or by ``Strategy.start``)."""
        return dataclasses.replace(self, **changes)
