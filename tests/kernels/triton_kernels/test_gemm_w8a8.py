"""W8A8 GEMM kernel vs ``reference.linear_w8a8``."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import gemm_w8a8 as kernel
from qcompile.kernels import reference
from qcompile.kernels.tolerances import SUM_ORDER_DB
from qcompile.metrics import sqnr

from .helpers import on

QUANTIZE_WEIGHT = {
    torch.int8: reference.quantize_int8_per_channel,
    torch.float8_e4m3fn: reference.quantize_fp8_per_channel,
}


@pytest.mark.parametrize("granularity", ["row/channel", "tensor"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_matches_reference(device, dtype, out_dtype, granularity):
    # M = 69, N = 70, K = 200: no dimension a multiple of the 64-wide blocks
    x, w, bias = torch.randn(3, 23, 200), torch.randn(70, 200), torch.randn(70)
    x_q, x_scale = reference.quantize_act_dynamic(x, dtype)
    w_q, w_scale = QUANTIZE_WEIGHT[dtype](w)
    if granularity == "tensor":
        x_scale, w_scale, bias = x_scale.amax().reshape(()), w_scale.amax().reshape(()), None
    args = (x_q, x_scale, w_q, w_scale, bias)
    y = kernel.linear_w8a8(*on(device, *args), out_dtype)
    expected = reference.linear_w8a8(*args, out_dtype)
    assert y.dtype == out_dtype and y.shape == (3, 23, 70)
    assert sqnr(expected, y.cpu()) >= SUM_ORDER_DB[out_dtype]


TMA_CONFIGS = {
    # one 128×256 tile, the epilogue stored as two TMA slices
    "wide": kernel._TMA_TUNER.hopper[0],
    # 2 × 3 tiles of 64×32 over the interpreter's 3 persistent programs, one slice
    "narrow": next(c for c in kernel._TMA_TUNER.hopper if c.meta["BLOCK_N"] == 32),
}


@pytest.mark.parametrize("tile", list(TMA_CONFIGS))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_tma_kernel_matches_reference(device, dtype, out_dtype, tile, monkeypatch):
    # the persistent TMA kernel: K = 208 and N = 72 keep rows 16-byte aligned, M = 69
    # and K past the last 128/256-wide step read TMA's zero fill
    monkeypatch.setattr(kernel._TMA_TUNER, "default", TMA_CONFIGS[tile])
    monkeypatch.setattr(kernel._TMA_TUNER, "_picked", {})
    x, w, bias = torch.randn(69, 208), torch.randn(72, 208), torch.randn(72)
    x_q, x_scale = reference.quantize_act_dynamic(x, dtype)
    w_q, w_scale = QUANTIZE_WEIGHT[dtype](w)
    args = (x_q, x_scale, w_q, w_scale, bias)
    y = kernel.linear_w8a8(*on(device, *args), out_dtype, tma=True)
    expected = reference.linear_w8a8(*args, out_dtype)
    if dtype is torch.int8:  # exact int32 sums, the same scale products
        assert torch.equal(y.cpu(), expected)
    else:
        assert sqnr(expected, y.cpu()) >= SUM_ORDER_DB[out_dtype]


def test_tma_kernel_refuses_unaligned_rows(device):
    x_q = torch.zeros(4, 200, dtype=torch.int8, device=device)  # 200 B rows: not 16-aligned
    w_q = torch.zeros(8, 200, dtype=torch.int8, device=device)
    one = torch.ones((), device=device)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        kernel.linear_w8a8(x_q, one, w_q, one, None, torch.bfloat16, tma=True)


def test_single_row(device):
    x_q, x_scale = reference.quantize_act_dynamic(torch.randn(1, 200), torch.int8)
    w_q, w_scale = reference.quantize_int8_per_channel(torch.randn(70, 200))
    args = (x_q, x_scale, w_q, w_scale, None)
    y = kernel.linear_w8a8(*on(device, *args), torch.bfloat16)
    # INT8 sums are exact on both sides and the scales multiply in the same order
    assert torch.equal(y.cpu(), reference.linear_w8a8(*args, torch.bfloat16))


def test_rejects_mixed_operands(device):
    with pytest.raises(ValueError, match="int8 × int8 or float8_e4m3fn"):
        kernel.linear_w8a8(
            torch.zeros(2, 16, dtype=torch.int8, device=device), torch.ones((), device=device),
            torch.zeros(4, 16, dtype=torch.float8_e4m3fn, device=device),
            torch.ones((), device=device), None, torch.bfloat16,
        )  # fmt: skip
