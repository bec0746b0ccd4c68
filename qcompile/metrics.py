"""Numerics and size measures used by tests, benchmarks and the demo."""

from __future__ import annotations

import math

import torch
from torch import nn


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σref² / Σ(ref − actual)²)."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - actual.detach().to(torch.float64)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def psnr(reference: torch.Tensor, actual: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, peak]."""
    mse = (reference.double() - actual.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(reference: torch.Tensor, actual: torch.Tensor, peak: float = 1.0) -> float:
    """Mean structural similarity of [C, H, W] (or [N, C, H, W]) images in [0, peak]:
    Wang et al. 2004, an 11×11 Gaussian window with σ = 1.5 per channel, K1 = 0.01,
    K2 = 0.03, over the positions where the window fits (smaller images use a window
    as large as they allow)."""
    x = reference.double().reshape(-1, 1, *reference.shape[-2:])
    y = actual.double().reshape(-1, 1, *actual.shape[-2:])
    size = min(11, *x.shape[-2:])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return index.mean().item()
