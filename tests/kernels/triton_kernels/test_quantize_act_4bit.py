"""The fused 4-bit activation pass vs ``reference.w4.quantize_act_4bit``.

Codes, block scales and the NVFP4 global scale: bitwise. lora_act (x_s · lora_downᵀ)
differs only in float32 summation order: ≥ SUM_ORDER_DB (float32 sums of K ≤ 600 terms
agree to ~1e-7 relative, ≈ 135 dB measured; 120 leaves room for other orders on GPUs).
"""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import quantize_act_4bit as kernel
from qcompile.kernels.reference import w4
from qcompile.metrics import sqnr

from .helpers import bits

SUM_ORDER_DB = 120.0
FORMATS = [("int4", 64), ("int4", 128), ("mxfp4", 32), ("nvfp4", 16), (None, 64)]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("fmt", "group"), FORMATS)
def test_matches_reference(device, fmt, group, x_dtype):
    # 2 × 19 rows, K = 200: neither a multiple of the blocks nor of the group (zero pad);
    # bf16's 16-row blocks leave the interpreter's 3 "SMs" idle, so K splits in two
    # ranges (gemm_parts.act_splits) and lora_act is two partials summed
    x = (torch.randn(2, 19, 200) * 3).to(x_dtype)
    x[0, 0, :70] = 0  # all-zero groups take scale 1 (INT4) / exponent -127 (MXFP4)
    x[1, 3, 5] = 300.0  # an outlier that saturates NVFP4's e4m3 block scale
    smooth = torch.rand(200) + 0.5
    lora_down = (torch.randn(20, 200) * 0.1).to(x_dtype)
    got = kernel.quantize_act_4bit(
        x.to(device), smooth.to(device), lora_down.to(device), fmt, group
    )
    packed, scale, global_scale, lora_act = w4.quantize_act_4bit(x, smooth, lora_down, fmt, group)
    if fmt is None:
        assert got.packed is None and got.scale is None and got.global_scale is None
    else:
        assert got.scale.dtype == scale.dtype and got.scale.shape == scale.shape
        assert torch.equal(bits(got.packed), bits(packed))
        assert torch.equal(bits(got.scale), bits(scale))
        if fmt == "nvfp4":
            assert torch.equal(got.global_scale.cpu(), global_scale)
    assert sqnr(lora_act, got.lora_act.cpu()) >= SUM_ORDER_DB


@pytest.mark.parametrize(("fmt", "group"), FORMATS[:4])
def test_without_smoothing_or_branch(device, fmt, group):
    x = torch.randn(37, 96, dtype=torch.bfloat16)
    got = kernel.quantize_act_4bit(x.to(device), None, None, fmt, group)
    packed, scale, _, _ = w4.quantize_act_4bit(x, None, None, fmt, group)
    assert got.lora_act is None
    assert torch.equal(bits(got.packed), bits(packed))
    assert torch.equal(bits(got.scale), bits(scale))
