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
