"""pFedLoRA's head: where the homogeneous adapter sits on a transformer of any width.

Yi et al., "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with LoRA Tuning"
(arXiv 2310.13283). In the paper every client has its own local model (CNNs of different
structures on CIFAR) and all clients share one *homogeneous small adapter*, a LoRA-style
low-rank module on the fully connected part, so that the adapter has the same shapes
everywhere and only it is uploaded and averaged.

A transformer's pooled representation has the width of its base (384 for MiniLM, 32 for a tiny
test BERT), so nothing after it has the same shape on two different bases. This module puts,
in place of the model's final classification layer, the head

    z = gelu(project(h))                         # personal: base width -> common width d
    u = gelu(fc(z) + (alpha / r) * B @ A @ z)    # fc personal (d x d); A (r x d), B (d x r) shared
    logits = out(u)                              # personal: d -> labels

The personal ``project`` maps each base into a space of one width; ``fc`` is the common-width
fully connected layer of the local model, and the shared ``A``/``B`` is LoRA on it: the
paper's adapter on the fully connected layer, with identical shapes whatever the base.
``B`` starts at zero (LoRA's, and so the paper's, initialisation), so the first forward pass is
the local model's own.

The head replaces the model's head *before* peft wraps the model
(:func:`fedlora.model.loading.load_model`'s ``head``), so peft's ``modules_to_save`` copy of it
is part of every adapter: trained, kept, exported and reloaded with the LoRA factors.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.errors import ConfigError
from fedlora.model.adapters import is_lora_a, is_lora_b, seeded_lora_a

#: Parameter names of the shared adapter inside the head (the keys that cross the network end so).
SHARED_A = "pfedlora_A"
SHARED_B = "pfedlora_B"
#: Model attributes that hold a sequence classifier's head (BERT-likes, GPT-2 and Llama-likes).
HEAD_ATTRIBUTES = ("classifier", "score")


def is_shared(key: str) -> bool:
    """Whether ``key`` is a tensor of the homogeneous adapter (the only ones that are sent)."""
    return key.rpartition(".")[2] in (SHARED_A, SHARED_B)


class PFedHead(nn.Module):
    """The head above: personal projection and fully connected layer, shared LoRA on it, personal output.

    Parameters
    ----------
    in_features : int
        The base's pooled width.
    width, rank : int
        The common width ``d`` and the shared adapter's rank ``r`` (the same on every client).
    alpha : float
        The adapter's scaling is ``alpha / rank`` (peft's convention); kept as a buffer, so a
        saved adapter carries it.
    num_labels : int
        Classes.
    """

    def __init__(self, in_features: int, width: int, rank: int, alpha: float, num_labels: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_features, width)
        self.fc = nn.Linear(width, width)
        self.pfedlora_A = nn.Parameter(torch.empty(rank, width))
        self.pfedlora_B = nn.Parameter(torch.zeros(width, rank))
        nn.init.kaiming_uniform_(self.pfedlora_A, a=math.sqrt(5))  # peft's LoRA A init
        self.out = nn.Linear(width, num_labels)
        self.register_buffer("scaling", torch.tensor(float(alpha) / rank))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        z = nn.functional.gelu(self.project(hidden))
        low_rank = (z @ self.pfedlora_A.t()) @ self.pfedlora_B.t()
        return self.out(nn.functional.gelu(self.fc(z) + self.scaling * low_rank))


def find_head(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the final linear classification layer of a sequence classifier:
    ``classifier`` or ``score`` when it is linear, else its ``out_proj`` (RoBERTa-likes).

    Raises
    ------
    ConfigError
        When the model has no such layer.
    """
    for attribute in HEAD_ATTRIBUTES:
        module = getattr(model, attribute, None)
        if isinstance(module, (nn.Linear, PFedHead)):
            return model, attribute
        if isinstance(getattr(module, "out_proj", None), (nn.Linear, PFedHead)):
            return module, "out_proj"
    raise ConfigError(
        f"config key 'strategy.name': pfedlora puts its adapter before the final linear layer of a sequence "
        f"classifier ('classifier' or 'score'); {type(model).__name__} has none"
    )


def head_path(model: nn.Module) -> str:
    """The module path of the layer :func:`find_head` replaces (``classifier``, ``score``, ...)."""
    parent, attribute = find_head(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(parent)]
    return f"{prefix}.{attribute}" if prefix else attribute


@dataclass(frozen=True)
class HeadSpec:
    """How to build the head on a base (hashable: part of the model cache's key).

    Attributes
    ----------
    width, rank : int
        The common width and the shared adapter's rank.
    alpha : float
        The shared adapter's alpha (scaling ``alpha / rank``).
    seed : int
        Seeds the head's initialisation, so the server and every process build the same one.
    """

    width: int
    rank: int
    alpha: float
    seed: int = 0

    def install(self, model: nn.Module) -> None:
        """Put the head in place of ``model``'s final classification layer (on its device)."""
        parent, attribute = find_head(model)
        old = getattr(parent, attribute)
        if isinstance(old, PFedHead):
            return
        num_labels = int(getattr(model.config, "num_labels", old.out_features))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = PFedHead(old.in_features, self.width, self.rank, self.alpha, num_labels)
        setattr(parent, attribute, head.to(old.weight.device))


def seeded_uniform(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``nn.Linear``'s weight init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, from a generator seeded by
    ``seed`` and a CRC of ``key``: the same value in every process whatever else is drawn."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    bound = 1.0 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.0
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


def initial_private(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A client's personal part before its first round: LoRA A seeded as peft draws it and B zero
    (the base's LoRA starts at the pretrained model), the head's weights seeded as ``nn.Linear``
    draws them and its biases zero. A pure function of the shapes and the seed, because virtual
    clients share one adapter host whose tensors hold whichever client ran last."""
    out = seeded_lora_a({k: s for k, s in shapes.items() if is_lora_a(k)}, seed)
    for key, shape in shapes.items():
        if key in out:
            continue
        if is_lora_b(key) or key.endswith(".bias") or key.endswith(f".{SHARED_B}"):
            out[key] = torch.zeros(shape)
        else:
            out[key] = seeded_uniform(key, tuple(shape), seed)
    return out


def bundle_head(adapter_dir: Path) -> HeadSpec:
    """The :class:`HeadSpec` an exported adapter was trained with, read from its tensors' shapes
    (its alpha comes back with the saved ``scaling`` buffer)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    a = [s for k, s in shapes.items() if k.endswith(f".{SHARED_A}")]
    if len(a) != 1:
        raise ValueError(f"{adapter_dir}: not a pfedlora adapter (no {SHARED_A} tensor)")
    rank, width = a[0]
    return HeadSpec(width=int(width), rank=int(rank), alpha=float(rank))


def load_bundle(adapter_dir: str | Path, base: str | None = None) -> Any:
    """A client's exported pfedlora adapter on its own base, ready to predict (eval mode).

    Parameters
    ----------
    adapter_dir : path
        ``clients/<i>/adapter`` of a simulated run, or a device's export.
    base : str, optional
        The base model (hub name or folder); default the one ``fedlora.json`` names.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.model.loading import resolve_model_source

    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / "fedlora.json").read_text())
    source = resolve_model_source(base or meta["base_model"])
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=int(meta["num_labels"]))
    bundle_head(adapter_dir).install(model)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
