"""W4A4 (SVDQuant) linear: the activation pass + the W4A4 GEMM vs
``reference.w4.linear_w4a4``."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qcompile.kernels import gemm_w4a4 as kernel
from qcompile.kernels.cuda import block_scaled
from qcompile.kernels.reference import w4
from qcompile.kernels.tolerances import LORA_BRANCH_DB, SUM_ORDER_DB
from qcompile.metrics import sqnr

from .helpers import on
from .triton_interpreter import e4m3_scales

FORMATS = [("int4", 64), ("int4", 128), ("mxfp4", 32), ("nvfp4", 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("fmt", "group"), FORMATS)
def test_svdquant_matches_reference(device, fmt, group, dtype):
    # M = 69, N = 70, K = 200 (Kp = 256 for g128, 224 for g32, 208 for g16: NVFP4 then
    # steps one 16-wide block at a time; see the K = 256 case for its 64-wide steps)
    k = 256 if fmt == "nvfp4" and dtype is torch.bfloat16 else 200
    x, w, bias = torch.randn(3, 23, k).to(dtype), torch.randn(70, k), torch.randn(70).to(dtype)
    smooth = torch.rand(k) + 0.5
    lora_down = (torch.randn(20, k) * 0.1).to(dtype)
    lora_up = (torch.randn(70, 20) * 0.1).to(dtype)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, bias, smooth, lora_down, lora_up)
    y = kernel.linear_w4a4(*on(device, *args), fmt, group)
    expected = w4.linear_w4a4(*args, fmt, group)
    assert y.dtype == dtype and y.shape == (3, 23, 70)
    assert sqnr(expected, y.cpu()) >= LORA_BRANCH_DB[dtype]


@pytest.mark.parametrize(("fmt", "group"), FORMATS)
def test_plain_w4a4_single_row(device, fmt, group):
    x, w = torch.randn(1, 128, dtype=torch.bfloat16), torch.randn(40, 128)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, None, None, None, None)
    y = kernel.linear_w4a4(*on(device, *args), fmt, group)
    expected = w4.linear_w4a4(*args, fmt, group)
    assert sqnr(expected, y.cpu()) >= SUM_ORDER_DB[torch.bfloat16]


@pytest.mark.parametrize(
    ("fmt", "group", "dtype"),
    [("mxfp4", 32, torch.bfloat16), ("mxfp4", 32, torch.float32), ("nvfp4", 16, torch.bfloat16)],
)
def test_block_scaled_kernel_matches_reference(device, fmt, group, dtype):
    # Blackwell's kernel (tl.dot_scaled on the packed codes and scales as they are):
    # K = 200 pads to Kp = 224 (MXFP4) / 208 (NVFP4), so the 128-wide steps end in a
    # masked tail; M = 69 and N = 70 are no multiples of the 128 × 128 tile.
    if device == "cuda" and not block_scaled(torch.device("cuda")):
        pytest.skip("the block-scaled MMA needs sm_100 or sm_120")
    x, w, bias = torch.randn(3, 23, 200).to(dtype), torch.randn(70, 200), torch.randn(70).to(dtype)
    smooth = torch.rand(200) + 0.5
    lora_down = (torch.randn(20, 200) * 0.1).to(dtype)
    lora_up = (torch.randn(70, 20) * 0.1).to(dtype)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, bias, smooth, lora_down, lora_up)
    with e4m3_scales() if device == "cpu" else contextlib.nullcontext():
        y = kernel.linear_w4a4(*on(device, *args), fmt, group, scaled=True)
    expected = w4.linear_w4a4(*args, fmt, group)
    assert y.dtype == dtype and y.shape == (3, 23, 70)
    assert sqnr(expected, y.cpu()) >= LORA_BRANCH_DB[dtype]


def test_block_scaled_kernel_refuses_int4(device):
    x = torch.randn(2, 64, device=device)
    packed, scale, _ = w4.quantize_4bit(torch.randn(8, 64), "int4", 64)
    packed, scale = on(device, packed, scale)
    with pytest.raises(ValueError, match="INT4 has no block-scaled MMA"):
        kernel.linear_w4a4(x, packed, scale, None, None, None, None, None, "int4", 64, scaled=True)
