"""Small helpers the kernel tests share."""

from __future__ import annotations

import torch


def on(device: str, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors moved to `device` (None stays None: an absent optional operand)."""
    return [None if t is None else t.to(device) for t in tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor to compare bitwise: 1-byte dtypes (int8, uint8, e4m3) as uint8."""
    return t.cpu().view(torch.uint8) if t.element_size() == 1 else t.cpu()
