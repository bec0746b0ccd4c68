"""Observers on synthetic data with outliers: each differs measurably from min_max."""

from __future__ import annotations

import pytest
import torch

from qcompile.passes.observers import (
    BINS,
    RESERVOIR,
    ActivationStats,
    channel_ranges,
    observe_range,
)
from qcompile.recipes import Observer


def _outlier_stats(batches=4, **keep):
    gen = torch.Generator().manual_seed(0)
    stats = ActivationStats(**keep)
    for _ in range(batches):
        x = torch.randn(8, 64, 96, generator=gen)
        x[..., 7] *= 50  # one outlier channel in 96, as diffusion activations have
        stats.update(x)
    return stats


@pytest.mark.parametrize("observer", [Observer.PERCENTILE, Observer.HISTOGRAM, Observer.MSE])
def test_observers_clip_below_min_max_on_outliers(observer):
    stats = _outlier_stats()
    top = observe_range(stats, Observer.MIN_MAX, torch.int8, None)
    clip = observe_range(stats, observer, torch.int8, 99.9)
    assert top == pytest.approx(stats.channel_absmax.max().item())
    # "Measurably different": with INT8's uniform steps, the searched ranges clip at
    # least 10 % off max |x|.
    assert clip < 0.9 * top, (observer, clip, top)


@pytest.mark.parametrize("observer", list(Observer))
def test_fp8_ranges_never_exceed_min_max(observer):
    # e4m3's error is relative, so clipping buys little: the histogram search lands
    # near max |x| (measured 177.0 of 179.1 here); no observer may go above it.
    stats = _outlier_stats()
    top = observe_range(stats, Observer.MIN_MAX, torch.float8_e4m3fn, None)
    assert 0 < observe_range(stats, observer, torch.float8_e4m3fn, 99.9) <= top


def test_per_channel_min_max_is_exact():
    stats = _outlier_stats()
    ranges = channel_ranges(stats, Observer.MIN_MAX, torch.int8, None)
    assert ranges.shape == (96,) and ranges.argmax() == 7
    assert torch.equal(ranges, stats.channel_absmax)


@pytest.mark.parametrize("observer", [Observer.PERCENTILE, Observer.HISTOGRAM, Observer.MSE])
def test_per_channel_observers_clip_inside_each_channel(observer):
    stats = _outlier_stats()
    top = stats.channel_absmax
    ranges = channel_ranges(stats, observer, torch.int8, 99.0)
    assert ranges.shape == (96,) and torch.all(ranges <= top)
    # Per channel the Gaussian tails get clipped too: measurably below max |x|.
    assert (ranges / top).median() < 0.9
    assert ranges.argmax() == 7  # the outlier channel keeps the widest range


def test_histogram_growth_keeps_every_count():
    stats = ActivationStats()
    stats.update(torch.full((10, 4), 0.5))
    stats.update(torch.full((10, 4), 100.0))  # range grows 0.5 → 128: bins merge by 256
    assert stats.hist.sum() == 80 and stats.range == 128.0
    assert stats.hist[(BINS - 1) // 256] == 40  # 0.5 sat in the last bin of [0, 0.5]
    assert stats.hist[int(100 / 128 * BINS)] == 40


def test_all_zero_activations_observe_zero():
    stats = ActivationStats()
    stats.update(torch.zeros(4, 8))
    for observer in Observer:
        assert observe_range(stats, observer, torch.int8, 99.0) == 0.0


def test_reservoirs_are_kept_only_when_asked_and_change_nothing_else():
    full, lean = _outlier_stats(), _outlier_stats(values=False, rows=False)
    assert full.reservoir.numel() and full.rows.numel()
    assert lean.reservoir.numel() == 0 and lean.rows.numel() == 0
    assert torch.equal(lean.hist, full.hist)
    assert torch.equal(lean.channel_absmax, full.channel_absmax)
    rows_only = _outlier_stats(values=False)  # the same rows are sampled either way
    assert torch.equal(rows_only.rows, full.rows)
    # also once the value reservoir has been downsampled (past 32 batches of these)
    many = {keep: _outlier_stats(40, values=keep) for keep in (True, False)}
    assert many[True].reservoir.numel() <= 2 * RESERVOIR
    assert torch.equal(many[False].rows, many[True].rows)
    for observer in (Observer.MIN_MAX, Observer.PERCENTILE, Observer.HISTOGRAM):
        want = observe_range(full, observer, torch.int8, 99.9)
        assert observe_range(lean, observer, torch.int8, 99.9) == want
