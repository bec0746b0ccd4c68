"""INT4 symmetric per-group weights, two values per byte.

W[n, k] ≈ q[n, k] · s[n, k // G] with q ∈ [-8, 7] and s = max|W[n, group]| / 7.
K is zero-padded to Kp (a multiple of G). Packing is along K, low nibble first:
byte[n, j] = (q[n, 2j] & 0xF) | (q[n, 2j + 1] & 0xF) << 4, stored as uint8 [N, Kp / 2];
scales are float32 [N, Kp / G].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.kernels.reference.common import absmax_scale, linear_dequantized

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., 2J] with values in [-8, 7] → uint8 [..., J], low nibble = even index."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., J] → int8 [..., 2J] in [-8, 7]; inverse of `pack_int4`."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(q >= 8, q - 16, q)


def quantize_int4_per_group(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (packed uint8 [N, Kp / 2], scale float32 [N, Kp / G])."""
    n, k = weight.shape
    kp = -(-k // group_size) * group_size
    w = F.pad(weight.detach().to(torch.float32), (0, kp - k))
    groups = w.view(n, kp // group_size, group_size)
    scale = absmax_scale(groups.abs().amax(dim=2), INT4_MAX)
    q = torch.round(groups / scale[..., None]).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)
    return pack_int4(q.view(n, kp)), scale


def dequantize_int4_per_group(
    packed: torch.Tensor, scale: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """Inverse of `quantize_int4_per_group` up to rounding: float32 [N, K]."""
    n = packed.shape[0]
    q = unpack_int4(packed).to(torch.float32).view(n, -1, group_size)
    return (q * scale[..., None]).view(n, -1)[:, :in_features]


def linear_int4_wo(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    w = dequantize_int4_per_group(weight, weight_scale, group_size, x.shape[-1])
    return linear_dequantized(x, w, bias)
