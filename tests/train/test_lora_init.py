"""LoRA adapters start as PEFT starts them: A ~ kaiming_uniform(a=sqrt(5)) over [r, in], B = 0.

PEFT's ``LoraLayer.reset_lora_parameters`` calls ``nn.init.kaiming_uniform_(lora_A.weight,
a=math.sqrt(5))`` on the torch weight [r, in_features] and zeroes lora_B. Torch's bound is
``gain * sqrt(3 / fan_in)`` with ``gain = sqrt(2 / (1 + a^2))``, i.e. ``1 / sqrt(in)`` at
a = sqrt(5); the uniform's std is bound / sqrt(3). The formula is checked against torch itself
below, then ``init_lora``'s A ([..., in, r] here) against the formula.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import torch

from longvila_jax.train.state import init_lora

FAN_IN, OUT, RANK = 3584, 512, 8  # Qwen2-7B's hidden size, a narrow output, LongLoRA's r


def _peft_bound(fan_in: int) -> float:
    a = math.sqrt(5)
    return math.sqrt(6 / ((1 + a * a) * fan_in))


def test_the_formula_is_torch_kaiming_uniform():
    torch.manual_seed(0)
    w = torch.empty(RANK, FAN_IN)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    w = w.numpy().astype(np.float64)
    bound = _peft_bound(FAN_IN)
    assert math.isclose(bound, 1 / math.sqrt(FAN_IN), rel_tol=1e-12)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    # The sample std of n uniforms has a relative spread of sqrt(0.05 / n) (~0.1 % here).
    tol = 5 * math.sqrt(0.05 / w.size)
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < tol


def _check_uniform(a: np.ndarray, fan_in: int) -> None:
    bound = _peft_bound(fan_in)
    n = a.size
    std = bound / math.sqrt(3)
    assert np.abs(a).max() <= bound * (1 + 1e-6) and np.abs(a).max() > 0.99 * bound
    assert abs(a.mean()) < 5 * std / math.sqrt(n)  # mean 0 within sampling error
    assert abs(a.std() / std - 1) < 5 * math.sqrt(0.05 / n)
    # Uniform, not a bounded bell: half the mass lies beyond bound / 2.
    assert abs(np.mean(np.abs(a) > bound / 2) - 0.5) < 5 * math.sqrt(0.25 / n)


def test_init_lora_matches_peft():
    shapes = {
        "dense/kernel": jax.ShapeDtypeStruct((FAN_IN, OUT), np.float32),
        # Stacked layers [layers, in, out]: one A per layer, each with fan_in = in.
        "stacked/kernel": jax.ShapeDtypeStruct((2, FAN_IN, 64), np.float32),
    }
    adapters = init_lora(shapes, shapes, RANK, jax.random.key(0))
    dense = adapters["dense/kernel"]
    assert dense["a"].shape == (FAN_IN, RANK) and dense["a"].dtype == np.float32
    assert dense["b"].shape == (RANK, OUT) and not np.asarray(dense["b"]).any()
    _check_uniform(np.asarray(dense["a"], np.float64), FAN_IN)
    stacked = adapters["stacked/kernel"]
    assert stacked["a"].shape == (2, FAN_IN, RANK)
    assert stacked["b"].shape == (2, RANK, 64) and not np.asarray(stacked["b"]).any()
    a = np.asarray(stacked["a"], np.float64)
    for layer in a:
        _check_uniform(layer, FAN_IN)
    assert not np.array_equal(a[0], a[1])  # independent draws per layer
    # Not the old N(0, 1) / rank draw (std 0.125), about 13x PEFT's std at this fan-in.
    assert np.asarray(dense["a"]).std() < 0.2 * (1 / RANK)
