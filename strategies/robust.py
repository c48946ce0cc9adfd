"""Defences against hostile clients (``[robustness]``): update clipping and robust reducers.

Two independent defences, both pure functions over tensors:

* **Update clipping** (``update_clip``) works on every strategy: each reply's update (what it
  trained minus what it was sent) is scaled down to a norm bound, either ``clip_multiple`` x the
  round's median update norm (``median_multiple``: adapts to how far honest clients move, so no
  bound has to be tuned per model) or a fixed ``clip_norm`` (``fixed``). A client scaling its
  update by 1e4 then weighs no more than ``k`` times a typical client, in any strategy, and the
  honest majority sets the median. The norm and the clip are central DP's
  (:func:`fedlora.privacy.central.global_norm`, :func:`fedlora.privacy.central.clip_update`).
* **Robust reducers** (``aggregator``): a coordinate-wise median or trimmed mean in place of a
  strategy's weighted mean of same-shape tensors, for the strategies whose aggregate *is* such
  a mean (:attr:`~fedlora.strategies.LoRAStrategy.robust_aggregators`). They ignore example
  counts, as Flower's ``FedMedian`` and ``FedTrimmedAvg`` do: a count is the client's own claim,
  so weighting by it would hand a hostile client the vote the reducer is there to deny it.

The reducers reuse Flower's numpy math (``np.median`` as ``FedMedian``,
:func:`flwr.serverapp.strategy.fedtrimmedavg.trim_mean` as ``FedTrimmedAvg``) over our float32
tensors stacked in float64; Flower's strategies themselves cannot be reused, since they reduce
the ``ArrayRecord`` of replies rather than the per-key tensors a strategy has decoded (and some
keys must not be reduced at all, as FFA's frozen A).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedlora.config import AGGREGATORS
from fedlora.config import UPDATE_CLIPS as CLIPS
from fedlora.privacy.central import clip_update, global_norm

States = Sequence[Mapping[str, torch.Tensor]]
#: A strategy's average: (states, weights) -> one state.
Reducer = Callable[[States, Sequence[float]], dict[str, torch.Tensor]]


def clip_bound(norms: Sequence[float], mode: str, multiple: float, fixed: float) -> float | None:
    """The round's bound on an update's norm, or None when ``mode`` is ``none`` (or no norms).

    Parameters
    ----------
    norms : sequence of float
        The round's update norms.
    mode : str
        ``none``, ``median_multiple`` (``multiple`` x the median of ``norms``) or ``fixed``.
    multiple, fixed : float
        k of ``median_multiple``; the bound of ``fixed``.
    """
    if mode == "none" or not norms:
        return None
    if mode == "median_multiple":
        return multiple * statistics.median(norms)
    if mode == "fixed":
        return fixed
    raise ValueError(f"robustness.update_clip must be one of {', '.join(CLIPS)}, got {mode!r}")


def clip_states(
    states: States, references: States, *, mode: str, multiple: float = 3.0, fixed: float = 1.0
) -> tuple[list[dict[str, torch.Tensor]], list[float], float | None]:
    """Clip each state's update relative to its reference; (states, norms before, bound).

    Parameters
    ----------
    states : sequence of mappings
        What each client trained (float32, absolute).
    references : sequence of mappings
        What each was sent (float32); keys of a state that its reference lacks are not an
        update and pass through unmeasured.
    mode, multiple, fixed : str, float, float
        As :func:`clip_bound`.

    Returns
    -------
    tuple
        The states with every update of norm above the bound scaled down to it (``reference +
        clipped update``; states within the bound are returned as they were, bit for bit), the
        norms before clipping and the bound (None when ``mode`` is ``none``).
    """
    updates = [{k: v - ref[k] for k, v in s.items() if k in ref} for s, ref in zip(states, references)]
    norms = [global_norm(u) for u in updates]
    bound = clip_bound(norms, mode, multiple, fixed)
    out = []
    for state, ref, update, norm in zip(states, references, updates, norms):
        if bound is None or norm <= bound:
            out.append(dict(state))
            continue
        clipped, _ = clip_update(update, bound)
        out.append({k: ref[k] + clipped[k] if k in clipped else v for k, v in state.items()})
    return out, norms, bound


def _stacked(states: States, key: str) -> np.ndarray:
    return torch.stack([s[key] for s in states]).to(torch.float64).numpy()


def coordinate_median(states: States) -> dict[str, torch.Tensor]:
    """Coordinate-wise median of each tensor across ``states`` (the mean of the two middle values
    for an even count, as ``np.median`` and Flower's ``FedMedian``)."""
    if not states:
        raise ValueError("median of no states")
    return {k: torch.from_numpy(np.median(_stacked(states, k), axis=0)).to(torch.float32) for k in states[0]}


def coordinate_trimmed_mean(states: States, fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean of each tensor after cutting ``int(fraction * n)`` values at each end
    (Flower's ``trim_mean``, as ``FedTrimmedAvg``); ``fraction`` in [0, 0.5)."""
    if not states:
        raise ValueError("trimmed mean of no states")
    return {
        k: torch.from_numpy(np.asarray(trim_mean(_stacked(states, k), fraction))).to(torch.float32) for k in states[0]
    }


def reducer(aggregator: str, trim_fraction: float, mean: Reducer) -> Reducer:
    """The average a strategy uses for ``aggregator``: its own weighted ``mean``, or a robust one
    (which ignores the weights: see the module's docstring)."""
    if aggregator == "mean":
        return mean
    if aggregator == "median":
        return lambda states, weights: coordinate_median(states)
    if aggregator == "trimmed_mean":
        return lambda states, weights: coordinate_trimmed_mean(states, trim_fraction)
    raise ValueError(f"robustness.aggregator must be one of {', '.join(AGGREGATORS)}, got {aggregator!r}")


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key (sorted) of ``state`` whose tensor holds a NaN or an infinity, else None."""
    for key in sorted(state):
        value = state[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None
