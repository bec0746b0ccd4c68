"""Pieces every qcompile GEMM kernel shares (``@triton.jit`` helpers).

Notation: y [M, N] = x [M, K] · Wᵀ; the kernels tile y in BLOCK_M × BLOCK_N and walk K;
R is the rank of the SVDQuant low-rank branch.

- `tile` / `tile_of`: a program's (or a persistent program's t-th) output tile, in
  GROUP_M-row super-groups so consecutive tiles reuse the same weight columns from L2
  (Triton tutorial 03's ordering).
- `finish`: the one epilogue: + lora_act · lora_upᵀ (the branch's up-projection, on
  tensor cores), + bias, then a single rounded write of y.
"""

import torch
import triton
import triton.language as tl

from qcompile.kernels.numerics import cast_rne, mma
from qcompile.kernels.tuning import Config

GROUP_M = 8


@triton.jit
def tile_of(t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of output tile number `t` in the super-grouped order."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % group_rows, (t % per_group) // group_rows


@triton.jit
def tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows [BLOCK_M], cols [BLOCK_N]) of this program's output tile."""
    pid_m, pid_n = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def finish(
    acc,
    rows,
    cols,
    # pointers
    bias_ptr,
    lora_act_ptr,  # float32 [M, R]
    lora_up_ptr,  # [N, R]
    y_ptr,
    # sizes
    M,
    N,
    R,
    # strides
    stride_lam,
    stride_lun,
    stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = acc + lora_act · lora_upᵀ + bias, rounded once to y's dtype and stored."""
    row_ok = rows < M
    col_ok = cols < N
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        lora_act = tl.load(
            lora_act_ptr + rows[:, None] * stride_lam + ranks[None, :],
            mask=row_ok[:, None] & (ranks[None, :] < R),
            other=0.0,
        )
        up = tl.load(
            lora_up_ptr + cols[None, :] * stride_lun + ranks[:, None],
            mask=(ranks[:, None] < R) & col_ok[None, :],
            other=0.0,
        )
        acc = mma(cast_rne(lora_act, up.dtype), up, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = cast_rne(acc, y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=row_ok[:, None] & col_ok[None, :]
    )


def grid_2d(m: int, n: int, c: Config) -> tuple[int]:
    """The launch grid for `tile`: one program per output tile."""
    return (triton.cdiv(m, c.meta["BLOCK_M"]) * triton.cdiv(n, c.meta["BLOCK_N"]),)


# A row pass (activation quantization) fills the GPU with row blocks where M allows;
# below that it splits K as well, up to this many programs per SM, so an SM has a
# second program's loads in flight while one waits.
ACT_PROGRAMS_PER_SM = 2


def act_splits(m: int, k: int, c: Config, sms: int) -> tuple[int, int]:
    """(K ranges, K per range) of a row pass over M × K with config `c` on `sms` SMs:
    ⌊ACT_PROGRAMS_PER_SM · sms / row blocks⌋ ranges (one when there are more row blocks
    than SMs; at most one per BLOCK_K step), each a whole number of BLOCK_K steps."""
    steps = triton.cdiv(k, c.meta["BLOCK_K"])
    blocks = triton.cdiv(m, c.meta["BLOCK_M"])
    wanted = max(1, min(steps, ACT_PROGRAMS_PER_SM * sms // blocks))
    per_range = triton.cdiv(steps, wanted)
    return triton.cdiv(steps, per_range), per_range * c.meta["BLOCK_K"]


def sum_ranges(partials: torch.Tensor) -> torch.Tensor:
    """A split row pass's lora_act: its float32 [ranges, M, R] partials summed in range
    order (one range: the partial itself, no extra launch)."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands multiply exactly ("ieee"); 16-bit ones ignore the setting."""
    return "ieee" if dtype is torch.float32 else "tf32"
