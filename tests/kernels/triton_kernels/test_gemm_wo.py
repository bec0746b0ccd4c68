"""Weight-only GEMM kernel (8-bit and 4-bit weights, optional low-rank branch) vs the
references of ``linear_{int8,fp8,int4}_wo`` and ``linear_w4a16``."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import gemm_wo as kernel
from qcompile.kernels import reference
from qcompile.kernels.reference import w4
from qcompile.kernels.tolerances import INT4_DEQUANT_DB, LORA_BRANCH_DB, SUM_ORDER_DB
from qcompile.metrics import sqnr

from .helpers import on

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_8bit_matches_reference(device, fmt, dtype):
    x, w, bias = torch.randn(3, 23, 200).to(dtype), torch.randn(70, 200), torch.randn(70).to(dtype)
    if fmt == "int8":
        q, s = reference.quantize_int8_per_channel(w)
        expected = reference.linear_int8_wo(x, q, s, bias)
    else:
        q, s = reference.quantize_fp8_per_channel(w)
        expected = reference.linear_fp8_wo(x, q, s, bias)
    y = kernel.linear_weight_only(*on(device, x, q, s, None, bias, None, None), fmt)
    assert y.dtype == dtype and y.shape == expected.shape
    assert sqnr(expected, y.cpu()) >= SUM_ORDER_DB[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("fmt", "group"), [("int4", 64), ("int4", 128), ("mxfp4", 32), ("nvfp4", 16)]
)
def test_4bit_matches_reference(device, fmt, group, dtype):
    # K = 200 is not a multiple of any group: the weight's tail is zero padding
    x, w, bias = torch.randn(3, 23, 200).to(dtype), torch.randn(70, 200), torch.randn(70).to(dtype)
    lora_down = (torch.randn(20, 200) * 0.1).to(dtype)
    lora_up = (torch.randn(70, 20) * 0.1).to(dtype)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, bias, lora_down, lora_up)
    y = kernel.linear_weight_only(*on(device, *args), fmt, group)
    expected = w4.linear_w4a16(*args, fmt, group)
    # INT4 rounds code × scale to x's dtype; MXFP4 / NVFP4 block values are exact in 16 bits
    threshold = INT4_DEQUANT_DB[dtype] if fmt == "int4" else LORA_BRANCH_DB[dtype]
    assert sqnr(expected, y.cpu()) >= threshold


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_4bit_without_branch_single_row(device, fmt):
    group = 64 if fmt == "int4" else 16
    x, w = torch.randn(1, 96, dtype=torch.float16), torch.randn(40, 96)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, None, None, None)
    y = kernel.linear_weight_only(*on(device, *args), fmt, group)
    expected = w4.linear_w4a16(*args, fmt, group)
    assert sqnr(expected, y.cpu()) >= INT4_DEQUANT_DB[torch.float16]


@pytest.mark.parametrize(
    ("fmt", "group", "dtype"),
    [("int4", 64, torch.bfloat16), ("int4", 128, torch.float16), ("mxfp4", 32, torch.bfloat16),
     ("nvfp4", 16, torch.bfloat16)],
)  # fmt: skip
def test_dequantize_once_path_matches_reference(device, fmt, group, dtype):
    # large M's path: the weight dequantized into the 16-bit workspace by the Triton
    # kernel (bit for bit the reference's values rounded to x's dtype, but NVFP4, whose
    # global scale multiplies in before the one rounding), then one GEMM with the
    # branch's columns beside the weight's
    x, w, bias = torch.randn(3, 23, 200).to(dtype), torch.randn(70, 200), torch.randn(70).to(dtype)
    lora_down = (torch.randn(20, 200) * 0.1).to(dtype)
    lora_up = (torch.randn(70, 20) * 0.1).to(dtype)
    packed, scale, global_scale = w4.quantize_4bit(w, fmt, group)
    args = (x, packed, scale, global_scale, bias, lora_down, lora_up)
    y = kernel.linear_weight_only(*on(device, *args), fmt, group, dequantize=True)
    expected = w4.linear_w4a16(*args, fmt, group)
    assert y.dtype == dtype and y.shape == (3, 23, 70)
    assert sqnr(expected, y.cpu()) >= INT4_DEQUANT_DB[dtype]
    weight16 = kernel._WORKSPACE[y.device, dtype][: 70 * 220].view(70, 220)
    dequantized = w4.dequantize_4bit(packed, scale, global_scale, fmt, group, 200).to(dtype)
    if fmt != "nvfp4":
        assert torch.equal(weight16[:, :200].cpu(), dequantized)
    assert torch.equal(weight16[:, 200:].cpu(), lora_up)


def test_dequantize_once_path_is_for_4bit_16bit_linears(device):
    x = torch.randn(2, 64, device=device)  # float32
    packed, scale, _ = on(device, *w4.quantize_4bit(torch.randn(8, 64), "int4", 64))
    with pytest.raises(ValueError, match="4-bit weights and 16-bit activations"):
        kernel.linear_weight_only(x, packed, scale, None, None, None, None, "int4", 64,
                                  dequantize=True)  # fmt: skip
