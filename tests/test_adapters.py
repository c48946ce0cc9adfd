"""Factors on the wire and shared seeded initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.model.adapters import (
    from_record,
    is_lora_a,
    module_of,
    record_bytes,
    seeded_lora_a,
    tensor_bytes,
    to_record,
)

pytestmark = pytest.mark.unit


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.layer.0.query.lora_A.weight": torch.randn(4, 32, generator=g),
        "base_model.model.layer.0.query.lora_B.weight": torch.randn(32, 4, generator=g) * 1e-30,
        "base_model.model.classifier.weight": torch.tensor([[float("1e-45"), -0.0, 3.4e38]]),
    }


def test_record_round_trip_is_bit_exact():
    state = _state()
    back = from_record(to_record(state))
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].dtype == torch.float32
        assert np.array_equal(back[key].numpy().view(np.uint32), tensor.numpy().view(np.uint32)), key


def test_float16_transport_halves_the_payload():
    state = {k: v for k, v in _state().items() if "classifier" not in k}  # 3.4e38 overflows fp16
    full, half = to_record(state, "float32"), to_record(state, "float16")
    assert {a.dtype for a in half.values()} == {"float16"}
    raw32, raw16 = tensor_bytes(state, "float32"), tensor_bytes(state, "float16")
    assert raw16 * 2 == raw32
    assert record_bytes(full) - raw32 < 0.05 * raw32 + 600  # framing: npy headers and keys
    assert record_bytes(half) < record_bytes(full)


def test_seeded_a_is_deterministic_and_order_free():
    shapes = {"m.q.lora_A.weight": (4, 32), "m.v.lora_A.weight": (4, 32), "m.q.lora_B.weight": (32, 4)}
    one = seeded_lora_a(shapes, 7)
    two = seeded_lora_a(dict(reversed(list(shapes.items()))), 7)
    assert set(one) == {"m.q.lora_A.weight", "m.v.lora_A.weight"}
    for key in one:
        assert torch.equal(one[key], two[key])
    assert not torch.equal(one["m.q.lora_A.weight"], one["m.v.lora_A.weight"])
    assert not torch.equal(one["m.q.lora_A.weight"], seeded_lora_a(shapes, 8)["m.q.lora_A.weight"])
    bound = 1 / np.sqrt(32)
    assert float(one["m.q.lora_A.weight"].abs().max()) <= bound


def test_key_helpers():
    assert is_lora_a("a.b.lora_A.weight") and not is_lora_a("a.b.lora_B.weight")
    assert module_of("x.layer.0.query.lora_B.weight") == "x.layer.0.query"
