"""Server optimizers: FedOpt on the pseudo-gradient of each round (``strategy.server_optimizer``).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv 2003.00295), Algorithm 2. The
server treats the change its aggregation makes, ``delta = aggregated - old`` (per tensor), as a
pseudo-gradient and takes one step of an optimizer on it instead of jumping to ``aggregated``::

    avgm     m = mu * m + delta                          x = x + lr * m         (FedAvgM, Hsu et al. 2019)
    adam     m = b1 * m + (1 - b1) * delta,  v = b2 * v + (1 - b2) * delta^2
    yogi     m as adam,                      v = v - (1 - b2) * delta^2 * sign(v - delta^2)
    adagrad  m as adam,                      v = v + delta^2
             (adam, yogi, adagrad)           x = x + lr * m / (sqrt(v) + tau)
    none     x = aggregated, bit for bit

Choices, and where Flower (``flwr.serverapp.strategy.FedAdam`` / ``FedYogi`` / ``FedAdagrad``,
flwr 1.41) differs:

* ``v`` starts at ``tau^2`` (the paper's ``v_{-1} >= tau^2``); Flower starts it at 0. With 0, the
  first adaptive step is ``lr * (1 - b1) * delta / (sqrt(1 - b2) |delta| + tau)``, about
  ``lr`` per coordinate whatever the coordinate's scale; ``tau^2`` keeps coordinates whose delta
  is far below ``tau`` from taking that full step.
* No bias correction (the paper's Algorithm 2); Flower's FedAdam applies Adam's
  (``lr * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``), its FedYogi and FedAdagrad do not.
* FedAdagrad keeps the momentum ``m`` with ``b1`` as Algorithm 2 writes it; Flower fixes
  ``b1 = 0`` (set ``strategy.beta1 = 0`` for that).

Default server learning rates: 1.0 for ``none`` / ``avgm`` (``avgm`` with ``server_momentum = 0``
is then FedAvg up to rounding; Flower's FedAvgM uses 1.0 too), ``1e-2`` for the adaptive ones: an
adaptive step moves each coordinate by about ``lr`` per round, and a client running AdamW for
``local_steps`` steps at ``federation.lr`` moves one by at most ``local_steps * lr`` (1e-2 at the
defaults, 10 steps at 1e-3) on LoRA factors whose entries are of order 1e-2 to 1e-1; 1e-2 is also
Flower's FedYogi default. ``tau = 1e-3`` is the paper's (and Flower's) default.

The optimizer works on the tensors it is given; which ones (same shape before and after, not
base-delta factors) is the caller's choice (:meth:`fedlora.strategies.LoRAStrategy.aggregate_updates`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch

#: The values of ``strategy.server_optimizer``.
ServerOptimizerName = Literal["none", "avgm", "adam", "yogi", "adagrad"]
SERVER_OPTIMIZERS = get_args(ServerOptimizerName)
#: Default ``strategy.server_lr`` per optimizer (see the module docstring for why).
DEFAULT_SERVER_LR = {"none": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-2}

_ADAPTIVE = ("adam", "yogi", "adagrad")
_STEPS = "steps"


# -- the math: pure functions over one tensor ----------------------------------------------------


def momentum_step(
    x: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, *, lr: float, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvgM: ``m' = momentum * m + delta``, ``x' = x + lr * m'``; returns ``(x', m')``."""
    m = momentum * m + delta
    return x + lr * m, m


