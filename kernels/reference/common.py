"""Helpers shared by the format references."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def absmax_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric scale amax / qmax in float32; an all-zero row gets scale 1 (not 0 or inf)."""
    amax = amax.to(torch.float32)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def linear_dequantized(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x·Wᵀ + b with a float32 dequantized W, accumulated in float32, cast to x.dtype."""
    out = F.linear(x.to(torch.float32), weight, None if bias is None else bias.float())
    return out.to(x.dtype)
