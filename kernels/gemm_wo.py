"""Weight-only GEMMs: a 16-bit activation times an 8-bit or 4-bit weight that is
dequantized in registers, with the SVDQuant low-rank up-projection in the epilogue.

Notation: x [M, K] (bfloat16, float16 or float32); W [N, K] stored as
    int8 / fp8  q [N, K] with a float32 scale per output channel (applied to the tile's
                accumulator in the epilogue: Σ x·q·s = s·Σ x·q);
    int4        two codes per byte [N, Kp/2], float32 scale per row and group of G;
    mxfp4       e2m1 codes [N, Kp/2], e8m0 scale (uint8) per 32;
    nvfp4       e2m1 codes [N, Kp/2], e4m3 scale per 16, float32 per-tensor scale
                (applied in the epilogue);
G the group, Kp = K rounded up to G, R the rank. Each BLOCK_N × BLOCK_K weight tile is
unpacked and multiplied by its group scales in registers, rounded to x's dtype and fed
to the tensor cores with the x tile; only packed bytes cross the memory bus.
y = x · Wᵀ (+ lora_act · lora_upᵀ) (+ bias), lora_act = x · lora_downᵀ from the
activation pass (``quantize_act_4bit`` without a format).

MXFP4 and NVFP4 block values are exact in 16 bits (e2m1 × a power of two, e2m1 × e4m3);
an INT4 code times its float32 scale rounds once to x's dtype (relative 2⁻⁹ in bfloat16),
as every register-dequantizing W4A16 kernel does.

Reference: ``reference.linear_{int8,fp8,int4}_wo`` and ``reference.w4.linear_w4a16``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels.gemm_parts import GROUP_M, dot_precision, finish, grid_2d, tile
from qcompile.kernels.numerics import (
    alloc,
    cast_rne,
    decode_e2m1,
    exp2i,
    mma,
    ptr,
    row_stride,
    rows_view,
    scale_groups,
    sign_extend_int4,
    unpack_nibbles,
)
from qcompile.kernels.quantize_act_4bit import quantize_act_4bit
from qcompile.kernels.tuning import ROWS, Tuner, config, m_bucket, tunes

WEIGHT_FORMAT_ID = {"int8": 0, "fp8": 1, "int4": 2, "mxfp4": 3, "nvfp4": 4}

# 4-bit weights at large M: dequantize the whole weight once per call into a reused
# 16-bit workspace, then one cuBLAS GEMM (`_cublas_linear`), instead of dequantizing
# every weight tile once per M tile in the main loop (issue-bound: ~500 SASS per step).
# A candidate of the tuner like any config (timed against the fused kernel on Hopper);
# untuned, taken from DEQUANTIZE_MIN_M rows: the performance model (benchmarks/
# roofline.py) has the two even near M = 512 at Flux's 3072 → 12288, where the
# dequantization (packed weight read, 16-bit weight written: ~28 µs) costs what the
# fused kernel loses to its issue-bound main loop.
DEQUANTIZE = config(DEQUANTIZE=1, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)
DEQUANTIZE_MIN_M = 1024
_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

_TUNER = Tuner(
    "linear_weight_only",
    # 8 warps: with 4, NVFP4's dequantization spills on sm_90 (Triton 3.9)
    default=config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    hopper=[
        # small M (memory-bound): narrow rows, many column tiles, deep K steps
        config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
        config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4),
        config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
        # large M (compute-bound)
        config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
        config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
        # large M, 4-bit weights: dequantize once, then cuBLAS
        DEQUANTIZE,
    ],
)

# Float32 activations (never tuned): the IEEE float32 dot holds whole K rows per thread,
# so a 64-wide K step spills on sm_90 at every width; 16 keeps it under 140 registers.
_FLOAT32 = config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)


@triton.jit(do_not_specialize=ROWS)
def _weight_only_kernel(
    # pointers
    x_ptr,
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
    K,
    Kp,
    R,
    # strides
    stride_xm,
    stride_wn,
    stride_sn,
    stride_lam,
    stride_lun,
    stride_ym,
    # meta-parameters
    WFMT: tl.constexpr,  # 0 int8, 1 fp8, 2 int4, 3 mxfp4, 4 nvfp4
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    safe_rows = rows % M
    safe_cols = cols % N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(
            x_ptr + safe_rows[:, None] * stride_xm + k[None, :], mask=k[None, :] < K, other=0.0
        )
        if WFMT <= 1:
            w = tl.load(
                w_ptr + safe_cols[:, None] * stride_wn + k[None, :],
                mask=k[None, :] < K,
                other=0.0,
            ).to(tl.float32)
        else:
            w = _weight_tile(w_ptr, w_scale_ptr, safe_cols, k0, Kp, stride_wn, stride_sn,
                             WFMT, G, BLOCK_N, BLOCK_K)  # fmt: skip
        w = cast_rne(w, x_ptr.dtype.element_ty)
        acc = mma(x, tl.trans(w), acc, DOT_PRECISION)
    if WFMT <= 1:
        acc = acc * tl.load(w_scale_ptr + safe_cols)[None, :]
    if WFMT == 4:
        acc = acc * tl.load(w_global_ptr)
    finish(
        acc, rows, cols, bias_ptr, lora_act_ptr, lora_up_ptr, y_ptr, M, N, R,
        stride_lam, stride_lun, stride_ym,
        HAS_BIAS=HAS_BIAS, HAS_LORA=HAS_LORA, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
    )  # fmt: skip


@triton.jit
def _weight_tile(
    w_ptr, w_scale_ptr, cols, k0, Kp, stride_wn, stride_sn,
    WFMT: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A 4-bit weight's [BLOCK_N, BLOCK_K] tile at k0, code × block scale in float32
    (0 past Kp); rows `cols` must be in range."""
    GROUPS: tl.constexpr = BLOCK_K // G if BLOCK_K >= G else 1  # scale groups per tile
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        w_ptr + cols[:, None] * stride_wn + half[None, :], mask=half[None, :] < Kp // 2, other=0
    )
    codes = unpack_nibbles(packed, BLOCK_N, BLOCK_K)
    # One scale per row and group: [BLOCK_N, BLOCK_K / G] (or the tile's single group
    # when BLOCK_K < G), broadcast over the group's G values.
    groups = k0 // G + tl.arange(0, GROUPS)
    scale = tl.load(
        w_scale_ptr + cols[:, None] * stride_sn + groups[None, :],
        mask=groups[None, :] < Kp // G,  # past Kp the codes load as 0
        other=0.0,
    )
    if WFMT == 2:
        values = sign_extend_int4(codes).to(tl.float32)
        scale = scale.to(tl.float32)
    elif WFMT == 3:
        values = decode_e2m1(codes)
        scale = exp2i(scale.to(tl.int32) - 127)
    else:
        values = decode_e2m1(codes)
        scale = scale.to(tl.float32)
    return scale_groups(values, scale, BLOCK_N, BLOCK_K, GROUPS)


