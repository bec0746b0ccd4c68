"""Activation statistics and the observers that turn them into clipping ranges.

`ActivationStats` gathers, in one pass over the calibration set: the exact per-channel
max |x| (channels = last dim), a histogram of |x| over [0, R] whose range doubles as
larger values arrive (bins merge exactly), a reservoir of sampled values and one of
sampled rows. Observers pick a per-tensor clipping value T (`observe_range`; the static
scale is T / qmax) or per-channel values (`channel_ranges`, from the sampled rows):

    min_max     T = max |x|
    percentile  T = the p-th percentile of |x| (histogram; per channel: reservoir)
    histogram   T minimising the quantization error of the histogram's mass
    mse         T = r · max|x|, r searched on the sampled values, minimising their error
"""

from __future__ import annotations

import math

import torch

from qcompile.kernels.reference.act import fake_quantize, qmax
from qcompile.recipes import Observer

BINS = 2048
RESERVOIR = 1 << 18
PER_BATCH_SAMPLE = 1 << 14
ROW_RESERVOIR = 512  # sampled rows [R, K], for per-channel ranges
ROWS_PER_BATCH = 64
MSE_RATIOS = torch.linspace(0.2, 1.0, 81)


class ActivationStats:
    """Running statistics of one tensor. The value reservoir (the MSE observer's) and
    the row reservoir (smoothing's alpha search) are kept only when asked for: at a
    large model's widths they are megabytes per observed tensor."""

    def __init__(self, values: bool = True, rows: bool = True) -> None:
        self.keep_values, self.keep_rows = values, rows
        self.channel_absmax: torch.Tensor | None = None
        self.hist = torch.zeros(BINS, dtype=torch.float64)
        self.range = 0.0  # histogram covers [0, range]
        self.reservoir = torch.empty(0)
        self._values = 0  # values the reservoir holds, or would hold if kept
        self.rows = torch.empty(0)
        self.batches = 0
        self._gen = torch.Generator().manual_seed(0)

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().to(torch.float32).abs()
        rows = a.reshape(-1, a.shape[-1]) if a.dim() else a.reshape(1, 1)
        cmax = rows.amax(dim=0)
        self.channel_absmax = (
            cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        )
        top = float(cmax.max())
        if top > self.range:
            self._grow(top)
        if self.range > 0:
            idx = (a.reshape(-1) / self.range * BINS).long().clamp_(max=BINS - 1)
            self.hist += torch.bincount(idx, minlength=BINS).to(torch.float64)
        flat = a.reshape(-1)
        take = torch.randint(
            flat.numel(), (min(flat.numel(), PER_BATCH_SAMPLE),), generator=self._gen
        )
        # Every draw happens whether or not the values are kept (their count stands in
        # for the reservoir), so the rows sampled below are the same either way.
        self._values += take.numel()
        if self.keep_values:
            self.reservoir = torch.cat([self.reservoir, flat[take]])
        if self._values > 2 * RESERVOIR:  # amortized: one downsample per doubling
            keep = torch.randperm(self._values, generator=self._gen)[:RESERVOIR]
            self._values = RESERVOIR
            if self.keep_values:
                self.reservoir = self.reservoir[keep]
        pick = torch.randint(
            rows.shape[0], (min(rows.shape[0], ROWS_PER_BATCH),), generator=self._gen
        )
        if self.keep_rows:
            self.rows = rows[pick] if not self.rows.numel() else torch.cat([self.rows, rows[pick]])
        if self.rows.shape[0] > 2 * ROW_RESERVOIR:
            keep = torch.randperm(self.rows.shape[0], generator=self._gen)[:ROW_RESERVOIR]
            self.rows = self.rows[keep]
        self.batches += 1

    def _grow(self, top: float) -> None:
        new_range = 2.0 ** math.ceil(math.log2(top)) if top > 0 else 0.0
        if self.range > 0:
            factor = int(new_range / self.range)
            merged = self.hist.view(-1, min(factor, BINS)).sum(dim=1) if factor > 1 else self.hist
            self.hist = torch.zeros(BINS, dtype=torch.float64)
            self.hist[: merged.numel()] = merged
        self.range = new_range

    @property
    def absmax(self) -> float:
        return 0.0 if self.channel_absmax is None else float(self.channel_absmax.max())


def _qdq_error(values: torch.Tensor, clip: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean squared error of symmetric quantization with clip value(s) `clip` [C, 1]."""
    scale = (clip / qmax(dtype)).clamp_min(1e-30)
    return (values[None, :] - fake_quantize(values[None, :], scale, dtype)).pow(2).mean(dim=1)


def observe_range(
    stats: ActivationStats, observer: Observer, dtype: torch.dtype, percentile: float | None
) -> float:
    """The per-tensor clipping value T for `observer` (0 for all-zero activations)."""
    top = stats.absmax
    if top == 0 or observer is Observer.MIN_MAX:
        return top
    if observer is Observer.PERCENTILE:
        cdf = torch.cumsum(stats.hist, 0) / stats.hist.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(percentile / 100, dtype=torch.float64)))
        return min(top, stats.range * (index + 1) / BINS)
    if observer is Observer.HISTOGRAM:
        width = stats.range / BINS
        points = (torch.arange(BINS)[:, None] + (torch.arange(4) + 0.5)[None, :] / 4) * width
        weights = (stats.hist[:, None] / 4).expand(-1, 4).reshape(-1).to(torch.float32)
        values = points.reshape(-1).to(torch.float32)
        live = weights > 0
        values, weights = values[live], weights[live]
        candidates = torch.linspace(top / 16, top, 241)[:, None]
        restored = fake_quantize(values[None, :], candidates / qmax(dtype), dtype)
        error = ((values[None, :] - restored).pow(2) * weights[None, :]).sum(dim=1)
        return float(candidates[int(error.argmin()), 0])
    if observer is Observer.MSE:
        candidates = (MSE_RATIOS * top)[:, None]
        error = _qdq_error(stats.reservoir, candidates, dtype)
        return float(candidates[int(error.argmin()), 0])
    raise ValueError(f"unknown observer {observer}")


def channel_ranges(
    stats: ActivationStats, observer: Observer, dtype: torch.dtype, percentile: float | None
) -> torch.Tensor:
    """Per-channel clipping values [K]: exact for min_max, from sampled rows otherwise.

    percentile: the per-channel percentile of |x| over the sampled rows; histogram and
    mse: per channel, the candidate clip (a finer grid for histogram, the ratio grid for
    mse) minimising the rows' quantization error.
    """
    top = stats.channel_absmax
    if observer is Observer.MIN_MAX or stats.rows.numel() == 0:
        return top.clone()
    rows = stats.rows  # [R, K], |x|
    if observer is Observer.PERCENTILE:
        return torch.minimum(torch.quantile(rows, percentile / 100, dim=0), top)
    grid = torch.linspace(1 / 16, 1, 241) if observer is Observer.HISTOGRAM else MSE_RATIOS
    best_error = torch.full_like(top, float("inf"))
    best = top.clone()
    for ratio in grid:
        clip = (top * ratio).clamp_min(1e-30)
        error = (rows - fake_quantize(rows, clip / qmax(dtype), dtype)).pow(2).mean(dim=0)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, clip, best)
    return torch.where(top > 0, best, torch.zeros_like(top))
