"""Aggregation math of the backbone strategies, on small random tensors."""

from __future__ import annotations

import typing

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.strategies import STRATEGIES, ffa_aggregate, get_strategy_class, weighted_mean

pytestmark = pytest.mark.unit

A_KEY = "m.q.lora_A.weight"
B_KEY = "m.q.lora_B.weight"


def test_weighted_mean_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    states = [{"x": torch.randn(3, 5, generator=g), "y": torch.randn(2, generator=g)} for _ in range(4)]
    weights = [10, 30, 0, 60]
    out = weighted_mean(states, weights)
    for key in ("x", "y"):
        expected = sum(s[key] * w for s, w in zip(states, weights)) / sum(weights)
        assert torch.allclose(out[key], expected, atol=1e-6)


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([{"x": torch.ones(1)}], [0])
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_ffa_average_of_b_is_exact():
    """With A shared and frozen, mean(B_k) @ A == mean(B_k @ A): FFA-LoRA's aggregate is exact."""
    g = torch.Generator().manual_seed(1)
    r, d_in, d_out, alpha = 4, 16, 12, 8.0
    a = torch.randn(r, d_in, generator=g)
    updates = [{B_KEY: torch.randn(d_out, r, generator=g)} for _ in range(5)]
    weights = [5.0, 1.0, 3.0, 2.0, 9.0]
    new = ffa_aggregate({A_KEY: a, B_KEY: torch.zeros(d_out, r)}, updates, weights)
    assert torch.equal(new[A_KEY], a)
    scaling = alpha / r
    got = scaling * new[B_KEY] @ new[A_KEY]
    expected = sum(w * scaling * u[B_KEY] @ a for u, w in zip(updates, weights)) / sum(weights)
    assert torch.allclose(got, expected, atol=1e-5)


def test_fedavg_product_is_not_exact_but_ffa_is():
    """The reason FFA exists: averaging A and B separately does not average B @ A."""
    g = torch.Generator().manual_seed(2)
    states = [{A_KEY: torch.randn(2, 6, generator=g), B_KEY: torch.randn(6, 2, generator=g)} for _ in range(2)]
    avg = weighted_mean(states, [1, 1])
    product_of_means = avg[B_KEY] @ avg[A_KEY]
    mean_of_products = (states[0][B_KEY] @ states[0][A_KEY] + states[1][B_KEY] @ states[1][A_KEY]) / 2
    assert not torch.allclose(product_of_means, mean_of_products, atol=1e-3)


def test_ffa_refuses_a_factors_from_clients():
    with pytest.raises(ValueError, match="must not send A"):
        ffa_aggregate({A_KEY: torch.zeros(1, 1)}, [{A_KEY: torch.zeros(1, 1)}], [1])


def test_registry_lists_known_strategies():
    assert {"fedavg", "ffa"} <= set(STRATEGIES)
    with pytest.raises(ConfigError) as err:
        get_strategy_class("fedprox-lora")
    assert "fedavg" in str(err.value) and "ffa" in str(err.value)


def test_unknown_strategy_option_is_named():
    cls = get_strategy_class("ffa")
    with pytest.raises(ConfigError, match="strategy.bogus"):
        cls.parse_options({"bogus": 1})
    with pytest.raises(ConfigError, match="strategy.a_seed"):
        cls.parse_options({"a_seed": "x"})
    assert cls.parse_options({"a_seed": 3}).to_dict() == {"a_seed": 3}


def test_non_finite_strategy_options_are_refused():
    from fedlora.strategies.hetlora import HetLoRAOptions

    with pytest.raises(ConfigError, match=r"^config key 'strategy\.prune_lambda' must be a finite number, got inf$"):
        HetLoRAOptions.from_dict({"prune_lambda": float("inf")}, "hetlora")
    for cls in STRATEGIES.values():
        for option, info in cls.options_class.model_fields.items():
            if float not in (info.annotation, *typing.get_args(info.annotation)):
                continue
            for bad in (float("inf"), float("-inf"), float("nan")):
                with pytest.raises(ConfigError, match=rf"config key 'strategy\.{option}' must be a finite number"):
                    cls.parse_options({option: bad})
