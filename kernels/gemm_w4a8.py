"""W4A8 linear: 4-bit weights widened to int8 in registers, 8-bit activations, int8
tensor-core MMA with exact int32 sums, SVDQuant's smoothing and low-rank branch.

Formats and math: ``reference.w4a8`` (two-level weight scales: an integer group scale
g ∈ [1, 16] times a float32 channel scale s, so the widened weight g·q is an exact
int8 and the K loop never rescales the accumulator). Two kernels per linear:

- ``_act_w4a8_kernel``, the activation pass, one program per BLOCK_M rows and K range:
  dynamic scales walk K twice (the row's max|x · (1/smooth)| and the low-rank
  down-projection, then the codes; the second read comes from L2), a static scale
  once. Large M fills the GPU with row blocks and one range (all of K); small M splits
  K as well (`gemm_parts.act_splits`), each range writing its own lora_act partial
  (summed after), and a dynamic scale then takes two launches: PASS 1 writes each
  range's max per row, PASS 2 takes the row's max of those (order-free, so the scale
  is bitwise the one-range one) and writes the codes. The launcher divides 1/smooth (and a static
  1/scale) once per call: an IEEE division in the kernel is a slow-path call whose
  saved registers spill.
- ``_w4a8_kernel``, the GEMM, one packed 64-wide block per K step: the weight tile is
  loaded as int32 words (four packed bytes each) with the block's two group scales, the
  low and the high nibbles of every word become four int8 weights each with three word
  operations (`_widen`), and the [BLOCK_N, 64] int8 tile is multiplied with the int8
  activation tile (wgmma on sm_90, mma.sync on sm_80/89). The epilogue (`finish`)
  applies both scales, adds lora_act · lora_upᵀ and the bias, and writes y once.

Reference: ``reference.w4a8.linear_w4a8``: codes and scales of the activation pass bit
for bit, the GEMM bit for bit without the branch (its integer sums are exact), to the
branch's 16-bit rounding with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.gemm_parts import (
    GROUP_M,
    act_splits,
    dot_precision,
    finish,
    grid_2d,
    sum_ranges,
    tile,
)
from qcompile.kernels.numerics import alloc, cast_rne, mma, ptr, rne, row_stride, rows_view
from qcompile.kernels.reference.int8 import INT8_MAX
from qcompile.kernels.reference.w4a8 import PACK_BLOCK
from qcompile.kernels.tma import program_count
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

QMAX = tl.constexpr(INT8_MAX)  # a global a @triton.jit body may read
SIGN_BITS = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as an int32

_ACT_TUNER = Tuner(
    "quantize_act_w4a8",
    # (every config here compiles without spills on sm_80/89/90, Triton 3.6 and 3.9)
    default=config(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=2),
    hopper=[
        config(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=2),
        config(BLOCK_M=8, BLOCK_K=256, num_warps=4, num_stages=2),
        # (32 × 128, 8 warps: the split pass 1 spills 32 B in fp16 on sm_90, Triton 3.9)
        config(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2),
    ],
)
_ACT_FLOAT32 = config(BLOCK_M=8, BLOCK_K=64, num_warps=4, num_stages=1)

_TUNER = Tuner(
    "linear_w4a8",
    default=config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    hopper=[
        # large M: the 8-bit MMA's tiles; two CTAs per SM hide the int32-accumulator
        # wgmma that Triton keeps synchronous (see gemm_w8a8.py)
        config(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
        # small M: narrow column tiles, the weight streamed by every SM
        config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4),
    ],
)


@triton.jit(do_not_specialize=ROWS)
def _act_w4a8_kernel(
    # pointers
    x_ptr,
    inv_smooth_ptr,  # float32 [K]: 1 / smooth, divided once by the launcher
    scale_ptr,  # dynamic: the output float32 [M]
    inv_scale_ptr,  # static: 1 / the input scale, a float32 scalar
    amax_ptr,  # PASS 1 and 2: float32 [ranges, M], each range's max|x_s| per row
    lora_down_ptr,
    q_ptr,
    lora_act_ptr,  # float32 [splits, M, R]: one partial per K range
    # sizes
    M,
    K,
    R,
    K_RANGE,  # the K each program walks, a multiple of BLOCK_K
    # strides
    stride_xm,
    stride_qm,
    stride_ldr,
    stride_lam,
    stride_las,
    # meta-parameters
    DYNAMIC: tl.constexpr,
    PASS: tl.constexpr,  # dynamic: 0 one launch, all of K; split K: 1 max and branch, 2 codes
    HAS_SMOOTH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    k_start = tl.program_id(1) * K_RANGE
    k_end = tl.minimum(K, k_start + K_RANGE)
    lora_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DYNAMIC and PASS != 2:  # first read: the row's max|x_s| and the low-rank branch
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x_s = _smoothed(x_ptr, inv_smooth_ptr, rows, row_ok, k0 + cols, K, stride_xm,
                            HAS_SMOOTH)  # fmt: skip
            amax = tl.maximum(amax, tl.max(tl.abs(x_s), axis=1))
            if HAS_LORA:
                lora_acc = _down(x_s, lora_down_ptr, lora_acc, k0 + cols, ranks, K, R,
                                 stride_ldr, DOT_PRECISION)  # fmt: skip
    if DYNAMIC and PASS == 1:  # this range's max; the row's once every range is in
        tl.store(amax_ptr + tl.program_id(1) * M + rows, amax, mask=row_ok)
    else:
        if DYNAMIC:
            if PASS == 2:  # the row's max over the ranges' (order-free: bitwise one walk's)
                amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for r in range(0, tl.num_programs(1)):
                    amax = tl.maximum(amax, tl.load(amax_ptr + r * M + rows, mask=row_ok,
                                                    other=0.0))  # fmt: skip
            scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
            if tl.program_id(1) == 0:
                tl.store(scale_ptr + rows, scale, mask=row_ok)
            inv_scale = tl.math.div_rn(1.0, scale)  # one division per row, not per x
        else:
            inv_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(inv_scale_ptr)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + cols
            x_s = _smoothed(x_ptr, inv_smooth_ptr, rows, row_ok, k, K, stride_xm, HAS_SMOOTH)
            if HAS_LORA and not DYNAMIC:
                lora_acc = _down(x_s, lora_down_ptr, lora_acc, k, ranks, K, R, stride_ldr,
                                 DOT_PRECISION)  # fmt: skip
            v = x_s * inv_scale[:, None]
            q = rne(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(tl.int8)
            tl.store(q_ptr + rows[:, None] * stride_qm + k[None, :], q,
                     mask=row_ok[:, None] & (k[None, :] < K))  # fmt: skip
    if HAS_LORA and PASS != 2:
        tl.store(lora_act_ptr + tl.program_id(1) * stride_las + rows[:, None] * stride_lam
                 + ranks[None, :], lora_acc,
                 mask=row_ok[:, None] & (ranks[None, :] < R))  # fmt: skip


@triton.jit
def _smoothed(x_ptr, inv_smooth_ptr, rows, row_ok, k, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    """x · (1 / smooth) for one tile, float32 (0 past M and K)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                mask=row_ok[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)  # fmt: skip
    if HAS_SMOOTH:
        x = x * tl.load(inv_smooth_ptr + k, mask=k < K, other=1.0)[None, :]
    return x