@triton.jit
def _dequantize_kernel(
    # pointers
    w_ptr,
    w_scale_ptr,
    w_global_ptr,
    out_ptr,  # [N, ≥ K] in the activation dtype
    # sizes
    N,
    K,
    Kp,
    # strides
    stride_wn,
    stride_sn,
    stride_on,
    # meta-parameters
    WFMT: tl.constexpr,  # 2 int4, 3 mxfp4, 4 nvfp4
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[:, :K] = the 4-bit weight in out's dtype: code × block scale (× NVFP4's
    global scale) in float32, rounded once."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _weight_tile(w_ptr, w_scale_ptr, cols % N, k0, Kp, stride_wn, stride_sn, WFMT, G,
                     BLOCK_N, BLOCK_K)  # fmt: skip
    if WFMT == 4:
        w = w * tl.load(w_global_ptr)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + cols[:, None] * stride_on + k[None, :],
             cast_rne(w, out_ptr.dtype.element_ty),
             mask=(cols[:, None] < N) & (k[None, :] < K))  # fmt: skip


def linear_weight_only(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    fmt: str,
    group_size: int = 0,
    dequantize: bool | None = None,
) -> torch.Tensor:
    """y [..., N] in x.dtype; `fmt` is int8, fp8, int4, mxfp4 or nvfp4 (see module).
    `dequantize` (4-bit, 16-bit x): the dequantize-once path; default: the tuner's pick
    on Hopper, else from DEQUANTIZE_MIN_M rows."""
    if fmt not in WEIGHT_FORMAT_ID:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {list(WEIGHT_FORMAT_ID)}")
    k = x.shape[-1]
    x2 = rows_view(x)
    m, n = x2.shape[0], weight.shape[0]
    four_bit = WEIGHT_FORMAT_ID[fmt] >= 2
    if dequantize and not (four_bit and x.dtype is not torch.float32):
        raise ValueError(
            f"linear_weight_only(dequantize=True) is for 4-bit weights and 16-bit "
            f"activations, got {fmt} with {x.dtype}; pass dequantize=None"
        )
    g = group_size if four_bit else 1
    kp = triton.cdiv(k, g) * g
    w = weight.contiguous()
    scale = weight_scale.reshape(n, -1).contiguous() if four_bit else weight_scale.reshape(-1)
    lora_act = None
    if lora_down is not None:
        lora_act = quantize_act_4bit(x2, None, lora_down, None, g).lora_act
        lora_up = lora_up.contiguous()
    rank = 0 if lora_down is None else lora_down.shape[0]
    y = alloc((m, n), x.dtype, x.device)

    def launch(c):
        if c.meta.get("DEQUANTIZE"):
            return _dequantize_then_gemm(x2, w, scale, weight_global_scale, bias, lora_act,
                                         lora_up, fmt, g, k, kp, y, c)  # fmt: skip
        _weight_only_kernel[grid_2d(m, n, c)](
            x2, w, scale, ptr(weight_global_scale, x2), ptr(bias, x2), ptr(lora_act, x2),
            ptr(lora_up, x2), y,
            m, n, k, kp, rank,
            x2.stride(0), w.stride(0), scale.stride(0), row_stride(lora_act),
            row_stride(lora_up), y.stride(0),
            WFMT=WEIGHT_FORMAT_ID[fmt], G=g, HAS_BIAS=bias is not None,
            HAS_LORA=lora_act is not None, DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_M=GROUP_M, **c.kwargs(),
        )  # fmt: skip

    dequantizable = four_bit and x.dtype is not torch.float32
    if m and dequantize:
        launch(DEQUANTIZE)
    elif m and x.dtype is torch.float32:
        launch(_FLOAT32)
    elif m:
        key = (m_bucket(m), n, k, fmt, g, rank, x.dtype)
        tuned = bool(_TUNER.candidates(x.device)) and tunes(x.dtype, k, n)
        chosen = _TUNER.pick(key, x.device, launch,
                             lambda c: dequantizable or not c.meta.get("DEQUANTIZE"),
                             tune=tunes(x.dtype, k, n))  # fmt: skip
        if dequantize is None and not tuned and dequantizable and m >= DEQUANTIZE_MIN_M:
            chosen = DEQUANTIZE
        launch(chosen)
    return y.view(*x.shape[:-1], n)


