"""FP8 e4m3 per-output-channel weights: W ≈ f · s[n], f ∈ float8_e4m3fn (|f| ≤ 448)."""

from __future__ import annotations

import torch

from qcompile.kernels.reference.common import absmax_scale, linear_dequantized

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (f float8_e4m3fn [N, K], scale float32 [N])."""
    w = weight.detach().to(torch.float32)
    scale = absmax_scale(w.abs().amax(dim=1), FP8_E4M3_MAX)
    f = (w / scale.reshape(-1, 1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return f, scale


def quantize_fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (f float8_e4m3fn [N, K], scale float32 [])."""
    w = weight.detach().to(torch.float32)
    scale = absmax_scale(w.abs().amax(), FP8_E4M3_MAX)
    return (w / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8_per_channel(f: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return f.to(torch.float32) * scale.reshape(-1, 1)


def linear_fp8_wo(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return linear_dequantized(x, dequantize_fp8_per_channel(weight, weight_scale), bias)
