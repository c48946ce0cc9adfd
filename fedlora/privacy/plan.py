"""The DP plan of a run, worked out before it trains: what each client's DP-SGD (local DP) or the
server's noisy mean (central DP) will run, the epsilon it ends at, and whether it can learn.

One row per party. Local DP: a client's noise multiplier ``z`` (given, or planned for
``privacy.target_epsilon`` over its steps of the whole run, as the client plans it), its
expected Poisson batch ``B`` and sampling rate ``q = B / examples``, its DP-SGD steps over the
run (if it trains every round), the epsilon that history gives. Central DP: the same for the
federation, with clients for examples, the clients sampled per round for the batch and rounds
for steps.

The **noise-to-signal ratio** of one step is the norm of the noise on the mean gradient (std
``z * C / B`` on each of the ``d`` trained coordinates, norm ``z * C * sqrt(d) / B``) against
the largest norm the clipped signal can have, ``C``: ``rho = z * sqrt(d) / B``. The rule of
thumb (:data:`MAX_NOISE_TO_SIGNAL`): a plan with ``rho > 1`` *cannot learn*. Each step is then
mostly noise; Adam, which scales every coordinate by its running RMS, turns that noise into
full-size steps, and the noise's random walk over the run (``lr * sqrt(d * T)`` under Adam)
outgrows what the signal moves. Raising the expected batch lowers ``rho`` (``z`` grows more
slowly than ``B``), as do a larger epsilon, fewer steps, and fewer trained parameters (a lower
rank, fewer target modules, FFA-LoRA's frozen A).

The run has a second bound (:data:`MAX_RUN_NOISE_TO_SIGNAL`). Over ``T`` steps the signal adds up
(``T`` steps of at most ``C``) while the noise only walks (``sqrt(T)`` steps of ``rho * C``), so
the whole run's ratio is ``rho / sqrt(T)``; with a clipped mean gradient of norm ``a * C`` the
signal outmoves the noise only when ``rho / sqrt(T) < a``. The clipped gradients of different
examples mostly disagree (``a`` well below 1), so a plan whose ``rho / sqrt(T)`` is above 1/10
*cannot learn* either. The bound is calibrated on SST-2 with MiniLM at epsilon 3: 8 steps of 500
(``rho / sqrt(T)`` 0.30) and 32 steps of 500 (0.14) stayed at the majority class while 8 such
steps without DP reached 0.74. Both are rules of thumb, necessary rather than sufficient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from fedlora.config import PrivacyConfig

from .accounting import epsilon, noise_for_target, sample_rate_for


@functools.lru_cache(maxsize=1024)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    return epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


#: The rule of thumb: a step whose noise norm exceeds the clipped signal's cannot learn.
MAX_NOISE_TO_SIGNAL = 1.0
#: The second rule: the whole run's noise (over ``sqrt(T)`` steps) against its summed signal.
MAX_RUN_NOISE_TO_SIGNAL = 0.1
#: The phrase every warning of a plan that cannot learn contains (users and tests grep for it).
CANNOT_LEARN = "cannot learn"
#: Central DP always accounts with RDP over rounds (server/privacy.py).
CENTRAL_ACCOUNTANT = "rdp"


def noise_to_signal(noise_multiplier: float, trained_dim: int, expected_batch: float) -> float:
    """``z * sqrt(d) / B``: one step's noise norm on the mean over the clipped signal's bound.

    Parameters
    ----------
    noise_multiplier : float
        z, the noise std over the clipping bound C.
    trained_dim : int
        d, the number of trained (noised) coordinates.
    expected_batch : float
        B, what the noisy sum is divided by (examples per step, or clients per round).
    """
    return noise_multiplier * math.sqrt(max(trained_dim, 0)) / max(expected_batch, 1e-12)


@dataclass(frozen=True)
class PlanRow:
    """One party's DP plan (see the module doc for the quantities).

    Attributes
    ----------
    who : str
        ``client 3``, ``node 8132...``, or ``federation`` (central DP).
    examples : int
        The client's training rows (central DP: the clients).
    noise_multiplier, sample_rate, epsilon, clip : float
        z, q, the epsilon at the end of the run, C.
    expected_batch : int
        B: examples per DP-SGD step (central DP: clients sampled per round).
    steps : int
        Noisy steps over the run: DP-SGD steps if the client trains every round (central: rounds).
    trained_dim : int
        d, the trained coordinates the noise lands on.
    micro_batches : int
        Forward/backward passes per step (``privacy.physical_batch_size``); 1 for central DP.
    """

    who: str
    examples: int
    noise_multiplier: float
    expected_batch: int
    sample_rate: float
    steps: int
    epsilon: float
    trained_dim: int
    clip: float
    micro_batches: int = 1

    @property
    def noise_std(self) -> float:
        """Std of the noise on each coordinate of the mean gradient (update): ``z * C / B``."""
        return self.noise_multiplier * self.clip / max(self.expected_batch, 1)

    @property
    def noise_to_signal(self) -> float:
        return noise_to_signal(self.noise_multiplier, self.trained_dim, self.expected_batch)

    @property
    def run_noise_to_signal(self) -> float:
        """``rho / sqrt(steps)``: the run's noise against a signal that agreed at every step."""
        return self.noise_to_signal / math.sqrt(max(self.steps, 1))

    @property
    def can_learn(self) -> bool:
        return self.noise_to_signal <= MAX_NOISE_TO_SIGNAL and self.run_noise_to_signal <= MAX_RUN_NOISE_TO_SIGNAL

    def to_dict(self) -> dict[str, Any]:
        extra = {"noise_std": self.noise_std, "noise_to_signal": self.noise_to_signal}
        return {**asdict(self), **extra, "run_noise_to_signal": self.run_noise_to_signal, "can_learn": self.can_learn}


