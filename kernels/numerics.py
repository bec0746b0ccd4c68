"""Bit-exact numeric helpers shared by the Triton kernels (``@triton.jit`` functions).

The kernels must produce the same codes as the references in ``kernels/reference``,
bit for bit, on a GPU and under ``TRITON_INTERPRET=1``. Three things stand in the way
and are handled here once:

- rounding to nearest-even: ``libdevice.rint`` does not run under the interpreter, so
  `rne` uses the float32 trick (v + 1.5·2²³) − 1.5·2²³, exact for |v| < 2²²;
- float32 → e4m3: the interpreter's cast neither rounds ties to even nor keeps
  subnormals, so `round_e4m3` rounds on the e4m3 grid first and the cast is then exact;
- float32 → bfloat16: the interpreter truncates; `cast_rne` rounds the bits first;
- powers of two: `exp2i` builds 2^e from the exponent bits (exact down to 2⁻¹²⁷), so no
  kernel depends on an approximate ``exp2`` / ``log2``.

Matrix products go through `mma`: Triton 3.9's interpreter multiplies bfloat16 operands
wrongly (values off by ~1e10), so under ``TRITON_INTERPRET=1`` bfloat16 operands are
widened to float32 first. The widening is exact and both paths accumulate exact products
in float32, so the interpreter still tests the kernel's arithmetic up to summation order.

Divisions that produce codes use ``tl.math.div_rn`` (IEEE round-to-nearest), because a
plain ``/`` compiles to an approximate division on the GPU.
"""

import os

import torch
import triton
import triton.language as tl

from qcompile.kernels.reference import fp8

# Read when this module is imported, as @triton.jit reads TRITON_INTERPRET when it decorates.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

FP8_E4M3_MAX = tl.constexpr(fp8.FP8_E4M3_MAX)
TWO_POW_M127 = tl.constexpr(5.877471754111438e-39)  # 2**-127, a float32 subnormal


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a · b on tensor cores (`PRECISION` for float32 operands: "tf32" or "ieee")."""
    if INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def rne(v):
    """Round float32 to the nearest integer, ties to even (|v| < 2**22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def floor_log2(v):
    """floor(log2(v)) for v > 0 from the exponent bits; subnormals and 0 give -127."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def exp2i(e):
    """2**e as float32 for int32 e in [-127, 127], exact."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(e > -127, normal, TWO_POW_M127)


@triton.jit
def round_e4m3(v):
    """float32 → the nearest e4m3 value (ties to even, saturating at ±448), as float32.

    e4m3 has 3 mantissa bits and its subnormals share 2**-6's step (2**-9), so the grid
    step at |v| is 2**(max(floor(log2|v|), -6) - 3). The result casts to float8_e4m3fn
    exactly.
    """
    mag = tl.minimum(tl.abs(v), FP8_E4M3_MAX)
    e = tl.maximum(floor_log2(mag), -6)
    r = rne(mag * exp2i(3 - e)) * exp2i(e - 3)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0.0 stays -0


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """float32 → `dtype` (16- or 32-bit float) rounding to nearest-even, everywhere."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def encode_e2m1(v):
    """float32 → e2m1 code (int32 0..15): nearest, ties to the even code, saturating.

    Magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; a tie at a midpoint goes to the even code, so
    the comparison is strict where the lower neighbour is even and inclusive otherwise.
    """
    mag = tl.minimum(tl.abs(v), 6.0)
    code = (
        (mag > 0.25).to(tl.int32)
        + (mag >= 0.75).to(tl.int32)
        + (mag > 1.25).to(tl.int32)
        + (mag >= 1.75).to(tl.int32)
        + (mag > 2.5).to(tl.int32)
        + (mag >= 3.5).to(tl.int32)
        + (mag > 5.0).to(tl.int32)
    )
    negative = (v < 0) & (code > 0)  # no negative zero
    return code | (negative.to(tl.int32) << 3)


@triton.jit
def decode_e2m1(code):
    """e2m1 code (int32 0..15) → float32 value."""
    exponent = (code >> 1) & 0x3
    half = (code & 0x1).to(tl.float32) * 0.5
    mag = tl.where(exponent == 0, half, exp2i(exponent - 1) * (1.0 + half))
    return tl.where((code & 0x8) != 0, -mag, mag)


@triton.jit
def unpack_nibbles(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Bytes [ROWS, COLS // 2] → nibbles int32 [ROWS, COLS], low nibble first."""
    b = packed.to(tl.int32)
    return tl.reshape(tl.join(b & 0xF, (b >> 4) & 0xF), (ROWS, COLS))


@triton.jit
def pack_nibbles(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Codes int32 [ROWS, COLS] (each 0..15) → bytes uint8 [ROWS, COLS // 2]."""
    even, odd = tl.split(tl.reshape(codes, (ROWS, COLS // 2, 2)))
    return (even | (odd << 4)).to(tl.uint8)


@triton.jit
def scale_groups(values, scale, ROWS: tl.constexpr, COLS: tl.constexpr, GROUPS: tl.constexpr):
    """values [ROWS, COLS] × scale [ROWS, GROUPS], each scale over COLS // GROUPS columns.

    Loading one scale per group and broadcasting it keeps the scale tile GROUPS wide
    instead of COLS wide (a [ROWS, COLS] float32 scale tile costs registers and, when
    pipelined, shared memory per stage).
    """
    if GROUPS == 1:
        return values * scale
    grouped = tl.reshape(values, (ROWS, GROUPS, COLS // GROUPS))
    return tl.reshape(grouped * scale[:, :, None], (ROWS, COLS))


@triton.jit
def sign_extend_int4(nibble):
    """Nibble 0..15 → int4 value -8..7."""
    return tl.where(nibble >= 8, nibble - 16, nibble)


# ---------------------------------------------------------------- launcher helpers


TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a 16/32-bit float output (a constexpr argument)."""
    return TL_DTYPE[dtype]


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with unit stride along K (a copy only when it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def ptr(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """An optional operand's pointer argument; when absent its flag keeps it unread."""
    return fallback if t is None else t


def row_stride(t: torch.Tensor | None, dim: int = 0) -> int:
    return 0 if t is None else t.stride(dim)


# Tests set this to fill every kernel output with garbage before launch, so an element a
# kernel forgets to write cannot pass for a correct one.
POISON = False


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs; under `POISON`: NaN floats (e4m3 0x7F), 0xA5 bytes."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point and dtype.itemsize > 1:
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0x7F if dtype is torch.float8_e4m3fn else 0xA5)
    return out
