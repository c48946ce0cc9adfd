"""Atomic checkpoints of a round: the files, their digests and the ``latest.json`` pointer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

#: Checkpoint sidecar layout: ``{"format", "round", "sha256": {file: hex}, "extra", "digest"}``.
CHECKPOINT_FORMAT = 2


@dataclass
class Checkpoint:
    """One verified round on disk: the global state, the sidecar's extra (strategy, privacy
    state), in simulation the serialized per-node state, and the strategy's tensor state (server
    optimizer moments); ``None`` when not saved."""

    round: int
    state: dict[str, torch.Tensor]
    extra: dict[str, Any]
    nodes: bytes | None = None
    server: dict[str, torch.Tensor] | None = None


class _Unusable(Exception):
    """A checkpoint round that fails verification (the message says why)."""


def _finite_tensors(blobs: dict[str, bytes], name: str) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint file ``name``; :class:`_Unusable` when they do not load or one
    holds a NaN or an infinity."""
    try:
        tensors = load(blobs[name])
    except Exception as err:  # noqa: BLE001 - any decoding failure makes the round unusable
        raise _Unusable(f"{name} does not load: {type(err).__name__}") from None
    broken = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise _Unusable(f"{name} holds non-finite values in {broken}")
    return tensors


def _sidecar_digest(sidecar: dict[str, Any]) -> str:
    """sha256 of the sidecar without its own digest (JSON round-trips floats exactly)."""
    body = {k: v for k, v in sidecar.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _pointer_round(pointer: Path) -> int | None:
    try:
        value = json.loads(pointer.read_text())["round"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
