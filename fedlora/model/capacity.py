"""What a device can hold: the memory a (precision, rank) needs, and the best one under a budget.

Pure functions of numbers, so the rule is tested on made-up budgets and documented here:

``memory = weights + adapter + optimizer + activations``, in bytes, where

* ``weights``: the base model's parameters at the precision's bytes per parameter
  (:data:`BYTES_PER_PARAM`: float32 4, bfloat16/float16 2, 8-bit 1 plus a float32 scale per
  row of 4096, NF4 with double quantization 0.5 plus 0.127 bits of scales, as QLoRA counts
  them), plus the unquantized heads at the compute dtype's width;
* ``adapter``: ``rank x (in + out)`` per target module per layer, float32 (master weights);
* ``optimizer``: AdamW's two float32 moments and the gradient for every adapter value (3 x);
* ``activations``: ``batch x sequence x hidden x layers x ACTIVATION_FACTOR`` values at the
  compute dtype's width (what the backward pass keeps; gradient checkpointing keeps about one
  per layer instead, :data:`CHECKPOINTED_FACTOR`).

:func:`choose` walks the precisions from the least quantized (``none``, then ``8bit``, then
``4bit``) and, within the first precision that fits at some rank, picks the largest rank that
fits; a choice fits when its memory times ``1 + margin`` is within the budget. Options are
thus ranked by (precision, then rank), and since what fits a budget also fits a larger one, the
choice is monotone in that order: more memory never gives a more quantized base, nor the same
precision at a smaller rank (it may give a less quantized base at a smaller rank: precision
comes first).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bytes per base-model parameter by precision; "none" takes the compute dtype's width.
BYTES_PER_PARAM = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 0.127 / 8}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Activation values kept per token per hidden unit per layer for the backward pass (attention
#: and MLP inputs, norms, the MLP's 4x expansion): an engineering estimate, on the safe side.
ACTIVATION_FACTOR = 18
CHECKPOINTED_FACTOR = 2
PRECISIONS = ("none", "8bit", "4bit")
RANKS = (64, 32, 16, 8, 4, 2, 1)
#: Head-room kept free on top of the estimate (allocator fragmentation, CUDA context, buffers).
MARGIN = 0.15


@dataclass(frozen=True)
class ModelFacts:
    """What the rule needs to know about a base model and the run.

    Attributes
    ----------
    params : int
        Base-model parameters that a quantized load quantizes (the linear layers).
    head_params : int
        Parameters that stay at the compute dtype (embeddings, norms, output heads).
    hidden : int
        Hidden size.
    layers : int
        Transformer blocks.
    lora_fan : int
        ``sum(in + out)`` over the adapted modules of one block: an adapter of rank r has
        ``r x lora_fan x layers`` values.
    batch, sequence : int
        The local batch size and ``model.max_length``.
    dtype : str
        The compute dtype (``float32``, ``bfloat16``, ``float16``).
    checkpointing : bool
        ``federation.gradient_checkpointing``.
    """

    params: int
    head_params: int
    hidden: int
    layers: int
    lora_fan: int
    batch: int
    sequence: int
    dtype: str = "float32"
    checkpointing: bool = False


@dataclass(frozen=True)
class Choice:
    """A (precision, rank) and the bytes it needs."""

    quantization: str
    rank: int
    bytes: int


def memory_needed(facts: ModelFacts, quantization: str, rank: int) -> int:
    """Bytes to train a rank-``rank`` adapter on the base at ``quantization`` (see the module doc)."""
    width = DTYPE_BYTES[facts.dtype]
    per_param = width if quantization == "none" else BYTES_PER_PARAM[quantization]
    weights = facts.params * per_param + facts.head_params * width
    adapter_values = rank * facts.lora_fan * facts.layers
    adapter = adapter_values * 4
    optimizer = adapter_values * 4 * 3
    factor = CHECKPOINTED_FACTOR if facts.checkpointing else ACTIVATION_FACTOR
    activations = facts.batch * facts.sequence * facts.hidden * facts.layers * factor * width
    return int(weights + adapter + optimizer + activations)


def choose(
    facts: ModelFacts,
    budget_bytes: int,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    ranks: tuple[int, ...] = RANKS,
    margin: float = MARGIN,
) -> Choice | None:
    """The least quantized precision that fits ``budget_bytes`` and, at it, the largest rank;
    None when nothing fits."""
    for quantization in precisions:
        for rank in sorted(ranks, reverse=True):
            need = memory_needed(facts, quantization, rank)
            if need * (1 + margin) <= budget_bytes:
                return Choice(quantization, rank, need)
    return None
