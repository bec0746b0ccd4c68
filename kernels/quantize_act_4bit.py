"""The activation pass of a 4-bit linear: smoothing, 4-bit quantization and the low-rank
down-projection, fused into one read of x.

Notation: x [..., K] viewed as [M, K]; G the group (INT4: the recipe's, MXFP4 32, NVFP4
16); Kp = K rounded up to G; R the rank; smooth float32 [K]; lora_down [R, K].

Grid: BLOCK_M rows × a K range per program. Large M fills the GPU with row blocks
alone (one range, all of K); small M splits K as well (`gemm_parts.act_splits`) so
M = 1 runs on dozens of SMs, not one: codes and scales are per group, so ranges are
independent, and each range writes its own lora_act partial, summed after the launch.

For each BLOCK_M × BLOCK_K tile of x (BLOCK_K a multiple of G):
    x_s       = x / smooth                                   (when smoothing)
    lora_act += x_s (in lora_down's dtype) · lora_downᵀ      (float32 [M, R])
    codes, scales = Q(x_s) per row and group                 (when a format is given)
NVFP4 first needs max|x_s| over the whole tensor for its per-tensor global scale: a
small pre-pass kernel (`_amax_kernel`) reads x once more. W4A16 linears run this pass
with no format, for the low-rank branch alone.

Reference: ``reference.w4.quantize_act_4bit``; codes and scales match bit for bit,
lora_act to float32 summation order (K ranges: partial sums added in range order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qcompile.kernels.gemm_parts import act_splits, sum_ranges
from qcompile.kernels.numerics import (
    alloc,
    cast_rne,
    encode_e2m1,
    exp2i,
    floor_log2,
    mma,
    pack_nibbles,
    ptr,
    rne,
    round_e4m3,
    row_stride,
    rows_view,
)
from qcompile.kernels.reference import fp4
from qcompile.kernels.tma import program_count
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

FORMAT_ID = {None: 0, "int4": 1, "mxfp4": 2, "nvfp4": 3}
SCALE_DTYPE = {"int4": torch.float32, "mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}
NVFP4_GLOBAL_DIVISOR = fp4.E2M1_MAX * fp4.FP8_E4M3_MAX  # 6 · 448

_TUNER = Tuner(
    "quantize_act_4bit",
    default=config(BLOCK_M=16, BLOCK_K=64, num_warps=4, num_stages=2),
    hopper=[
        # Spill-free on sm_90 for every format (scripts/aot_check.py); BLOCK_K = 128
        # tiles spill in the branch-only pass, 32 × 64 with 4 warps in MXFP4's.
        config(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=2),
        config(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2),
        config(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=2),
    ],
)

# Float32 activations (never tuned): 16-row float32 tiles spill a few bytes on sm_89/90
# (around the IEEE division's slow path) on Triton 3.6 or 3.9 whatever the warps; 8 rows
# and one stage are clean on both (scripts/aot_check.py).
_FLOAT32 = config(BLOCK_M=8, BLOCK_K=64, num_warps=4, num_stages=1)


class Act4(NamedTuple):
    """What the activation pass hands the GEMM (format fields None without a format)."""

    packed: torch.Tensor | None  # uint8 [M, Kp/2]
    scale: torch.Tensor | None  # [M, Kp/G]: float32 (INT4), uint8 e8m0, float8_e4m3fn
    global_scale: torch.Tensor | None  # float32 [] (NVFP4)
    lora_act: torch.Tensor | None  # float32 [M, R]


@triton.jit(do_not_specialize=ROWS)
def _amax_kernel(
    x_ptr,
    smooth_ptr,
    partial_ptr,
    M,
    K,
    stride_xm,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = (rows[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + k, mask=k < K, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, s[None, :])
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    tl.store(partial_ptr + tl.program_id(0), tl.max(amax, axis=0))


@triton.jit(do_not_specialize=ROWS)
def _act_4bit_kernel(
    # pointers
    x_ptr,
    smooth_ptr,
    global_ptr,
    lora_down_ptr,
    q_ptr,
    scale_ptr,
    lora_act_ptr,  # float32 [splits, M, R]: one partial per K range
    # sizes
    M,
    K,
    Kp,
    R,
    K_RANGE,  # the K each program walks, a multiple of BLOCK_K
    # strides
    stride_xm,
    stride_qm,
    stride_sm,
    stride_ldr,
    stride_lam,
    stride_las,
    # meta-parameters
    FMT: tl.constexpr,  # 0 none, 1 int4, 2 mxfp4, 3 nvfp4
    G: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    NG: tl.constexpr = BLOCK_K // G
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    lora_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if FMT == 3:
        global_scale = tl.load(global_ptr)
    k_start = tl.program_id(1) * K_RANGE
    k_end = tl.minimum(Kp if FMT != 0 else K, k_start + K_RANGE)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + cols
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :],
            mask=row_ok[:, None] & (k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + k, mask=k < K, other=1.0).to(tl.float32)
            x = tl.math.div_rn(x, s[None, :])
        if HAS_LORA:
            down = tl.load(
                lora_down_ptr + ranks[None, :] * stride_ldr + k[:, None],
                mask=(k[:, None] < K) & (ranks[None, :] < R),
                other=0.0,
            )
            x16 = cast_rne(x, lora_down_ptr.dtype.element_ty)
            lora_acc = mma(x16, down, lora_acc, DOT_PRECISION)
        if FMT != 0:
            xg = tl.reshape(x, (BLOCK_M, NG, G))
            amax = tl.max(tl.abs(xg), axis=2)
            if FMT == 1:
                scale = tl.where(amax > 0, tl.math.div_rn(amax, 7.0), 1.0)
                q = rne(tl.math.div_rn(xg, scale[:, :, None]))
                code = tl.minimum(tl.maximum(q, -8.0), 7.0).to(tl.int32) & 0xF
                stored = scale
            elif FMT == 2:
                e = tl.minimum(tl.maximum(floor_log2(amax) - 2, -127), 127)
                code = encode_e2m1(xg * exp2i(-e)[:, :, None])
                stored = (e + 127).to(tl.uint8)
            else:
                block = round_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0), global_scale))
                divisor = block * global_scale
                divisor = tl.where(divisor > 0, divisor, 1.0)
                code = encode_e2m1(tl.math.div_rn(xg, divisor[:, :, None]))
                stored = block.to(tl.float8e4nv)
            packed = pack_nibbles(tl.reshape(code, (BLOCK_M, BLOCK_K)), BLOCK_M, BLOCK_K)
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            tl.store(
                q_ptr + rows[:, None] * stride_qm + half[None, :],
                packed,
                mask=row_ok[:, None] & (half[None, :] < Kp // 2),
            )
            group = k0 // G + tl.arange(0, NG)
            tl.store(
                scale_ptr + rows[:, None] * stride_sm + group[None, :],
                stored,
                mask=row_ok[:, None] & (group[None, :] < Kp // G),
            )
    if HAS_LORA:
        tl.store(
            lora_act_ptr
            + tl.program_id(1) * stride_las
            + rows[:, None] * stride_lam
            + ranks[None, :],
            lora_acc,
            mask=row_ok[:, None] & (ranks[None, :] < R),
        )


def nvfp4_global_scale(x2: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """max|x / smooth| / (6 · 448) over the whole activation (1 when it is all zero)."""
    # 32 values a thread: unaligned rows load element by element (a 64-bit address
    # each), and 64 × 256 spilled there on sm_90
    block_m, block_k, warps = 16, 256, 4
    programs = max(triton.cdiv(x2.shape[0], block_m), 1)
    partial = torch.zeros(programs, dtype=torch.float32, device=x2.device)
    if x2.shape[0]:
        _amax_kernel[(programs,)](
            x2, ptr(smooth, x2), partial, x2.shape[0], x2.shape[1],
            x2.stride(0), HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=warps,
        )  # fmt: skip
    top = partial.max()
    return torch.where(top > 0, top / NVFP4_GLOBAL_DIVISOR, torch.ones_like(top))


def quantize_act_4bit(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    fmt: str | None,
    group_size: int,
) -> Act4:
    """One pass over x: (packed codes, scales, NVFP4 global, lora_act); see the module."""
    if fmt not in FORMAT_ID:
        raise ValueError(f"unknown 4-bit format {fmt!r}; expected int4, mxfp4 or nvfp4")
    x2 = rows_view(x)
    m, k = x2.shape
    g = group_size
    kp = triton.cdiv(k, g) * g
    device = x.device
    packed = scale = global_scale = lora_act = None
    if fmt is not None:
        packed = alloc((m, kp // 2), torch.uint8, device)
        scale = alloc((m, kp // g), SCALE_DTYPE[fmt], device)
        if fmt == "nvfp4":
            global_scale = nvfp4_global_scale(x2, smooth)
    rank = 0 if lora_down is None else lora_down.shape[0]
    if lora_down is not None:
        lora_down = lora_down if lora_down.stride(-1) == 1 else lora_down.contiguous()
    if m == 0 or (fmt is None and lora_down is None):
        if lora_down is not None:
            lora_act = alloc((m, rank), torch.float32, device)
        return Act4(packed, scale, global_scale, lora_act)
    precision = "ieee" if lora_down is not None and lora_down.dtype is torch.float32 else "tf32"
    k_walk = kp if fmt is not None else k
    partials = None

    def launch(c):
        nonlocal partials
        splits, k_range = act_splits(m, k_walk, c, program_count(device))
        if lora_down is not None:
            partials = alloc((splits, m, rank), torch.float32, device)
        _act_4bit_kernel[(triton.cdiv(m, c.meta["BLOCK_M"]), splits)](
            x2, ptr(smooth, x2), ptr(global_scale, x2), ptr(lora_down, x2), ptr(packed, x2),
            ptr(scale, x2), ptr(partials, x2),
            m, k, kp, rank, k_range,
            x2.stride(0), row_stride(packed), row_stride(scale), row_stride(lora_down),
            row_stride(partials, 1), row_stride(partials),
            FMT=FORMAT_ID[fmt], G=g, HAS_SMOOTH=smooth is not None,
            HAS_LORA=lora_down is not None, DOT_PRECISION=precision,
            BLOCK_R=max(16, triton.next_power_of_2(rank)), **c.kwargs(),
        )  # fmt: skip

    def valid(c):
        return c.meta["BLOCK_K"] % g == 0

    key = (m_bucket(m), k, rank, fmt, g)
    if x2.dtype is torch.float32:
        chosen = _FLOAT32
    else:
        chosen = _TUNER.pick(key, device, launch, valid, tune=tunes(x2.dtype, k))
    launch(chosen.at_least(BLOCK_K=g))  # a group wider than the default's BLOCK_K
    if partials is not None:
        lora_act = sum_ranges(partials)
    return Act4(packed, scale, global_scale, lora_act)
