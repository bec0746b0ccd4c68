"""W8A8 GEMM: INT8 × INT8 (exact int32 accumulation) or FP8 e4m3 × e4m3 (float32), with
per-tensor or per-row activation scales, per-tensor or per-channel weight scales, bias
and a 16-bit (or float32) output, as one Triton kernel.

Notation: x_q [M, K] (int8 / float8_e4m3fn), x_scale float32 [] or [M, 1]; weight
[N, K] (same dtype, K contiguous: the "TN" layout Hopper's 8-bit MMA wants for both
operands), weight_scale float32 [] or [N]; y [M, N] = (x_q · weightᵀ) · x_scale ·
weight_scale + bias.

Reference: ``reference.act.linear_w8a8``. INT8 sums are exact on both sides, so the
outputs agree to the rounding of the scale products; FP8 to float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.gemm_parts import GROUP_M, finish, grid_2d, tile
from qcompile.kernels.numerics import alloc, ptr, rows_view
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
) -> torch.Tensor:
    """y [..., N] in `out_dtype`; see the module docstring for the operands."""
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

    def launch(c):
        _w8a8_kernel[grid_2d(m, n, c)](
            a, a_scale, w, w_scale, ptr(bias, a), y,
            m, n, k, a.stride(0), w.stride(0), y.stride(0),
            ROW_SCALE=a_scale.numel() > 1, CHANNEL_SCALE=w_scale.numel() > 1,
            IS_INT8=a.dtype is torch.int8, HAS_BIAS=bias is not None, GROUP_M=GROUP_M,
            **c.kwargs(),
        )  # fmt: skip

    if m:
        key = (m_bucket(m), n, k, a.dtype, a_scale.numel() > 1, w_scale.numel() > 1)
        launch(_TUNER.pick(key, x_q.device, launch, tune=tunes(out_dtype, k, n)))
    return y.view(*x_q.shape[:-1], n)
