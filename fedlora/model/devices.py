"""Where a model runs and in what precision: ``model.device`` and ``model.dtype``.

The rules are pure functions of what the machine has (:func:`resolve_device`,
:func:`resolve_dtype`), so they are tested without the hardware; :func:`placement` probes torch
and applies them. ``auto`` means CUDA when present, else Apple's MPS, else the CPU, and
bfloat16 on a GPU that supports it, float32 elsewhere.

The base model's frozen weights take the resolved dtype. What trains stays float32 (the LoRA
factors and a trained head: master weights and AdamW state), and the forward pass runs under
``torch.autocast`` in the resolved dtype (:func:`autocast`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedlora.config import DEVICE_PATTERN, DTYPES
from fedlora.errors import ConfigError

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _named(key: str) -> str:
    """How an error names what was asked: a config key, or a command-line flag (``--device``)."""
    return key if key.startswith("--") else f"config key '{key}'"


def resolve_device(requested: str, *, cuda_count: int, mps: bool, key: str = "model.device") -> str:
    """The device ``requested`` names on a machine with ``cuda_count`` CUDA devices and (or not) MPS.

    Raises
    ------
    ConfigError
        One line naming ``key`` when the device is not there.
    """
    if not DEVICE_PATTERN.fullmatch(requested):
        raise ConfigError(f"{_named(key)}: must be auto, cpu, cuda, cuda:N or mps, got {requested!r}")
    if requested == "auto":
        return "cuda:0" if cuda_count > 0 else "mps" if mps else "cpu"
    if requested.startswith("cuda"):
        index = int(requested.partition(":")[2] or 0)
        if cuda_count == 0:
            raise ConfigError(f"{_named(key)}: {requested!r} asked for, but torch sees no CUDA device here")
        if index >= cuda_count:
            raise ConfigError(f"{_named(key)}: {requested!r} asked for, but there are {cuda_count} CUDA device(s)")
        return f"cuda:{index}"
    if requested == "mps" and not mps:
        raise ConfigError(f"{_named(key)}: 'mps' asked for, but torch has no MPS backend here")
    return requested


def resolve_dtype(requested: str, device: str, *, bf16: bool, key: str = "model.dtype") -> str:
    """The compute dtype ``requested`` names on ``device`` (``bf16``: the device supports bfloat16)."""
    if requested not in DTYPES:
        raise ConfigError(f"{_named(key)}: must be one of {', '.join(DTYPES)}, got {requested!r}")
    gpu = device.startswith(("cuda", "mps"))
    if requested == "auto":
        return "bfloat16" if gpu and bf16 else "float32"
    if requested == "bfloat16" and gpu and not bf16:
        raise ConfigError(f"{_named(key)}: this GPU ({device}) has no bfloat16; use float16 or float32")
    return requested


@dataclass(frozen=True)
class Placement:
    """A resolved device and compute dtype."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]

    @classmethod
    def cpu(cls) -> Placement:
        return cls("cpu", "float32")


def machine() -> tuple[int, bool]:
    """This machine's accelerators: (visible CUDA devices, whether MPS is available)."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return cuda_count, bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def placement(device: str = "auto", dtype: str = "auto", key: str = "model.device") -> Placement:
    """Resolve ``model.device`` / ``model.dtype`` on this machine (errors name ``key``)."""
    cuda_count, mps = machine()
    where = resolve_device(device, cuda_count=cuda_count, mps=mps, key=key)
    if where.startswith("cuda"):
        bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        bf16 = where == "mps"
    return Placement(where, resolve_dtype(dtype, where, bf16=bf16))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the first one's device; the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision for the forward pass when ``dtype`` is below float32, else nothing."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