def local_row(
    privacy: PrivacyConfig, who: str, examples: int, batch_size: int, steps_per_round: int, rounds: int, dim: int
) -> PlanRow:
    """A client's local-DP plan, computed as the client computes it (``client/privacy.py``).

    Parameters
    ----------
    privacy : PrivacyConfig
        ``[privacy]`` with ``mode = "local"``.
    who : str
        The client's name in the plan.
    examples, batch_size : int
        Its training rows and ``federation.batch_size`` (the expected Poisson batch).
    steps_per_round, rounds : int
        Its local steps per round (``fedlora.train.local.steps_for``) and the run's rounds.
    dim : int
        The trained coordinates.
    """
    q = sample_rate_for(batch_size, examples)
    steps = steps_per_round * rounds
    z = privacy.noise_multiplier
    if z is None:
        z = noise_for_target(float(privacy.target_epsilon), privacy.delta, q, steps, privacy.accountant)
    batch = max(1, round(q * examples))
    physical = privacy.physical_batch_size
    return PlanRow(
        who=who,
        examples=examples,
        noise_multiplier=float(z),
        expected_batch=batch,
        sample_rate=q,
        steps=steps,
        epsilon=_epsilon(float(z), q, steps, privacy.delta, privacy.accountant),
        trained_dim=dim,
        clip=privacy.max_grad_norm,
        micro_batches=math.ceil(batch / physical) if physical > 0 else 1,
    )


def central_row(privacy: PrivacyConfig, clients: int, sampled: int, rounds: int, dim: int) -> PlanRow:
    """The federation's central-DP plan: ``sampled`` of ``clients`` per round for ``rounds``."""
    q = min(1.0, sampled / max(clients, 1))
    z = privacy.noise_multiplier
    if z is None:
        z = noise_for_target(float(privacy.target_epsilon), privacy.delta, q, rounds, CENTRAL_ACCOUNTANT)
    return PlanRow(
        who="federation",
        examples=clients,
        noise_multiplier=float(z),
        expected_batch=sampled,
        sample_rate=q,
        steps=rounds,
        epsilon=_epsilon(float(z), q, rounds, privacy.delta, CENTRAL_ACCOUNTANT),
        trained_dim=dim,
        clip=privacy.clip_norm,
    )