def _dequantize_then_gemm(x2, w, scale, global_scale, bias, lora_act, lora_up, fmt, g, k, kp,
                          y, c):  # fmt: skip
    """y = [x | lora_act] · [W | lora_up]ᵀ + bias: the weight dequantized once into the
    workspace (the branch's columns beside it), one cuBLAS GEMM."""
    n, rank = w.shape[0], 0 if lora_act is None else lora_act.shape[1]
    weight16 = _workspace(n * (k + rank), x2.dtype, x2.device).view(n, k + rank)
    grid = (triton.cdiv(n, c.meta["BLOCK_N"]), triton.cdiv(k, c.meta["BLOCK_K"]))
    _dequantize_kernel[grid](
        w, scale, ptr(global_scale, w), weight16, n, k, kp, w.stride(0), scale.stride(0),
        weight16.stride(0), WFMT=WEIGHT_FORMAT_ID[fmt], G=g, BLOCK_N=c.meta["BLOCK_N"],
        BLOCK_K=c.meta["BLOCK_K"], num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    x_all = x2
    if rank:
        weight16[:, k:] = lora_up
        x_all = torch.cat([x2, lora_act.to(x2.dtype)], dim=1)
    _cublas_linear(x_all, weight16, bias, y)


def _cublas_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor) -> None:  # fmt: skip
    """out = x · weightᵀ + bias by cuBLAS (the AOT gate stands it in: it times nothing
    and compiles no Triton)."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 16-bit buffer of at least `numel` elements, shared by every linear on `device`
    (one stream: each call has used it before the next writes it). Grown to the largest
    weight met; inside CUDA-graph capture a fresh one from the graph's pool, so a
    captured graph never holds a buffer that a later growth frees."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=dtype, device=device)
    held = _WORKSPACE.get((device, dtype))
    if held is None or held.numel() < numel:
        held = _WORKSPACE[device, dtype] = torch.empty(numel, dtype=dtype, device=device)
    return held[:numel]
