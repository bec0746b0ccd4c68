"""W4A8 linear: the activation pass (bitwise) and the GEMM vs ``reference.w4a8``."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import gemm_w4a8 as kernel
from qcompile.kernels.reference import w4a8
from qcompile.kernels.tolerances import LORA_BRANCH_DB
from qcompile.metrics import sqnr

from .helpers import bits, on

STATIC_SCALE = torch.tensor(0.03)  # small enough that some codes saturate at ±127


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_pass_is_bitwise(device, dtype, static):
    x = torch.randn(3, 23, 200).to(dtype)  # M = 69, K = 200: no 64-wide block fits
    smooth = torch.rand(200) + 0.5
    lora_down = (torch.randn(20, 200) * 0.1).to(dtype)
    scale = STATIC_SCALE if static else None
    q, s, lora_act = kernel.quantize_act_w4a8(*on(device, x, smooth, lora_down, scale))
    ref_q, ref_s, ref_lora = w4a8.quantize_act_w4a8(x, smooth, lora_down, scale)
    assert torch.equal(q.cpu(), ref_q)
    assert torch.equal(bits(s.cpu().reshape(-1)), bits(ref_s.reshape(-1)))
    assert sqnr(ref_lora, lora_act.cpu()) >= LORA_BRANCH_DB[torch.float32]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_svdquant_w4a8_matches_reference(device, dtype, group):
    x, w, bias = torch.randn(3, 23, 200).to(dtype), torch.randn(70, 200), torch.randn(70).to(dtype)
    smooth = torch.rand(200) + 0.5
    lora_down = (torch.randn(20, 200) * 0.1).to(dtype)
    lora_up = (torch.randn(70, 20) * 0.1).to(dtype)
    packed, group_scale, channel_scale = w4a8.quantize_w4a8_weight(w, group)
    args = (x, packed, group_scale, channel_scale, bias, smooth, lora_down, lora_up, None)
    y = kernel.linear_w4a8(*on(device, *args))
    expected = w4a8.linear_w4a8(*args)
    assert y.dtype == dtype and y.shape == (3, 23, 70)
    assert sqnr(expected, y.cpu()) >= LORA_BRANCH_DB[dtype]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_plain_w4a8_is_exact(device, static):
    # no branch: int32 sums of exact int8 products, the scale products in the same order
    x, w = torch.randn(5, 384, dtype=torch.bfloat16), torch.randn(40, 384)
    packed, group_scale, channel_scale = w4a8.quantize_w4a8_weight(w, 128)
    scale = STATIC_SCALE if static else None
    args = (x, packed, group_scale, channel_scale, None, None, None, None, scale)
    assert torch.equal(kernel.linear_w4a8(*on(device, *args)).cpu(), w4a8.linear_w4a8(*args))
