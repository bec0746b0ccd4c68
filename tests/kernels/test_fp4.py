"""FP4 block formats (MXFP4, NVFP4): encodings and packing bitwise, error bounds."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels.reference import fp4

SHAPES = [(1, 1), (3, 17), (5, 32), (7, 33), (16, 100)]


def test_e2m1_codes_round_to_nearest_even_and_saturate():
    values = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.5, -6.0, -0.1])
    # 0.25→0 (tie, even), 0.75→1.0 (tie → code 2), 1.25→1.0, 1.75→2.0, 2.5→2.0,
    # 3.5→4.0, 5.0→4.0 (code 6), 7→6 (saturates), -0.1→+0 (no negative zero).
    expected = [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 0x9, 0xF, 0]
    assert fp4.encode_e2m1(values).tolist() == expected
    assert fp4.decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        3.0,
        4.0,
        6.0,
        -0.0,
        -0.5,
        -1.0,
        -1.5,
        -2.0,
        -3.0,
        -4.0,
        -6.0,
    ]


def test_every_code_round_trips_and_packs():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3)
    assert torch.equal(fp4.encode_e2m1(fp4.decode_e2m1(codes))[codes != 8], codes[codes != 8])
    packed = fp4.pack_fp4(codes.view(3, 16))
    assert packed.shape == (3, 8) and packed[0, 0] == 0x10
    assert torch.equal(fp4.unpack_fp4(packed), codes.view(3, 16))


@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_layout_and_error(shape):
    w = torch.randn(*shape) * 3
    packed, scales = fp4.quantize_mxfp4(w)
    kp = -(-shape[1] // 32) * 32
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], kp // 2)
    assert scales.dtype == torch.uint8 and scales.shape == (shape[0], kp // 32)
    deq = fp4.dequantize_mxfp4(packed, scales, shape[1])
    block_scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)[:, : shape[1]]
    # Rounding: e2m1 gaps are at most 2 scaled units → error ≤ 1. Saturation: the OCP
    # rule e = floor(log2 max) - 2 puts the block max in [4, 8) scaled, and [6, 8)
    # clips to 6 → error < 2 scaled units (7.84 → 6.0 happens on these shapes).
    assert torch.all((deq - w).abs() <= 2 * block_scale + 1e-6)
    # The block max lands in [4, 8) scaled, i.e. it is never clipped by more than 2.
    assert torch.all(deq.abs().amax(dim=1) >= w.abs().amax(dim=1) * 0.5)


@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_layout_and_error(shape):
    w = torch.randn(*shape)
    packed, block_scale, global_scale = fp4.quantize_nvfp4(w)
    kp = -(-shape[1] // 16) * 16
    assert packed.shape == (shape[0], kp // 2) and block_scale.dtype == torch.float8_e4m3fn
    assert block_scale.shape == (shape[0], kp // 16) and global_scale.dtype == torch.float32
    deq = fp4.dequantize_nvfp4(packed, block_scale, global_scale, shape[1])
    step = (block_scale.float() * global_scale).repeat_interleave(16, dim=1)[:, : shape[1]]
    # Within a block the largest e2m1 gap is 2 scaled units; the e4m3 scale's own rounding
    # (≤ 2^-4 relative) can push the block max up to 6.4 scaled units → saturation ≤ 0.4.
    assert torch.all((deq - w).abs() <= step * 1.0 + 1e-6)


@pytest.mark.parametrize("quantize", [fp4.quantize_mxfp4, fp4.quantize_nvfp4])
def test_all_zero_weights_stay_zero_and_finite(quantize):
    out = quantize(torch.zeros(4, 40))
    for tensor in out:
        assert torch.isfinite(tensor.float()).all()
    assert torch.all(out[0] == 0)
