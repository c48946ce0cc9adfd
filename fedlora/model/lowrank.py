"""Pure low-rank algebra shared by the strategies and the runtime.

Conventions: a target weight ``W`` is (out x in) whatever the layer type (GPT-2's ``Conv1D``
stores the transpose; callers transpose at the edge). A LoRA update is ``scaling * B @ A`` with
``A`` (r x in), ``B`` (out x r), ``scaling = alpha / r``. A *base delta* is an unscaled product
``D = B_d @ A_d`` folded into the frozen weight (FLoRA's merged stacks, FedEx-LoRA's residual).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def svd_init(weight: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal-singular-vector LoRA init and the residual weight, computed by peft itself.

    FeDeRA (arXiv 2404.18848) initialises A and B from the truncated SVD of the pretrained
    weight and keeps ``W - scaling * B @ A`` frozen; this is peft's ``init_lora_weights="pissa"``
    with a full SVD. It runs on a throwaway ``nn.Linear`` holding a copy of ``weight``, because
    peft's init rewrites the base layer in place and fedlora shares one frozen base model
    between every adapter of a process.

    Parameters
    ----------
    weight : Tensor
        The pretrained weight, (out x in).
    rank : int
        r; must not exceed ``min(out, in)``.
    alpha : float
        LoRA alpha; ``scaling * B @ A`` is the rank-r SVD approximation of ``weight``.

    Returns
    -------
    tuple of Tensor
        ``(A, B, residual)`` with A (r x in), B (out x r), residual (out x in), float32.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    out_features, in_features = weight.shape
    if rank > min(out_features, in_features):
        raise ValueError(f"rank {rank} exceeds min{tuple(weight.shape)}")
    base = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        base.weight.copy_(weight.detach().to(torch.float32))
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="pissa")
    layer = LoraLinear(base, "init", config=config, r=rank, lora_alpha=alpha, init_lora_weights="pissa")
    a = layer.lora_A["init"].weight.detach().clone()
    b = layer.lora_B["init"].weight.detach().clone()
    residual = layer.get_base_layer().weight.detach().clone()
    return a, b, residual


def stack(factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate low-rank terms so that one product equals their weighted sum exactly.

    Parameters
    ----------
    factors : sequence of (B, A, coefficient)
        B (out x r_k), A (r_k x in); ranks may differ.

    Returns
    -------
    tuple of Tensor
        ``(B_s, A_s)`` of rank ``sum r_k`` with ``B_s @ A_s = sum_k coef_k * B_k @ A_k``
        (FLoRA's stacking, arXiv 2409.05976).
    """
    if not factors:
        raise ValueError("stack of no factors")
    bs = [b.to(torch.float64) * float(c) for b, _, c in factors]
    as_ = [a.to(torch.float64) for _, a, _ in factors]
    return torch.cat(bs, dim=1).to(torch.float32), torch.cat(as_, dim=0).to(torch.float32)


def compact(b: torch.Tensor, a: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor ``B @ A`` at its numerical rank (never above ``min(out, in)``).

    Stacked updates grow by the clients' ranks every round; the product is what matters, so
    it is re-expressed through thin QR of both factors and an SVD of the small core. Singular
    values below ``rtol`` times the largest are dropped, which changes the product by at most
    that relative amount.

    Parameters
    ----------
    b, a : Tensor
        (out x R) and (R x in).
    rtol : float
        Relative cut-off on singular values.

    Returns
    -------
    tuple of Tensor
        ``(B', A')`` with ``B' @ A' ~= B @ A`` and rank at most ``min(out, in, R)``; the
        singular values are split evenly between the two factors.
    """
    out_features, inner = b.shape
    in_features = a.shape[1]
    if inner >= min(out_features, in_features):
        # Wider than the matrix itself (many clients stacked): the dense product and its SVD
        # are cheaper than QR of the tall factors.
        u, s, vh = torch.linalg.svd(b.to(torch.float32) @ a.to(torch.float32), full_matrices=False)
        left, right = u, vh
    else:
        qb, rb = torch.linalg.qr(b.to(torch.float64))
        qa, ra = torch.linalg.qr(a.to(torch.float64).T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        left, right = qb @ u, vh @ qa.T
    if s.numel() == 0 or float(s[0]) == 0.0:
        return b.new_zeros(out_features, 1), a.new_zeros(1, in_features)
    keep = int((s > rtol * s[0]).sum())
    root = s[:keep].sqrt()
    new_b = left[:, :keep] * root
    new_a = root[:, None] * right[:keep]
    return new_b.to(torch.float32), new_a.to(torch.float32)


def pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` up to ``rank`` (HetLoRA's padding of a smaller client)."""
    missing = rank - t.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot pad rank {t.shape[dim]} down to {rank}")
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def truncate_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """The first ``rank`` components of ``t`` along ``dim`` (a copy)."""
    if rank > t.shape[dim]:
        raise ValueError(f"cannot truncate rank {t.shape[dim]} up to {rank}")
    return t.narrow(dim, 0, rank).clone()
