"""FP4 (e2m1) block formats: MXFP4 (OCP MX) and NVFP4. Plain-PyTorch references.

e2m1 codes (4 bits: sign, 2 exponent bits, 1 mantissa bit) encode magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6; rounding is to nearest, ties to the even code; values
beyond 6 saturate. Two codes per byte along K, low nibble first (as INT4).

MXFP4: blocks of 32 along K share an E8M0 scale 2^e, stored as uint8 e + 127, with
e = floor(log2(max|block|)) - 2 (so the block max lands in [4, 8) before rounding).
NVFP4: blocks of 16 share an FP8 e4m3 scale s_b; one float32 per-tensor scale g keeps
s_b in e4m3's range: g = max|W| / (6 · 448), s_b = e4m3(max|block| / 6 / g); a value is
x / (s_b · g) rounded to e2m1. K is zero-padded to a multiple of the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.kernels.reference.fp8 import FP8_E4M3_MAX
from qcompile.kernels.reference.int4 import pack_int4, unpack_int4

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MAX = 6.0
_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
MX_BLOCK = 32
NV_BLOCK = 16
E8M0_BIAS = 127
E2M1_EMAX = 2  # exponent of e2m1's largest power of two (4 ≤ 6 < 8)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """float → e2m1 codes (uint8 0..15), nearest with ties to even, saturating."""
    v = values.to(torch.float32)
    mag = v.abs().clamp(max=E2M1_MAX).contiguous()
    low = torch.bucketize(mag, _MIDPOINTS, right=False)
    high = torch.bucketize(mag, _MIDPOINTS, right=True)
    code = torch.where((low == high) | (low % 2 == 0), low, high)
    sign = (v < 0) & (code > 0)  # no negative zero
    return (code | (sign.to(torch.int64) << 3)).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int64)
    magnitude = E2M1_VALUES[c & 0x7]
    return torch.where((c & 0x8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2J] → packed uint8 [..., J], low nibble = even index."""
    return pack_int4(codes.to(torch.int8))


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return (unpack_int4(packed).to(torch.int16) & 0xF).to(torch.uint8)


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    n, k = weight.shape
    kp = -(-k // block) * block
    return F.pad(weight.detach().to(torch.float32), (0, kp - k)).view(n, kp // block, block)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] → (packed e2m1 uint8 [N, Kp/2], e8m0 scales uint8 [N, Kp/32])."""
    blocks = _blocks(weight, MX_BLOCK)
    amax = blocks.abs().amax(dim=2)
    exponent = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - E2M1_EMAX, -E8M0_BIAS
    ).clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = encode_e2m1(blocks / torch.exp2(exponent)[..., None])
    scales = (exponent + E8M0_BIAS).to(torch.uint8)
    return pack_fp4(codes.view(weight.shape[0], -1)), scales


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> torch.Tensor:
    n = packed.shape[0]
    values = decode_e2m1(unpack_fp4(packed)).view(n, -1, MX_BLOCK)
    scale = torch.exp2(scales.to(torch.float32) - E8M0_BIAS)
    return (values * scale[..., None]).view(n, -1)[:, :in_features]


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] → (packed uint8 [N, Kp/2], e4m3 scales [N, Kp/16], float32 global [])."""
    blocks = _blocks(weight, NV_BLOCK)
    amax = blocks.abs().amax(dim=2)
    top = amax.max()
    global_scale = torch.where(top > 0, top / (E2M1_MAX * FP8_E4M3_MAX), torch.ones_like(top))
    block_scale = (amax / E2M1_MAX / global_scale).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    divisor = block_scale.to(torch.float32) * global_scale
    divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    codes = encode_e2m1(blocks / divisor[..., None])
    return pack_fp4(codes.view(weight.shape[0], -1)), block_scale, global_scale.to(torch.float32)


def dequantize_nvfp4(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, in_features: int
) -> torch.Tensor:
    n = packed.shape[0]
    values = decode_e2m1(unpack_fp4(packed)).view(n, -1, NV_BLOCK)
    scale = block_scale.to(torch.float32) * global_scale
    return (values * scale[..., None]).view(n, -1)[:, :in_features]
