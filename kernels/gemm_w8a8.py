"""W8A8 GEMM: INT8 × INT8 (exact int32 accumulation) or FP8 e4m3 × e4m3 (float32), with
per-tensor or per-row activation scales, per-tensor or per-channel weight scales, bias
and a 16-bit (or float32) output, as one Triton kernel.

Notation: x_q [M, K] (int8 / float8_e4m3fn), x_scale float32 [] or [M, 1]; weight
[N, K] (same dtype, K contiguous: the "TN" layout Hopper's 8-bit MMA wants for both
operands), weight_scale float32 [] or [N]; y [M, N] = (x_q · weightᵀ) · x_scale ·
weight_scale + bias.

Two kernels compute it:
- ``_w8a8_tma_kernel`` on Hopper and later (sm_90+) when every operand suits TMA (16-byte
  aligned base and row stride): persistent (one program per SM walks output tiles in
  GROUP_M-row super-groups), operand tiles by TMA (``cp.async.bulk.tensor``) into a
  multi-stage ring that the compiler pipelines against wgmma, INT8 and FP8 alike, and an
  epilogue that applies the scales and bias and stores the tile by TMA in
  ``EPILOGUE_SPLIT`` column slices (less of the tile live in registers and shared
  memory at once). Its small-M candidates use 64-row, 32/64-column tiles, so M = 1 at
  N = 12288 spreads over 192–384 tiles instead of 96.
- ``_w8a8_kernel`` everywhere else (sm_80/89, unaligned operands, the interpreter's
  default): one program per tile, pointer loads that the compiler turns into cp.async.

Reference: ``reference.act.linear_w8a8``. INT8 sums are exact on both sides, so the
outputs agree to the rounding of the scale products; FP8 to float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.gemm_parts import GROUP_M, finish, grid_2d, tile, tile_of
from qcompile.kernels.numerics import alloc, cast_rne, ptr, rows_view, tl_dtype
from qcompile.kernels.tma import descriptor, program_count, tma_aligned, tma_capable
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

_TUNER = Tuner(
    "linear_w8a8",
    default=config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    hopper=[
        config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
        config(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4),
    ],
)


_TMA_TUNER = Tuner(
    "linear_w8a8_tma",
    default=config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
    hopper=[
        # large M: the tile of Triton's persistent FP8 matmul, 3 and 4 stages deep
        config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
        # INT8: Triton keeps a wgmma with an int32 accumulator synchronous (wait 0 after
        # each step), so two CTAs per SM take turns on the tensor cores instead
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        # small M: narrow column tiles so every SM streams a share of the weight
        config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
        config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    ],
)


@triton.jit(do_not_specialize=ROWS)
def _w8a8_tma_kernel(
    # TMA descriptors: x_q [M, K] block [BLOCK_M, BLOCK_K], weight [N, K] block
    # [BLOCK_N, BLOCK_K], y [M, N] block [BLOCK_M, BLOCK_N / EPILOGUE_SPLIT]
    a_desc,
    w_desc,
    y_desc,
    # pointers
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    # sizes
    M,
    N,
    K,
    PROGRAMS,  # the persistent grid: one program per SM
    # meta-parameters
    ROW_SCALE: tl.constexpr,
    CHANNEL_SCALE: tl.constexpr,
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    steps = tl.cdiv(K, BLOCK_K)
    SLICE_N: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    for t in tl.range(tl.program_id(0), tiles, PROGRAMS):
        pid_m, pid_n = tile_of(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT8 else tl.float32)
        for step in range(steps):  # TMA fills past K (and past M, N) with zeros
            a = a_desc.load([row0, step * BLOCK_K])
            w = w_desc.load([col0, step * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32 if IS_INT8 else tl.float32)
        out = acc.to(tl.float32)
        rows = row0 + tl.arange(0, BLOCK_M)
        if ROW_SCALE:
            out = out * tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
        else:
            out = out * tl.load(a_scale_ptr)
        if EPILOGUE_SPLIT == 2:
            halves = tl.permute(tl.reshape(out, (BLOCK_M, 2, SLICE_N)), (0, 2, 1))
            left, right = tl.split(halves)
            _store_slice(left, y_desc, w_scale_ptr, bias_ptr, row0, col0, N,
                         CHANNEL_SCALE, HAS_BIAS, OUT_DTYPE, SLICE_N)  # fmt: skip
            _store_slice(right, y_desc, w_scale_ptr, bias_ptr, row0, col0 + SLICE_N, N,
                         CHANNEL_SCALE, HAS_BIAS, OUT_DTYPE, SLICE_N)  # fmt: skip
        else:
            _store_slice(out, y_desc, w_scale_ptr, bias_ptr, row0, col0, N,
                         CHANNEL_SCALE, HAS_BIAS, OUT_DTYPE, SLICE_N)  # fmt: skip


@triton.jit
def _store_slice(
    out, y_desc, w_scale_ptr, bias_ptr, row0, col0, N,
    CHANNEL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    SLICE_N: tl.constexpr,
):  # fmt: skip
    """× weight scale, + bias, one rounding, a TMA store of [BLOCK_M, SLICE_N] at
    (row0, col0); the store drops what lies past M and N."""
    cols = col0 + tl.arange(0, SLICE_N)
    if CHANNEL_SCALE:
        out = out * tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    else:
        out = out * tl.load(w_scale_ptr)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y_desc.store([row0, col0], cast_rne(out, OUT_DTYPE))


@triton.jit(do_not_specialize=ROWS)
def _w8a8_kernel(
    # pointers
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    y_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_am,
    stride_wn,
    stride_ym,
    # meta-parameters
    ROW_SCALE: tl.constexpr,  # x_scale per row (dynamic) or one scalar (static)
    CHANNEL_SCALE: tl.constexpr,  # weight_scale per output channel or one scalar
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    safe_rows = rows % M  # in-bounds loads; the store masks
    safe_cols = cols % N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT8 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(
            a_ptr + safe_rows[:, None] * stride_am + (k0 + ks)[None, :],
            mask=k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + safe_cols[:, None] * stride_wn + (k0 + ks)[None, :],
            mask=k_ok[None, :],
            other=0.0,
        )
        if IS_INT8:  # exact int32 sums (tl.dot's default out_dtype is float32)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    out = acc.to(tl.float32)
    if ROW_SCALE:
        out = out * tl.load(a_scale_ptr + safe_rows)[:, None]
    else:
        out = out * tl.load(a_scale_ptr)
    if CHANNEL_SCALE:
        out = out * tl.load(w_scale_ptr + safe_cols)[None, :]
    else:
        out = out * tl.load(w_scale_ptr)
    finish(
        out, rows, cols, bias_ptr, y_ptr, y_ptr, y_ptr, M, N, 0, 0, 0, stride_ym,
        HAS_BIAS=HAS_BIAS, HAS_LORA=False, DOT_PRECISION="ieee", BLOCK_R=16,
    )  # fmt: skip


def linear_w8a8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    tma: bool | None = None,
) -> torch.Tensor:
    """y [..., N] in `out_dtype`; see the module docstring for the operands. `tma`
    picks the kernel (None: the TMA kernel wherever it can run)."""
    if x_q.dtype != weight.dtype or x_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(
            f"linear_w8a8 multiplies int8 × int8 or float8_e4m3fn × float8_e4m3fn, "
            f"got {x_q.dtype} × {weight.dtype}"
        )
    k = x_q.shape[-1]
    a = rows_view(x_q)
    m, n = a.shape[0], weight.shape[0]
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    a_scale = x_scale.reshape(-1).to(torch.float32).contiguous()
    w_scale = weight_scale.reshape(-1).to(torch.float32).contiguous()
    if a_scale.numel() not in (1, m) or w_scale.numel() not in (1, n):
        raise ValueError(
            f"linear_w8a8: x_scale {tuple(x_scale.shape)} / weight_scale "
            f"{tuple(weight_scale.shape)} must be per-tensor or per-row / per-channel "
            f"for M={m}, N={n}"
        )
    y = alloc((m, n), out_dtype, x_q.device)
    flags = dict(
        ROW_SCALE=a_scale.numel() > 1, CHANNEL_SCALE=w_scale.numel() > 1,
        IS_INT8=a.dtype is torch.int8, HAS_BIAS=bias is not None, GROUP_M=GROUP_M,
    )  # fmt: skip
    aligned = all(tma_aligned(t) for t in (a, w, y))
    if tma is None:
        tma = tma_capable(x_q.device) and aligned
    elif tma and not aligned:
        raise ValueError(
            f"linear_w8a8(tma=True): TMA needs 16-byte aligned rows, got K={k} with "
            f"N={n} {out_dtype} output; pass tma=None to fall back to the pointer kernel"
        )
    key = (m_bucket(m), n, k, a.dtype, flags["ROW_SCALE"], flags["CHANNEL_SCALE"], tma)

    def launch(c):
        _w8a8_kernel[grid_2d(m, n, c)](
            a, a_scale, w, w_scale, ptr(bias, a), y,
            m, n, k, a.stride(0), w.stride(0), y.stride(0), **flags, **c.kwargs(),
        )  # fmt: skip

    def launch_tma(c):
        block_m, block_n, block_k = (c.meta[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        split = 2 if block_n >= 128 else 1
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        programs = min(program_count(x_q.device), tiles)
        _w8a8_tma_kernel[(programs,)](
            descriptor(a, block_m, block_k), descriptor(w, block_n, block_k),
            descriptor(y, block_m, block_n // split), a_scale, w_scale, ptr(bias, a),
            m, n, k, programs, **flags, OUT_DTYPE=tl_dtype(out_dtype), EPILOGUE_SPLIT=split,
            **c.kwargs(),
        )  # fmt: skip

    if m and tma:
        launch_tma(_TMA_TUNER.pick(key, x_q.device, launch_tma, tune=tunes(out_dtype, k, n)))
    elif m:
        launch(_TUNER.pick(key, x_q.device, launch, tune=tunes(out_dtype, k, n)))
    return y.view(*x_q.shape[:-1], n)
