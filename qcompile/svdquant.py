"""SVDQuant's per-layer math: smoothing factors, the low-rank split, the alpha search.

Notation: W [N, K] a linear's weight, x [M, K] its input, s [K] smoothing factors,
R the rank. Smoothing rewrites x·Wᵀ = (x / s)·(W·diag(s))ᵀ so that the activation's
outlier channels shrink and the weight absorbs them; the smoothed weight is then split
W·diag(s) = up·down + residual by SVD, the residual is quantized to 4 bits and the
branch (down [R, K], up [N, R]) stays 16-bit. The passes `smooth` and `fold_lowrank`
apply this to a program; quantize-on-load applies `lowrank_split` to one weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qcompile.metrics import sqnr
from qcompile.recipes import LayerScheme, SmoothSpec
from qcompile.schemes import (
    INPUT_SCALE,
    LORA_DOWN,
    LORA_UP,
    SMOOTH,
    QuantizedWeight,
    linear,
    pack_weight,
    tensor_names,
    weight_impl,
)

# Channels whose calibration max is below this never saw signal: s = 1 leaves them be.
_MIN_RANGE = 1e-6
# s is clamped to [1/_S_LIMIT, _S_LIMIT] so no channel over- or underflows 16-bit x / s.
_S_LIMIT = 1e4
# Above this many elements in min(N, K), a randomized SVD finds the top R directions
# (`torch.svd_lowrank`, seeded, so quantizing twice gives the same bits).
_EXACT_SVD_MAX = 1024
_LOWRANK_OVERSAMPLE = 16
_LOWRANK_ITERS = 4


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s[k] = max|x[:, k]|^alpha / max|W[:, k]|^(1 - alpha), float32 [K]."""
    a = act_absmax.to(torch.float32)
    w = weight.detach().abs().amax(dim=0).to(torch.float32)
    live = (a > _MIN_RANGE) & (w > _MIN_RANGE)
    s = a.clamp_min(_MIN_RANGE) ** alpha / w.clamp_min(_MIN_RANGE) ** (1.0 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(1.0 / _S_LIMIT, _S_LIMIT)


def lowrank_split(
    weight: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] → (down [R, K], up [N, R], residual W − up·down [N, K]), all in `dtype`.

    The residual is taken (in float32) against the branch as stored (rounded to
    `dtype`), so the branch's own rounding is quantized with the residual, not lost.
    """
    w = weight.detach().to(torch.float32)
    if min(w.shape) <= _EXACT_SVD_MAX:
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(0)
            u, sigma, v = torch.svd_lowrank(
                w, q=min(rank + _LOWRANK_OVERSAMPLE, min(w.shape)), niter=_LOWRANK_ITERS
            )
        vh = v.T
    root = sigma[:rank].sqrt()
    # Contiguous, as they will be after a checkpoint round trip: CPU BLAS sums a
    # transposed operand in another order, so strides would change the output bits.
    up = (u[:, :rank] * root).to(dtype).contiguous()
    down = (root[:, None] * vh[:rank]).to(dtype).contiguous()
    residual = w - up.to(torch.float32) @ down.to(torch.float32)
    return down, up, residual.to(dtype)


def smooth_weight(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """W·diag(s) in W's dtype (float32 math)."""
    return (weight.detach().to(torch.float32) * factors).to(weight.dtype)


@dataclass
class LayerParts:
    """One layer after smoothing and the split, before packing (mirrors the passes)."""

    smooth: torch.Tensor | None  # float32 [K]
    down: torch.Tensor | None  # [R, K] in the weight's dtype
    up: torch.Tensor | None  # [N, R] in the weight's dtype
    residual: torch.Tensor  # [N, K] in the weight's dtype: what gets quantized


def split_layer(
    weight: torch.Tensor, scheme: LayerScheme, smooth: torch.Tensor | None = None
) -> LayerParts:
    """What `smooth` then `fold_lowrank` make of one weight, as tensors."""
    w = weight.detach() if smooth is None else smooth_weight(weight, smooth)
    if not scheme.rank:
        return LayerParts(smooth, None, None, w)
    return LayerParts(smooth, *lowrank_split(w, scheme.rank, weight.dtype))


def empty_layer(
    scheme: LayerScheme, out_features: int, in_features: int, dtype: torch.dtype
) -> QuantizedWeight:
    """Meta tensors with the shapes and dtypes a layer of `scheme` owns (for loading)."""
    meta = torch.empty(out_features, in_features, device="meta")
    tensors = weight_impl(scheme).quantize(meta, scheme.weight)
    if INPUT_SCALE in tensor_names(scheme):
        tensors[INPUT_SCALE] = torch.empty((), device="meta")
    if scheme.smooth:
        tensors[SMOOTH] = torch.empty(in_features, device="meta")
    if scheme.rank:
        tensors[LORA_DOWN] = torch.empty(scheme.rank, in_features, device="meta", dtype=dtype)
        tensors[LORA_UP] = torch.empty(out_features, scheme.rank, device="meta", dtype=dtype)
    return tensors


def quantize_layer(parts: LayerParts, scheme: LayerScheme) -> QuantizedWeight:
    """Pack a split layer: {buffer name: tensor} as `QuantizedLinear` owns them."""
    tensors = pack_weight(parts.residual, scheme.weight, weight_impl(scheme))
    if parts.smooth is not None:
        tensors[SMOOTH] = parts.smooth
    if parts.down is not None:
        tensors[LORA_DOWN], tensors[LORA_UP] = parts.down, parts.up
    return tensors


@dataclass
class AlphaSearch:
    """What `search_alpha` tried: alpha → output SQNR in dB on the cached rows."""

    alpha: float
    sqnr_db: dict[float, float]
    rows: int
    seconds: float


def search_alpha(
    weight: torch.Tensor,
    act_absmax: torch.Tensor,
    rows: torch.Tensor,
    scheme: LayerScheme,
    spec: SmoothSpec,
) -> AlphaSearch:
    """Pick the alpha of `spec.search` with the best output SQNR on ≤ search_rows rows.

    Cost per layer: len(search) × (one SVD of W + one 4-bit pack of W + one quantized
    linear on the rows); memory: the rows (≤ search_rows × K floats) and two float32
    copies of W.
    """
    start = time.perf_counter()
    rows = rows[: spec.search_rows].to(torch.float32)
    reference = rows @ weight.detach().to(torch.float32).T
    scores: dict[float, float] = {}
    for alpha in spec.search:
        s = smooth_factors(act_absmax, weight, alpha)
        parts = split_layer(weight, scheme, s)
        out = linear(rows, quantize_layer(parts, scheme), None, scheme)
        scores[alpha] = float(sqnr(reference, out))
    best = max(scores, key=scores.__getitem__) if scores else spec.alpha
    return AlphaSearch(best, scores, rows.shape[0], time.perf_counter() - start)


__all__ = [
    "AlphaSearch",
    "LayerParts",
    "empty_layer",
    "lowrank_split",
    "quantize_layer",
    "search_alpha",
    "smooth_factors",
    "smooth_weight",
    "split_layer",
]