def second_moment(kind: str, v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """The new second moment of ``adam``, ``yogi`` or ``adagrad`` (Reddi et al., Algorithm 2)."""
    sq = delta * delta
    if kind == "adam":
        return beta2 * v + (1 - beta2) * sq
    if kind == "yogi":
        # Yogi moves v toward delta^2 by a step of fixed size (1 - b2) delta^2: v stays >= 0.
        return v - (1 - beta2) * sq * torch.sign(v - sq)
    if kind == "adagrad":
        return v + sq
    raise ValueError(f"not an adaptive server optimizer: {kind!r}")


def adaptive_step(
    kind: str,
    x: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FedAdam / FedYogi / FedAdagrad step on one tensor; returns ``(x', m', v')``.

    ``m' = beta1 * m + (1 - beta1) * delta``, ``v'`` by :func:`second_moment`,
    ``x' = x + lr * m' / (sqrt(v') + tau)``; no bias correction (Algorithm 2).
    """
    m = beta1 * m + (1 - beta1) * delta
    v = second_moment(kind, v, delta, beta2)
    return x + lr * m / (torch.sqrt(v) + tau), m, v


# -- the stateful optimizer ----------------------------------------------------------------------


class ServerOptimizer:
    """FedOpt over a flat state of tensors, one step per round.

    Parameters
    ----------
    kind : str
        One of :data:`SERVER_OPTIMIZERS`.
    lr : float, optional
        Server learning rate (default :data:`DEFAULT_SERVER_LR` of ``kind``).
    momentum : float
        ``avgm``'s momentum.
    beta1, beta2, tau : float
        The adaptive optimizers' decay rates and adaptivity.

    Notes
    -----
    Moments are float32 tensors keyed by the state's keys, created on a key's first step (``m``
    zero, ``v`` ``tau^2``), kept with :meth:`state_dict` (``m/<key>``, ``v/<key>`` and the step
    count) for checkpoints; a key whose shape changed starts its moments afresh.
    """

    def __init__(
        self,
        kind: str = "none",
        lr: float | None = None,
        *,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
        self.kind = kind
        self.lr = DEFAULT_SERVER_LR[kind] if lr is None else float(lr)
        self.momentum, self.beta1, self.beta2, self.tau = float(momentum), float(beta1), float(beta2), float(tau)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    @property
    def active(self) -> bool:
        """False for ``none`` (the aggregate is the new state)."""
        return self.kind != "none"

    def step(self, old: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new values of the keys of ``aggregated``: one optimizer step on ``aggregated - old``.

        Parameters
        ----------
        old : mapping of str to Tensor
            The state before the round, with every key of ``aggregated`` at the same shape.
        aggregated : mapping of str to Tensor
            What the strategy's aggregation made of the round's replies.

        Returns
        -------
        dict of str to Tensor
            ``aggregated`` itself (the same tensors) for ``none``; otherwise float32 tensors.
        """
        if not self.active:
            return dict(aggregated)
        self.steps += 1
        out = {}
        for key, new in aggregated.items():
            x = old[key].to(torch.float32)
            delta = new.to(torch.float32) - x
            m = self.m.get(key)
            if m is None or m.shape != delta.shape:
                m = torch.zeros_like(delta)
                if self.kind in _ADAPTIVE:
                    self.v[key] = torch.full_like(delta, self.tau * self.tau)
            if self.kind == "avgm":
                out[key], self.m[key] = momentum_step(x, delta, m, lr=self.lr, momentum=self.momentum)
            else:
                out[key], self.m[key], self.v[key] = adaptive_step(
                    self.kind, x, delta, m, self.v[key], lr=self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau
                )
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments and the step count as tensors (empty before the first step and for ``none``)."""
        if not self.steps:
            return {}
        out = {f"m/{k}": v for k, v in self.m.items()}
        if self.kind in _ADAPTIVE:
            out.update({f"v/{k}": v for k, v in self.v.items()})
        out[_STEPS] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (an empty mapping: no step taken yet)."""
        self.m = {k[2:]: v.to(torch.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v.to(torch.float32) for k, v in state.items() if k.startswith("v/")}
        if self.kind in _ADAPTIVE and set(self.v) != set(self.m):
            raise ValueError("server optimizer state holds first and second moments of different tensors")
        self.steps = int(state[_STEPS]) if _STEPS in state else 0

    def summary(self) -> str:
        """One line for the strategy's summary."""
        if not self.active:
            return "none"
        if self.kind == "avgm":
            return f"avgm (lr {self.lr:g}, momentum {self.momentum:g})"
        betas = f"beta1 {self.beta1:g}, " + (f"beta2 {self.beta2:g}, " if self.kind != "adagrad" else "")
        return f"{self.kind} (lr {self.lr:g}, {betas}tau {self.tau:g})"
