"""PSNR and SSIM, the image measures `qcompile eval` reports."""

from __future__ import annotations

import math

import pytest
import torch

from qcompile.metrics import psnr, ssim


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(seed))


def test_psnr_of_a_known_error():
    a = _image()
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.01) == pytest.approx(40.0, abs=1e-3)  # MSE 1e-4, peak 1
    assert psnr(a * 255, a * 255 + 2.55, peak=255) == pytest.approx(40.0, abs=1e-3)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    a = _image()
    assert ssim(a, a) == pytest.approx(1.0)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    scores = [ssim(a, (a + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1
    assert ssim(a, _image(2)) < 0.1  # unrelated images
    assert ssim(a, a.flip(-1)) == pytest.approx(ssim(a.flip(-1), a))  # symmetric


def test_ssim_ignores_a_constant_shift_less_than_psnr_does():
    # structure and contrast are unchanged by a small brightness shift
    a = _image() * 0.8
    assert ssim(a, a + 0.05) > 0.95 and psnr(a, a + 0.05) < 27


def test_ssim_handles_images_smaller_than_its_window():
    a = _image()[:, :6, :5]
    assert ssim(a, a) == pytest.approx(1.0)
