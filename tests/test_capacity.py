"""The capability rule: memory of a (precision, rank), and the best one under a budget."""

from __future__ import annotations

import pytest

from fedlora.model.capacity import PRECISIONS, RANKS, Choice, ModelFacts, choose, memory_needed

pytestmark = pytest.mark.unit

GB = 1024**3
# A Llama-7B-like base: 6.5e9 linear parameters, 0.26e9 in embeddings/norms/head, 32 blocks of
# hidden 4096; LoRA on q, k, v, o (in + out = 8192 each), batch 4 x 512 tokens, bfloat16.
LLAMA7B = ModelFacts(
    params=6_476_000_000,
    head_params=262_000_000,
    hidden=4096,
    layers=32,
    lora_fan=4 * 8192,
    batch=4,
    sequence=512,
    dtype="bfloat16",
)


def _order(choice: Choice) -> tuple[int, int]:
    return PRECISIONS.index(choice.quantization), -choice.rank


def test_memory_grows_with_rank_and_shrinks_with_quantization():
    assert memory_needed(LLAMA7B, "none", 8) < memory_needed(LLAMA7B, "none", 64)
    assert memory_needed(LLAMA7B, "4bit", 8) < memory_needed(LLAMA7B, "8bit", 8) < memory_needed(LLAMA7B, "none", 8)
    # bfloat16 linear weights alone are 12.1 GiB (6.5e9 x 2 bytes).
    no_linear = ModelFacts(**{**LLAMA7B.__dict__, "params": 0})
    weights_bf16 = memory_needed(LLAMA7B, "none", 1) - memory_needed(no_linear, "none", 1)
    assert 11.5 * GB < weights_bf16 < 12.5 * GB
    checkpointed = ModelFacts(**{**LLAMA7B.__dict__, "checkpointing": True})
    assert memory_needed(checkpointed, "none", 8) < memory_needed(LLAMA7B, "none", 8)


@pytest.mark.parametrize("budget_gb", [0.5, 4, 6, 8, 12, 16, 20, 24, 40, 80])
def test_choice_never_exceeds_the_budget(budget_gb):
    choice = choose(LLAMA7B, int(budget_gb * GB), margin=0.15)
    if choice is not None:
        assert choice.bytes * 1.15 <= budget_gb * GB
        assert choice.rank in RANKS


def test_choice_is_monotone_in_memory():
    previous = None
    for budget_gb in [x / 4 for x in range(1, 400)]:
        choice = choose(LLAMA7B, int(budget_gb * GB))
        if previous is not None:
            assert choice is not None and _order(choice) <= _order(previous), (budget_gb, choice, previous)
        previous = choice if choice is not None else previous


def test_known_budgets():
    """Batch 4 x 512 on a 7B base: activations (about 9 GiB without checkpointing) decide."""
    checkpointed = ModelFacts(**{**LLAMA7B.__dict__, "checkpointing": True})
    assert (
        choose(LLAMA7B, 4 * GB) is None and choose(checkpointed, 4 * GB) is None
    )  # NF4 weights + activations exceed it
    assert choose(checkpointed, 6 * GB) == Choice("4bit", 32, memory_needed(checkpointed, "4bit", 32))
    assert choose(LLAMA7B, 16 * GB).quantization == "4bit"
    assert choose(LLAMA7B, 24 * GB).quantization == "8bit"
    assert choose(LLAMA7B, 80 * GB) == Choice("none", 64, memory_needed(LLAMA7B, "none", 64))
    # Precision comes first: at 16 GiB with checkpointing a bfloat16 base fits at rank 16.
    assert choose(checkpointed, 16 * GB) == Choice("none", 16, memory_needed(checkpointed, "none", 16))


def test_a_run_ranks_cap_the_choice():
    assert choose(LLAMA7B, 80 * GB, ranks=(8, 4)).rank == 8
