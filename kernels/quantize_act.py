"""8-bit activation quantization (INT8 / FP8, static per-tensor or dynamic per-row) and
the SVDQuant smoothing division, as Triton kernels.

Notation: x [..., K] is viewed as [M, K] (M = all leading dims). Static: one float32
scale. Dynamic: scale[m] = max|x[m]| / qmax (1 for an all-zero row), float32 [M, 1].
q = x / scale rounded to nearest-even (INT8, clamped to ±127) or to e4m3 (FP8, ±448).

References: ``reference.act.quantize_act_static`` / ``quantize_act_dynamic`` and
``ops.smooth``; the kernels match them bit for bit (see ``numerics.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.numerics import alloc, cast_rne, rne, round_e4m3, rows_view
from qcompile.kernels.reference.act import qmax
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

# One program per BLOCK_M rows; K in chunks of BLOCK_K (two passes for dynamic scales:
# the row's amax, then the codes; the second pass reads x from L2).
_TUNER = Tuner(
    "quantize_act",
    default=config(BLOCK_M=4, BLOCK_K=512, num_warps=4, num_stages=1),
    hopper=[
        config(BLOCK_M=1, BLOCK_K=1024, num_warps=4, num_stages=1),
        config(BLOCK_M=4, BLOCK_K=1024, num_warps=8, num_stages=1),
        config(BLOCK_M=8, BLOCK_K=512, num_warps=8, num_stages=1),
    ],
)


@triton.jit(do_not_specialize=ROWS)
def _quantize_rows_kernel(
    # pointers
    x_ptr,
    q_ptr,
    scale_ptr,  # static: the input scalar; dynamic: the output [M]
    # sizes
    M,
    K,
    # strides
    stride_xm,
    stride_qm,
    # meta-parameters
    DYNAMIC: tl.constexpr,
    IS_FP8: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    if DYNAMIC:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + cols[None, :], mask=mask)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(scale_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k0 + cols[None, :], mask=mask)
        v = tl.math.div_rn(x.to(tl.float32), scale[:, None])
        if IS_FP8:
            q = round_e4m3(v).to(tl.float8e4nv)
        else:
            q = tl.minimum(tl.maximum(rne(v), -QMAX), QMAX).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * stride_qm + k0 + cols[None, :], q, mask=mask)


def _quantize(
    x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"activations quantize to int8 or float8_e4m3fn, not {dtype}")
    k = x.shape[-1]
    x2 = rows_view(x)
    m = x2.shape[0]
    q = alloc((m, k), dtype, x.device)
    dynamic = scale is None
    if dynamic:
        scale = alloc((m, 1), torch.float32, x.device)

    def launch(c):
        grid = (triton.cdiv(m, c.meta["BLOCK_M"]),)
        _quantize_rows_kernel[grid](
            x2, q, scale, m, k, x2.stride(0), q.stride(0),
            DYNAMIC=dynamic, IS_FP8=dtype is torch.float8_e4m3fn, QMAX=qmax(dtype),
            **c.kwargs(),
        )  # fmt: skip

    if m:
        tune = tunes(x.dtype, k)
        launch(_TUNER.pick((m_bucket(m), k, dynamic), x.device, launch, tune=tune))
    return q.view(*x.shape[:-1], k), scale.view(*x.shape[:-1], 1) if dynamic else scale


def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale rounded to `dtype`; scale is a float32 scalar tensor on x's device."""
    return _quantize(x, scale.reshape(()).to(torch.float32), dtype)[0]


def quantize_act_dynamic(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, per-row float32 scale [..., 1])."""
    return _quantize(x, None, dtype)


# ---------------------------------------------------------------- smoothing


@triton.jit(do_not_specialize=ROWS)
def _smooth_kernel(
    x_ptr,
    factors_ptr,
    y_ptr,
    M,
    K,
    stride_xm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask)
    s = tl.load(factors_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
    y = tl.math.div_rn(x.to(tl.float32), s[None, :])
    y = cast_rne(y, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=mask)


def smooth(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """x / factors per input channel (float32 math) in x.dtype."""
    k = x.shape[-1]
    x2 = rows_view(x)
    y = alloc(x2.shape, x2.dtype, x2.device)
    block_m, block_k = 16, 256
    grid = (triton.cdiv(x2.shape[0], block_m), triton.cdiv(k, block_k))
    if x2.shape[0]:
        _smooth_kernel[grid](
            x2, factors.contiguous(), y, x2.shape[0], k, x2.stride(0), y.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k,
        )  # fmt: skip
    return y.view(x.shape)
