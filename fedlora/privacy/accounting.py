"""Privacy accounting: Opacus accountants, epsilon for a number of steps, the ledger a node keeps.

Two units of privacy, never mixed up in what a run reports:

* ``[privacy] mode = "local"``: **sample-level** DP for each client (DP-SGD on the client,
  :mod:`fedlora.train.dpsgd`). Its :class:`PrivacyLedger` (kept in the node's ``Context.state``)
  counts the steps and an Opacus accountant turns them into the client's epsilon at ``delta``.
* ``mode = "central"``: **user-level** DP for the federation (DP-FedAvg, McMahan et al. 2018,
  :mod:`fedlora.privacy.central`): an RDP accountant over rounds at the client sampling rate
  gives the federation's epsilon.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlora.config import ACCOUNTANTS, PRIVACY_MODES
from fedlora.errors import ConfigError

#: The values of ``privacy.mode`` (declared with the key, in :mod:`fedlora.config`).
MODES = PRIVACY_MODES
#: Privacy units, as the run's guarantee names them.
UNIT = {"local": "sample level for each client", "central": "user level"}
#: PRV accountant's epsilon error (Opacus's default); the same everywhere, so numbers agree.
PRV_EPS_ERROR = 0.01


# -- accounting ---------------------------------------------------------------------------------


def make_accountant(name: str, history: Iterable[Sequence[float]] = ()):
    """An Opacus accountant (``rdp`` or ``prv``) holding ``history`` of (noise, sample rate, steps)."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"config key 'privacy.accountant' must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return accountant


def epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon that Opacus's ``accountant`` gives for ``history`` at ``delta`` (0 for no steps).

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        What the Gaussian mechanism ran, as Opacus accountants record it.
    delta : float
        Target delta.
    accountant : str
        ``rdp`` or ``prv``.
    """
    if not history or all(int(n) == 0 for _, _, n in history):
        return 0.0
    acc = make_accountant(accountant, history)
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


# Clients of one size plan the same noise, and a run's plan repeats their search: each bisection
# over accountant runs (seconds) is done once per process.
@functools.lru_cache(maxsize=1024)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (Opacus's binary search) whose epsilon after ``steps`` steps at
    ``sample_rate`` is at most ``target_epsilon`` (within 0.01 below it)."""
    from opacus.accountants.utils import get_noise_multiplier

    kwargs = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=max(int(steps), 1),
                accountant=accountant,
                epsilon_tolerance=0.01,
                **kwargs,
            )
        )
    except ValueError as err:
        raise ConfigError(f"config key 'privacy.target_epsilon' = {target_epsilon}: {err}") from None


@dataclass
class PrivacyLedger:
    """What one party has spent: Opacus accountant histories, one per disjoint part of its data.

    A client that trains one adapter per task does so on disjoint rows (parallel composition):
    each example is in one part only, so its epsilon is the largest of the parts'. Keeps the
    Opacus accountant interface: :meth:`step`, :meth:`state_dict`, :meth:`from_state`.

    Attributes
    ----------
    history : dict of str to list of [noise_multiplier, sample_rate, steps]
        Per part (``""`` for the whole data).
    """

    history: dict[str, list[list[float]]] = field(default_factory=dict)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1, part: str = "") -> None:
        """Record ``steps`` mechanism runs at ``noise_multiplier`` and ``sample_rate``."""
        runs = self.history.setdefault(part, [])
        if runs and runs[-1][0] == noise_multiplier and runs[-1][1] == sample_rate:
            runs[-1][2] = int(runs[-1][2]) + int(steps)  # same mechanism: Opacus merges these too
        else:
            runs.append([float(noise_multiplier), float(sample_rate), int(steps)])

    def epsilon(self, delta: float, accountant: str) -> float:
        """The guarantee so far: the largest epsilon over the parts."""
        return max((epsilon(h, delta, accountant) for h in self.history.values()), default=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(r) for r in v] for k, v in self.history.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> PrivacyLedger:
        if not state:
            return cls()
        return cls({str(k): [[float(z), float(q), int(n)] for z, q, n in v] for k, v in state["history"].items()})


def guarantee(mode: str, eps: float, delta: float) -> str:
    """The run's guarantee in one sentence."""
    return f"(epsilon, delta) = ({eps:.4g}, {delta:.3g}) at {UNIT[mode]}"


def planned_local_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int, rounds: int, accountant: str
) -> float:
    """Noise multiplier for a client to end the run at ``target_epsilon``, assuming it trains
    every round (the worst case: a client sampled less often ends below the target)."""
    return noise_for_target(target_epsilon, delta, sample_rate, steps_per_round * rounds, accountant)


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate that gives ``batch_size`` examples per step on average."""
    return min(1.0, batch_size / max(num_examples, 1))
