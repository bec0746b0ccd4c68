"""INT8 symmetric per-output-channel weights: W ≈ q · s[n], q ∈ [-127, 127]."""

from __future__ import annotations

import torch

from qcompile.kernels.reference.common import absmax_scale, linear_dequantized

INT8_MAX = 127


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (q int8 [N, K], scale float32 [N])."""
    w = weight.detach().to(torch.float32)
    scale = absmax_scale(w.abs().amax(dim=1), INT8_MAX)
    q = torch.round(w / scale.reshape(-1, 1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (q int8 [N, K], scale float32 [])."""
    w = weight.detach().to(torch.float32)
    scale = absmax_scale(w.abs().amax(), INT8_MAX)
    return torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.reshape(-1, 1)


def linear_int8_wo(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return linear_dequantized(x, dequantize_int8_per_channel(weight, weight_scale), bias)
