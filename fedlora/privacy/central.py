"""User-level (central) DP on the server: clip each client's update, average, add Gaussian noise.

DP-FedAvg (McMahan et al. 2018): the server clips each client's whole update to ``clip_norm``,
averages the clipped updates with equal weights over the sampled clients and adds Gaussian noise
of std ``noise_multiplier * clip_norm / sampled`` to that mean (:func:`noisy_mean`). Pure
functions over tensors.

Under secure aggregation with ``privacy.noise = "distributed"`` the clients add the noise
instead, each its share (:func:`distributed_noise_std`), so that the sum the server unmasks
already carries it and the server releases that sum over ``sampled`` unchanged
(:func:`mean_release`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# -- central (user-level) DP: pure math ---------------------------------------------------------


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors together (float64)."""
    if not tensors:
        return 0.0
    return float(torch.sqrt(sum((t.detach().to(torch.float64) ** 2).sum() for t in tensors.values())))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (as one vector), and its norm before.

    Parameters
    ----------
    update : mapping from key to Tensor
        One client's update (what it trained minus what it was sent).
    clip_norm : float
        The bound C; the user-level sensitivity of a sum of clipped updates.
    """
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v.to(torch.float64) * scale).to(torch.float32) for k, v in update.items()}, norm


def central_noise_std(noise_multiplier: float, clip_norm: float, sampled: int) -> float:
    """Std of the Gaussian noise on the mean of ``sampled`` clipped updates: z * C / m."""
    return noise_multiplier * clip_norm / max(int(sampled), 1)


def distributed_noise_std(noise_multiplier: float, clip_norm: float, clients: int) -> float:
    """Std of one client's share of distributed noise: ``z C / sqrt(k)``, so that the noises of
    any ``k`` or more clients add up to at least central DP's ``z C`` on the sum (the mean's
    ``z C / m`` after the division by the ``m`` sampled). With ``s > k`` survivors the sum carries
    ``sqrt(s / k)`` times that: more noise than the guarantee needs (:func:`effective_multiplier`)."""
    return noise_multiplier * clip_norm / max(int(clients), 1) ** 0.5


def effective_multiplier(noise_multiplier: float, survivors: int, clients: int) -> float:
    """The noise multiplier the sum of ``survivors`` clients' shares (each made for ``clients``)
    carries: ``z sqrt(s / k)``; the accountant counts ``z``, what any ``k`` honest clients give."""
    return noise_multiplier * (max(int(survivors), 0) / max(int(clients), 1)) ** 0.5


def skellam_excess(
    noise_multiplier: float, clip_norm: float, dim: int, clipping_range: float, quantization_bits: int
) -> float:
    """A bound on what the Skellam noise's Renyi DP adds, at every order, to the Gaussian's that
    the accountant counts, per round: ``3 Delta_1 / (2 sigma**2)`` (Agarwal et al. 2021,
    Theorem 3.5) in the field's levels (``L = T / 2c`` per unit), with the sum's std
    ``sigma = z C L`` and ``Delta_1 <= sqrt(d) C L``: ``3 sqrt(d) / (2 z**2 C L)``."""
    levels_per_unit = (1 << quantization_bits) / (2 * clipping_range)
    return 3 * dim**0.5 / (2 * noise_multiplier**2 * clip_norm * levels_per_unit)


def mean_release(totals: Mapping[str, torch.Tensor], sampled: int) -> dict[str, torch.Tensor]:
    """Each key's sum over ``sampled`` (float32): the release when the sum carries its noise
    already (distributed DP), and the noiseless part of :func:`noisy_release`."""
    return {key: (totals[key].to(torch.float64) / sampled).to(torch.float32) for key in sorted(totals)}


def noisy_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    sampled: int,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """DP-FedAvg's release: clip each update, average with equal weights over the ``sampled``
    clients, add Gaussian noise of std ``noise_multiplier * clip_norm / sampled``.

    The denominator is the number of clients *sampled*, not the number that replied: a client
    that drops out contributes a zero update, which changes the sum by at most ``clip_norm``,
    so the sensitivity the noise is calibrated to holds either way.

    Parameters
    ----------
    updates : sequence of mappings
        The replies' updates, all with the same keys and shapes.
    clip_norm, noise_multiplier : float
        C and z.
    sampled : int
        Clients sampled this round (m >= len(updates)).
    generator : torch.Generator
        Source of the noise (seeded per round by the caller, so a run is reproducible).

    Returns
    -------
    (dict of str to Tensor, list of float, float)
        The noisy mean update, each update's norm before clipping, the noise std used.
    """
    if not updates:
        raise ValueError("noisy_mean of no updates")
    if sampled < len(updates):
        raise ValueError(f"{len(updates)} updates from {sampled} sampled clients")
    clipped, norms = [], []
    for u in updates:
        c, n = clip_update(u, clip_norm)
        clipped.append(c)
        norms.append(n)
    std = central_noise_std(noise_multiplier, clip_norm, sampled)
    totals = {key: torch.stack([c[key].to(torch.float64) for c in clipped]).sum(0) for key in updates[0]}
    return noisy_release(totals, sampled, std, generator), norms, std


def noisy_release(
    totals: Mapping[str, torch.Tensor], sampled: int, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The released mean: each key's sum of clipped updates over ``sampled``, plus Gaussian noise of
    ``std`` drawn key by key in sorted order (as :func:`noisy_mean` draws it, so a sum that arrives
    whole, from secure aggregation, gets the very same noise)."""
    out = {}
    for key in sorted(totals):
        total = totals[key].to(torch.float64)
        noise = torch.normal(0.0, std, size=total.shape, generator=generator, dtype=torch.float64)
        out[key] = (total / sampled + noise).to(torch.float32)
    return out