def format_plan(rows: list[PlanRow], mode: str) -> list[str]:
    """The plan as printed lines: a header, one line per row, then the warning line when a row
    cannot learn (:func:`warning`)."""
    batch = "clients/round" if mode == "central" else "batch"
    lines = [
        f"DP plan ({mode}): z = noise multiplier, rho = z*sqrt(d)/B (one step's noise over the clipped signal; "
        f"it cannot learn above {MAX_NOISE_TO_SIGNAL:g}, or above rho/sqrt(T) = {MAX_RUN_NOISE_TO_SIGNAL:g})"
    ]
    for r in rows:
        lines.append(
            f"  {r.who}: {r.examples} {'clients' if mode == 'central' else 'examples'}  z {r.noise_multiplier:.4g}  "
            f"{batch} {r.expected_batch}  q {r.sample_rate:.4g}  steps {r.steps}  epsilon {r.epsilon:.4g}  "
            f"d {r.trained_dim}  noise std {r.noise_std:.3g}  rho {r.noise_to_signal:.3g}  "
            f"rho/sqrt(T) {r.run_noise_to_signal:.3g}"
            + (f"  micro-batches {r.micro_batches}" if r.micro_batches > 1 else "")
        )
    line = warning(rows, mode)
    return lines + ([line] if line else [])


def warning(rows: list[PlanRow], mode: str) -> str:
    """One line containing :data:`CANNOT_LEARN` and the keys to change, when some row breaks a
    rule (``rho`` over :data:`MAX_NOISE_TO_SIGNAL`, else ``rho / sqrt(T)`` over
    :data:`MAX_RUN_NOISE_TO_SIGNAL`); empty when every row can learn."""
    bad = [r for r in rows if not r.can_learn]
    if not bad:
        return ""
    central = mode == "central"
    party = "plans" if central else "clients"
    fewer = "train fewer parameters (lora.rank, lora.target_modules)"
    step_bad = [r for r in bad if r.noise_to_signal > MAX_NOISE_TO_SIGNAL]
    if step_bad:
        worst = max(step_bad, key=lambda r: r.noise_to_signal)
        need = math.ceil(worst.noise_multiplier * math.sqrt(worst.trained_dim) / MAX_NOISE_TO_SIGNAL)
        unit = "clients per round" if central else "examples per step"
        keys = (
            "sample more clients per round (federation.fraction, federation.clients), raise "
            "privacy.target_epsilon, run fewer rounds"
            if central
            else "raise federation.batch_size, raise privacy.target_epsilon, take fewer steps "
            "(federation.local_steps or federation.local_epochs, rounds)"
        )
        return (
            f"WARNING: this DP plan {CANNOT_LEARN}: {len(step_bad)} of {len(rows)} {party} have rho > "
            f"{MAX_NOISE_TO_SIGNAL:g} ({worst.who}: rho {worst.noise_to_signal:.3g}, the noise on each step's mean "
            f"outweighs the clipped signal; it needs about {need} {unit} at z {worst.noise_multiplier:.3g}); "
            f"{keys}, or {fewer}"
        )
    worst = max(bad, key=lambda r: r.run_noise_to_signal)
    keys = (
        "run more rounds, sample more clients per round (federation.fraction, federation.clients), raise "
        "privacy.target_epsilon"
        if central
        else "take more steps (federation.local_epochs, rounds) at a larger federation.batch_size, raise "
        "privacy.target_epsilon"
    )
    return (
        f"WARNING: this DP plan {CANNOT_LEARN}: {len(bad)} of {len(rows)} {party} have rho/sqrt(T) > "
        f"{MAX_RUN_NOISE_TO_SIGNAL:g} ({worst.who}: {worst.run_noise_to_signal:.3g} over {worst.steps} noisy steps, "
        f"the run's noise outweighs what its clipped gradients can move); {keys}, or {fewer}"
    )
