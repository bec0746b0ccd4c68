"""8-bit activation quantization and smoothing kernels vs their references: bitwise."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import ops, reference
from qcompile.kernels import quantize_act as kernel

from .helpers import bits

# [3, 23, 600]: 69 rows (not a multiple of BLOCK_M), K = 600 (not a multiple of BLOCK_K)
SHAPES = [(3, 23, 600), (1, 70)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_dynamic_matches_reference_bitwise(device, dtype, x_dtype, shape):
    x = (torch.randn(shape) * 5).to(x_dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero row takes scale 1
    q, scale = kernel.quantize_act_dynamic(x.to(device), dtype)
    expected_q, expected_scale = reference.quantize_act_dynamic(x, dtype)
    assert q.dtype == dtype and q.shape == x.shape and scale.shape == (*shape[:-1], 1)
    assert torch.equal(bits(q), bits(expected_q))
    assert torch.equal(scale.cpu(), expected_scale)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_static_matches_reference_bitwise(device, dtype, x_dtype):
    x = (torch.randn(3, 23, 600) * 5).to(x_dtype)
    scale = torch.tensor(0.013)  # small enough that some values saturate
    q = kernel.quantize_act_static(x.to(device), scale.to(device), dtype)
    assert torch.equal(bits(q), bits(reference.quantize_act_static(x, scale, dtype)))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_smooth_matches_reference_bitwise(device, x_dtype):
    x = torch.randn(3, 23, 600).to(x_dtype)
    factors = torch.rand(600) * 4 + 0.25
    y = kernel.smooth(x.to(device), factors.to(device))
    assert torch.equal(y.cpu(), ops.smooth(x, factors))
