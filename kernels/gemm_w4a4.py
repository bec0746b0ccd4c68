"""W4A4 GEMM (SVDQuant): 4-bit activations × 4-bit weights with per-group scales, the
low-rank up-projection and the bias in the epilogue, one output write.

Notation: M rows, N outputs, K inputs, G the group, Kp = K rounded up to G, R the rank.
Operands (both [rows, Kp/2] packed, low nibble first, from ``quantize_act_4bit`` and
the checkpoint): codes a [M, Kp/2], w [N, Kp/2]; scales sa [M, Kp/G], sw [N, Kp/G].

Hopper (sm_90) has no 4-bit tensor-core MMA, so the main loop unpacks in registers and
runs an 8-bit (or 16-bit) MMA per group, applying the group's scales to that partial
product before adding it to the float32 accumulator:
    INT4   (G = 64/128) codes sign-extend to int8 exactly; int8 MMA, exact int32 per
           group; acc += part · sa[m, g] · sw[n, g].
    MXFP4  (G = 32)  e2m1 values are exact in e4m3; FP8 MMA per 32-wide block;
           acc += part · 2^ea[m, g] · 2^ew[n, g].
    NVFP4  (G = 16)  a 16-wide block is narrower than the 8-bit MMA's K of 32, so each
           operand is dequantized to bfloat16 with its e4m3 block scale (e2m1 × e4m3 is
           exact in bfloat16) and multiplied with the 16-bit MMA, 64 wide per step; the
           two float32 per-tensor scales multiply the accumulator once at the end.
The cost against a native 4-bit MMA: INT4 and MXFP4 run at the 8-bit MMA rate plus a
BLOCK_M × BLOCK_N scale-and-add per group; NVFP4 at the 16-bit rate.

Blackwell (sm_100, sm_120) multiplies MXFP4 and NVFP4 natively: ``_w4a4_scaled_kernel``
hands the packed codes and the block scales as they are to ``tl.dot_scaled``, which
Triton lowers to the block-scaled MMA (``tcgen05.mma … kind::mxf4`` / ``mxf4nvf4`` on
sm_100, ``mma.sync … kind::mxf4nvf4`` on sm_120; the AOT gate checks both): no unpacking,
no per-group rescale. The layouts already agree: two e2m1 codes a byte, the first in
the low nibble, along K; e8m0 (MXFP4) or e4m3 (NVFP4) scales [rows, Kp/G]. On Hopper
``tl.dot_scaled`` is emulated with bfloat16 MMA, slower than the path above, so Hopper
and older keep it; INT4 has no block-scaled MMA anywhere and keeps it too.

Reference: ``reference.w4.linear_w4a4`` (dequantize both, float32 matmul); the sums
agree to float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.cuda import block_scaled
from qcompile.kernels.gemm_parts import GROUP_M, dot_precision, finish, grid_2d, tile
from qcompile.kernels.numerics import (
    alloc,
    cast_rne,
    decode_e2m1,
    exp2i,
    mma,
    ptr,
    row_stride,
    scale_groups,
    sign_extend_int4,
    unpack_nibbles,
)
from qcompile.kernels.quantize_act_4bit import FORMAT_ID, quantize_act_4bit
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

NVFP4_BLOCK_K = 64  # four NVFP4 blocks per 16-bit MMA step

_TUNER = Tuner(
    "linear_w4a4",
    default=config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    hopper=[
        # Each group's partial product is a second BLOCK_M × BLOCK_N float32 tile beside
        # the accumulator: 128×256 and 256×128 tiles spill even with 8 warps.
        config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=5),
    ],
)

# Float32 activations (never tuned): the default's 4 warps spill MXFP4's float32 branch
# and epilogue on sm_89; 8 warps halve each thread's share of the tile.
_FLOAT32 = config(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)

# Blackwell's block-scaled GEMM: one config, not tuned (no Blackwell part has run it;
# the tuner times candidates on sm_90 only), 16-bit activations only. 128 × 128 tiles
# (the native MMA wants 128 rows on sm_100), 64 codes (32 bytes) of K a step.
# Spill-free on sm_100 and sm_120 (scripts/aot_check.py); 4 warps, or 128 codes a step,
# spill in the epilogue where sm_120 keeps the accumulator in registers. Not for
# float32 activations: the exact (FMA) branch product spills on both targets at every
# tile tried (128 × 32 … 128 × 64, 8 and 16 warps), and so does `_w4a4_kernel`'s NVFP4
# path there; the CUDA op runs the reference for them on Blackwell (``cuda.py``).
_SCALED = config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


@triton.jit(do_not_specialize=ROWS)
def _w4a4_kernel(
    # pointers
    a_ptr,
    a_scale_ptr,
    a_global_ptr,
    w_ptr,
    w_scale_ptr,
    w_global_ptr,
    bias_ptr,
    lora_act_ptr,
    lora_up_ptr,
    y_ptr,
    # sizes
    M,
    N,
    Kp,
    R,
    # strides
    stride_am,
    stride_asm,
    stride_wn,
    stride_wsn,
    stride_lam,
    stride_lun,
    stride_ym,
    # meta-parameters
    FMT: tl.constexpr,  # 1 int4, 2 mxfp4, 3 nvfp4
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # = G for INT4 and MXFP4
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    safe_rows = rows % M
    safe_cols = cols % N
    halves = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        half = k0 // 2 + halves
        a = unpack_nibbles(
            tl.load(a_ptr + safe_rows[:, None] * stride_am + half[None, :]), BLOCK_M, BLOCK_K
        )
        w = unpack_nibbles(
            tl.load(w_ptr + safe_cols[:, None] * stride_wn + half[None, :]), BLOCK_N, BLOCK_K
        )
        if FMT == 3:
            groups = k0 // G + tl.arange(0, BLOCK_K // G)
            sa = tl.load(a_scale_ptr + safe_rows[:, None] * stride_asm + groups[None, :])
            sw = tl.load(w_scale_ptr + safe_cols[:, None] * stride_wsn + groups[None, :])
            a32 = scale_groups(decode_e2m1(a), sa.to(tl.float32), BLOCK_M, BLOCK_K, BLOCK_K // G)
            w32 = scale_groups(decode_e2m1(w), sw.to(tl.float32), BLOCK_N, BLOCK_K, BLOCK_K // G)
            a16 = cast_rne(a32, tl.bfloat16)
            w16 = cast_rne(w32, tl.bfloat16)
            acc = mma(a16, tl.trans(w16), acc, "tf32")
        else:
            group = k0 // G
            sa = tl.load(a_scale_ptr + safe_rows * stride_asm + group)
            sw = tl.load(w_scale_ptr + safe_cols * stride_wsn + group)
            if FMT == 1:
                a8 = sign_extend_int4(a).to(tl.int8)
                w8 = sign_extend_int4(w).to(tl.int8)
                part = tl.dot(a8, tl.trans(w8), out_dtype=tl.int32).to(tl.float32)
            else:
                a8 = decode_e2m1(a).to(tl.float8e4nv)
                w8 = decode_e2m1(w).to(tl.float8e4nv)
                part = tl.dot(a8, tl.trans(w8))
                sa = exp2i(sa.to(tl.int32) - 127)
                sw = exp2i(sw.to(tl.int32) - 127)
            acc += part * sa[:, None] * sw[None, :]
    if FMT == 3:
        acc = acc * (tl.load(a_global_ptr) * tl.load(w_global_ptr))
    finish(
        acc, rows, cols, bias_ptr, lora_act_ptr, lora_up_ptr, y_ptr, M, N, R,
        stride_lam, stride_lun, stride_ym,
        HAS_BIAS=HAS_BIAS, HAS_LORA=HAS_LORA, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
    )  # fmt: skip


@triton.jit(do_not_specialize=ROWS)
def _w4a4_scaled_kernel(
    # pointers
    a_ptr,
    a_scale_ptr,
    a_global_ptr,
    w_ptr,
    w_scale_ptr,
    w_global_ptr,
    bias_ptr,
    lora_act_ptr,
    lora_up_ptr,
    y_ptr,
    # sizes
    M,
    N,
    Kp,
    R,
    # strides
    stride_am,
    stride_asm,
    stride_wn,
    stride_wsn,
    stride_lam,
    stride_lun,
    stride_ym,
    # meta-parameters
    FMT: tl.constexpr,  # 2 mxfp4, 3 nvfp4
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # codes per step, a multiple of 64
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    safe_rows = rows % M
    safe_cols = cols % N
    halves = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // G)
    # past Kp: code 0 (+0) under a finite scale (e8m0 127 is 1, e4m3 0 is 0)
    pad_scale = 127 if FMT == 2 else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        half = k0 // 2 + halves
        group = k0 // G + groups
        half_ok = half[None, :] < Kp // 2
        group_ok = group[None, :] < Kp // G
        a = tl.load(a_ptr + safe_rows[:, None] * stride_am + half[None, :], mask=half_ok, other=0)
        w = tl.load(w_ptr + safe_cols[:, None] * stride_wn + half[None, :], mask=half_ok, other=0)
        sa = tl.load(
            a_scale_ptr + safe_rows[:, None] * stride_asm + group[None, :],
            mask=group_ok,
            other=pad_scale,
        )
        sw = tl.load(
            w_scale_ptr + safe_cols[:, None] * stride_wsn + group[None, :],
            mask=group_ok,
            other=pad_scale,
        )
        acc = tl.dot_scaled(a, sa, "e2m1", tl.trans(w), sw, "e2m1", acc)
    if FMT == 3:
        acc = acc * (tl.load(a_global_ptr) * tl.load(w_global_ptr))
    finish(
        acc, rows, cols, bias_ptr, lora_act_ptr, lora_up_ptr, y_ptr, M, N, R,
        stride_lam, stride_lun, stride_ym,
        HAS_BIAS=HAS_BIAS, HAS_LORA=HAS_LORA, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
    )  # fmt: skip


def linear_w4a4(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    fmt: str,
    group_size: int,
    scaled: bool | None = None,
) -> torch.Tensor:
    """SVDQuant linear: the activation pass, then this GEMM. y [..., N] in x.dtype.
    `scaled`: the block-scaled kernel (MXFP4/NVFP4; default: for 16-bit x where the GPU
    has its MMA)."""
    if fmt not in ("int4", "mxfp4", "nvfp4"):
        raise ValueError(f"unknown 4-bit format {fmt!r}; expected int4, mxfp4 or nvfp4")
    if scaled is None:
        scaled = fmt != "int4" and x.dtype is not torch.float32 and block_scaled(x.device)
    elif scaled and fmt == "int4":
        raise ValueError(
            "linear_w4a4(scaled=True): INT4 has no block-scaled MMA (MXFP4 and NVFP4 do); "
            "pass scaled=None"
        )
    k = x.shape[-1]
    m, n = x.numel() // k, weight.shape[0]
    g = group_size
    kp = triton.cdiv(k, g) * g
    act = quantize_act_4bit(x, smooth, lora_down, fmt, g)
    w = weight.contiguous()
    w_scale = weight_scale.reshape(n, -1).contiguous()
    lora_up = None if lora_up is None else lora_up.contiguous()
    rank = 0 if lora_down is None else lora_down.shape[0]
    block_k = NVFP4_BLOCK_K if fmt == "nvfp4" else g
    if kp % block_k:  # NVFP4 with Kp not a multiple of 64: one 16-wide block per step
        block_k = g
    y = alloc((m, n), x.dtype, x.device)

    def launch(c, kernel=_w4a4_kernel):
        kernel[grid_2d(m, n, c)](
            act.packed, act.scale, ptr(act.global_scale, w), w, w_scale,
            ptr(weight_global_scale, w), ptr(bias, w), ptr(act.lora_act, w), ptr(lora_up, w), y,
            m, n, kp, rank,
            act.packed.stride(0), act.scale.stride(0), w.stride(0), w_scale.stride(0),
            row_stride(act.lora_act), row_stride(lora_up), y.stride(0),
            FMT=FORMAT_ID[fmt], G=g, HAS_BIAS=bias is not None,
            HAS_LORA=act.lora_act is not None, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=GROUP_M,
            **{"BLOCK_K": block_k, **c.kwargs()},
        )  # fmt: skip

    if m and scaled:
        launch(_SCALED, _w4a4_scaled_kernel)
    elif m:
        key = (m_bucket(m), n, k, fmt, g, rank, x.dtype)
        if x.dtype is torch.float32:
            launch(_FLOAT32)
        else:
            launch(_TUNER.pick(key, x.device, launch, tune=tunes(x.dtype, k, n)))
    return y.view(*x.shape[:-1], n)
