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