@triton.jit
def _down(x_s, lora_down_ptr, lora_acc, k, ranks, K, R, stride_ldr, DOT_PRECISION: tl.constexpr):
    """lora_acc + x_s (in lora_down's dtype) · lora_down[:, k]ᵀ."""
    down = tl.load(lora_down_ptr + ranks[None, :] * stride_ldr + k[:, None],
                   mask=(k[:, None] < K) & (ranks[None, :] < R), other=0.0)  # fmt: skip
    return mma(cast_rne(x_s, lora_down_ptr.dtype.element_ty), down, lora_acc, DOT_PRECISION)


@triton.jit(do_not_specialize=ROWS)
def _w4a8_kernel(
    # pointers
    a_ptr,  # int8 [M, K]
    a_scale_ptr,  # float32 [M] or []
    w_ptr,  # int32 words of the packed weight [N, Kp / 8] (see reference.w4a8)
    g_ptr,  # uint8 [N, Kp / G]
    s_ptr,  # float32 [N]
    bias_ptr,
    lora_act_ptr,
    lora_up_ptr,
    y_ptr,
    # sizes
    M,
    N,
    K,
    R,
    # strides
    stride_am,
    stride_wn,
    stride_gn,
    stride_lam,
    stride_lun,
    stride_ym,
    # meta-parameters
    ROW_SCALE: tl.constexpr,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # = PACK_BLOCK: one packed block of 64 per step
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    safe_rows = rows % M
    safe_cols = cols % N
    ks = tl.arange(0, BLOCK_K)
    words = tl.arange(0, BLOCK_K // 8)  # 8 int32 words = 32 bytes = one 64-wide block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + safe_rows[:, None] * stride_am + (k0 + ks)[None, :],
                    mask=(k0 + ks)[None, :] < K, other=0)  # fmt: skip
        # the block is whole (Kp is a multiple of 64); past K its weights are 0
        w = tl.load(w_ptr + safe_cols[:, None] * stride_wn + (k0 // 8 + words)[None, :])
        g_low = tl.load(g_ptr + safe_cols * stride_gn + k0 // G).to(tl.int32)
        g_high = tl.load(g_ptr + safe_cols * stride_gn + (k0 + BLOCK_K // 2) // G).to(tl.int32)
        low = _widen(w & 0x0F0F0F0F, g_low, BLOCK_N, BLOCK_K // 2)
        high = _widen((w >> 4) & 0x0F0F0F0F, g_high, BLOCK_N, BLOCK_K // 2)
        both = tl.permute(tl.join(low, high), (0, 2, 1))  # [BLOCK_N, 2, 32]: k = 32h + j
        acc = tl.dot(a, tl.trans(tl.reshape(both, (BLOCK_N, BLOCK_K))), acc, out_dtype=tl.int32)
    out = acc.to(tl.float32)
    if ROW_SCALE:
        out = out * tl.load(a_scale_ptr + safe_rows)[:, None]
    else:
        out = out * tl.load(a_scale_ptr)
    out = out * tl.load(s_ptr + safe_cols)[None, :]
    finish(
        out, rows, cols, bias_ptr, lora_act_ptr, lora_up_ptr, y_ptr, M, N, R,
        stride_lam, stride_lun, stride_ym,
        HAS_BIAS=HAS_BIAS, HAS_LORA=HAS_LORA, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
    )  # fmt: skip


@triton.jit
def _widen(nibbles, g, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 words holding four offset codes u ∈ [1, 15] (one per byte) → int8 [ROWS,
    COLS] weights (u − 8)·g, four per three word operations: each byte becomes
    u·g + 128 − 8g ∈ [9, 247] without carrying into the next, and flipping its top bit
    turns that into the signed (u − 8)·g (see reference.w4a8)."""
    bias = (128 - 8 * g) * 0x01010101
    biased = (nibbles * g[:, None] + bias[:, None]) ^ SIGN_BITS
    b0, b1 = biased.to(tl.int8), (biased >> 8).to(tl.int8)
    b2, b3 = (biased >> 16).to(tl.int8), (biased >> 24).to(tl.int8)
    # join stacks along a new last axis: ((b0, b2), (b1, b3)) flattens to b0 b1 b2 b3
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (ROWS, COLS))


def quantize_act_w4a8(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    input_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The activation pass: (x_q int8 [M, K], scale float32 [M] or the static [],
    lora_act float32 [M, R] or None); see ``reference.w4a8.quantize_act_w4a8``."""
    x2 = rows_view(x)
    m, k = x2.shape
    dynamic = input_scale is None
    q = alloc((m, k), torch.int8, x.device)
    if dynamic:
        scale = alloc((m,), torch.float32, x.device)
        inv_scale = scale  # unread
    else:
        scale = input_scale.reshape(()).to(torch.float32)
        inv_scale = 1.0 / scale  # correctly rounded, once per call (reference.w4a8)
    # 1 / smooth once per call: an IEEE division in the kernel is a slow-path call whose
    # saved registers spill
    inv_smooth = None if smooth is None else 1.0 / smooth.to(torch.float32)
    rank = 0 if lora_down is None else lora_down.shape[0]
    if lora_down is not None:
        lora_down = lora_down if lora_down.stride(-1) == 1 else lora_down.contiguous()
    partials = None

    def launch(c):
        nonlocal partials
        splits, k_range = act_splits(m, k, c, program_count(x.device))
        if lora_down is not None:
            partials = alloc((splits, m, rank), torch.float32, x.device)
        passes = (1, 2) if dynamic and splits > 1 else (0,)
        amax = alloc((splits, m), torch.float32, x.device) if passes != (0,) else None
        for pass_ in passes:
            _act_w4a8_kernel[(triton.cdiv(m, c.meta["BLOCK_M"]), splits)](
                x2, ptr(inv_smooth, x2), scale, inv_scale, ptr(amax, x2), ptr(lora_down, x2), q,
                ptr(partials, x2),
                m, k, rank, k_range,
                x2.stride(0), q.stride(0), row_stride(lora_down), row_stride(partials, 1),
                row_stride(partials),
                DYNAMIC=dynamic, PASS=pass_, HAS_SMOOTH=smooth is not None,
                HAS_LORA=lora_down is not None, DOT_PRECISION=dot_precision(x.dtype),
                BLOCK_R=max(16, triton.next_power_of_2(rank)), **c.kwargs(),
            )  # fmt: skip

    if m:
        if x.dtype is torch.float32:
            launch(_ACT_FLOAT32)
        else:
            key = (m_bucket(m), k, dynamic, rank, x.dtype)
            launch(_ACT_TUNER.pick(key, x.device, launch, tune=tunes(x.dtype, k)))
    lora_act = None
    if lora_down is not None:
        if partials is None:  # m == 0
            lora_act = alloc((m, rank), torch.float32, x.device)
        else:
            lora_act = sum_ranges(partials)
    return q, scale, lora_act


def linear_w4a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    input_scale: torch.Tensor | None,
) -> torch.Tensor:
    """The W4A8 linear: the activation pass, then the GEMM. y [..., N] in x.dtype."""
    k = x.shape[-1]
    n = weight.shape[0]
    g = 2 * weight.shape[1] // group_scale.shape[1]  # Kp / (Kp / G)
    if weight.shape[1] % (PACK_BLOCK // 2):
        raise ValueError(
            f"linear_w4a8: packed weight {tuple(weight.shape)} is not whole {PACK_BLOCK}-wide "
            "blocks; pack it with reference.w4a8.quantize_w4a8_weight"
        )
    x_q, x_scale, lora_act = quantize_act_w4a8(x, smooth, lora_down, input_scale)
    m = x_q.shape[0]
    w = weight.contiguous().view(torch.int32)  # four packed bytes per word
    gs = group_scale.contiguous()
    s = channel_scale.reshape(-1).to(torch.float32).contiguous()
    lora_up = None if lora_up is None else lora_up.contiguous()
    rank = 0 if lora_down is None else lora_down.shape[0]
    y = alloc((m, n), x.dtype, x.device)

    def launch(c):
        _w4a8_kernel[grid_2d(m, n, c)](
            x_q, x_scale, w, gs, s, ptr(bias, w), ptr(lora_act, w), ptr(lora_up, w), y,
            m, n, k, rank,
            x_q.stride(0), w.stride(0), gs.stride(0), row_stride(lora_act), row_stride(lora_up),
            y.stride(0),
            ROW_SCALE=input_scale is None, G=g,
            HAS_BIAS=bias is not None, HAS_LORA=lora_act is not None,
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=max(16, triton.next_power_of_2(rank)),
            BLOCK_K=PACK_BLOCK, GROUP_M=GROUP_M, **c.kwargs(),
        )  # fmt: skip

    if m:
        key = (m_bucket(m), n, k, g, rank, input_scale is None, x.dtype)
        # float32 models run the default: a float32 branch epilogue spills the wide tiles
        launch(_TUNER.pick(key, x.device, launch, tune=tunes(x.dtype, k, n)))
    return y.view(*x.shape[:-1], n)
