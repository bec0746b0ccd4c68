"""4-bit references and ops: packing bitwise per format, odd shapes, the fused SVDQuant op."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels.reference import w4
from qcompile.metrics import sqnr

FORMATS = {"int4": 64, "mxfp4": 32, "nvfp4": 16}  # format → group along K
SCALE_DTYPES = {"int4": torch.float32, "mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}
ODD_SHAPES = [(5, 70), (3, 33), (1, 16), (7, 129)]
# Weight round-trip SQNR on N(0, 1) [64, 256], measured on torch 2.13 CPU: int4 g64
# 19.35, mxfp4 18.78, nvfp4 20.41 dB. Floors sit 0.5 dB below.
MIN_WEIGHT_SQNR_DB = {"int4": 18.8, "mxfp4": 18.2, "nvfp4": 19.9}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_layout_and_requantize_is_bitwise_identity(fmt, shape):
    n, k = shape
    group = FORMATS[fmt]
    kp = -(-k // group) * group
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    packed, scale, global_scale = w4.quantize_4bit(weight, fmt, group)
    assert packed.dtype == torch.uint8 and packed.shape == (n, kp // 2)
    assert scale.dtype == SCALE_DTYPES[fmt] and scale.shape == (n, kp // group)
    assert (global_scale is not None) == (fmt == "nvfp4")
    restored = w4.dequantize_4bit(packed, scale, global_scale, fmt, group, k)
    assert restored.shape == (n, k)
    # Dequantized values are on the grid: quantizing them again gives the same bits.
    again = w4.quantize_4bit(restored, fmt, group)
    assert torch.equal(again[0], packed) and torch.equal(_bits(again[1]), _bits(scale))
    # Padding along K is zeros: the padded codes are 0 in every format.
    if kp > k:
        low = packed[:, k // 2 :] if k % 2 == 0 else packed[:, k // 2 + 1 :]
        assert torch.all(low == 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_round_trip_error(fmt):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    group = FORMATS[fmt]
    restored = w4.dequantize_4bit(*w4.quantize_4bit(weight, fmt, group), fmt, group, 256)
    assert sqnr(weight, restored) >= MIN_WEIGHT_SQNR_DB[fmt]


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_activation_groups_are_per_row(fmt):
    # INT4 and MXFP4 activation scales are per row and group: a row quantizes the same
    # alone as inside a batch (NVFP4's global scale is per tensor, so it is not).
    x = torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(1))
    whole = w4.fake_quantize_4bit(x, fmt, FORMATS[fmt])
    alone = w4.fake_quantize_4bit(x[1, 2:3], fmt, FORMATS[fmt])
    assert whole.shape == x.shape and torch.equal(whole[1, 2:3], alone)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_w4a4_op_is_the_svdquant_formula(fmt):
    gen = torch.Generator().manual_seed(2)
    group, n, k, r = FORMATS[fmt], 24, 70, 4
    x = torch.randn(2, 5, k, generator=gen)
    smooth = torch.rand(k, generator=gen) + 0.5
    down, up = torch.randn(r, k, generator=gen), torch.randn(n, r, generator=gen)
    bias = torch.randn(n, generator=gen)
    packed = w4.quantize_4bit(torch.randn(n, k, generator=gen), fmt, group)
    out = torch.ops.qcompile.linear_w4a4(x, *packed, bias, smooth, down, up, fmt, group)
    x_s = x / smooth
    weight = w4.dequantize_4bit(*packed, fmt, group, k)
    expected = w4.fake_quantize_4bit(x_s, fmt, group) @ weight.T + (x_s @ down.T) @ up.T + bias
    assert out.shape == (2, 5, n) and sqnr(expected, out) > 120
    plain = torch.ops.qcompile.linear_w4a16(x, *packed, None, None, None, fmt, group)
    assert torch.allclose(plain, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])  # opcheck cannot multiply e4m3 on CPU
@pytest.mark.parametrize("op", ["linear_w4a4", "linear_w4a16"])
def test_opcheck_fake_impls_agree_with_the_reference(op, fmt):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, generator=gen)
    group = FORMATS[fmt]
    packed = w4.quantize_4bit(torch.randn(8, 40, generator=gen), fmt, group)
    branch = (torch.randn(2, 40, generator=gen), torch.randn(8, 2, generator=gen))
    if op == "linear_w4a4":
        args = (x, *packed, None, torch.rand(40, generator=gen) + 0.5, *branch, fmt, group)
    else:
        args = (x, *packed, None, *branch, fmt, group)
    torch.library.opcheck(getattr(torch.ops.qcompile, op).default, args)


def test_branch_that_does_not_fit_is_named():
    x = torch.randn(3, 40)
    packed = w4.quantize_4bit(torch.randn(8, 40), "int4", 64)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx_ = mode.from_tensor(x)
        args = [mode.from_tensor(t) for t in packed[:2]]
        down, up = mode.from_tensor(torch.randn(2, 40)), mode.from_tensor(torch.randn(9, 2))
        with pytest.raises(RuntimeError, match="low-rank branch"):
            torch.ops.qcompile.linear_w4a16(fx_, *args, None, None, down, up, "int4", 64)
