"""W4A8: 4-bit weights, 8-bit activations, 8-bit integer MMA, SVDQuant's extras.

Hopper has no 4-bit tensor-core MMA but an INT8 one at twice the 16-bit rate. A weight
stored in 4 bits can feed it exactly if its per-group scale is an integer: the weight
is quantized in two levels (QServe's progressive group quantization, symmetric here):

    per channel   s[n] = max|W[n]| / 119,  W8 = round(W / s) ∈ [-119, 119]
    per group     g[n, j] = max(1, ⌈max|W8[n, group j]| / 7⌉) ∈ [1, 17]  (uint8)
                  q = round(W8 / g) ∈ [-7, 7], packed two per byte as INT4
    W ≈ s[n] · g[n, j] · q[n, k],  and  g · q ∈ [-119, 119] is an exact int8.

A kernel widens q to int8 and multiplies by g in the integer domain once per weight
tile, multiplies int8 × int8 into int32 exactly, and applies s once in the epilogue: no
per-group rescale of the accumulator, unlike W4A4 on 8-bit MMA.

The activation pass of one linear (one read of x):
    x_s      = x / smooth                                   (smooth float32 [K], optional)
    lora_act = x_s (in lora_down's dtype) · lora_downᵀ      (float32 [M, R], optional)
    x_q      = round(x_s / a) ∈ [-127, 127] (int8), a = max|x_s[row]| / 127 per row
               (dynamic) or the calibrated float32 scalar (static)
The GEMM:
    y = (x_q · (g·q)ᵀ) · a · s + lora_act · lora_upᵀ + bias

Notation: M rows of x [..., K], N outputs, G the group (32 … 256), Kp = K rounded up
to G, R the rank. Weight tensors: packed uint8 [N, Kp/2], group scales uint8 [N, Kp/G],
channel scales float32 [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.kernels.reference.common import absmax_scale
from qcompile.kernels.reference.int4 import pack_int4, unpack_int4
from qcompile.kernels.reference.int8 import INT8_MAX

W8_MAX = 119  # |g · q| ≤ 7 · 17 = 119: the widened weight is always an int8
Q4_MAX = 7  # symmetric: -8 is never used
GROUP_SCALE_MAX = -(-W8_MAX // Q4_MAX)  # 17


def quantize_w4a8_weight(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float → (packed uint8 [N, Kp/2], group scales uint8 [N, Kp/G], channel
    scales float32 [N])."""
    n, k = weight.shape
    kp = -(-k // group_size) * group_size
    w = F.pad(weight.detach().to(torch.float32), (0, kp - k))
    channel = absmax_scale(w.abs().amax(dim=1), W8_MAX)
    w8 = torch.round(w / channel[:, None]).clamp_(-W8_MAX, W8_MAX)
    groups = w8.view(n, kp // group_size, group_size)
    group = torch.ceil(groups.abs().amax(dim=2) / Q4_MAX).clamp_(1, GROUP_SCALE_MAX)
    q = torch.round(groups / group[..., None]).clamp_(-Q4_MAX, Q4_MAX).to(torch.int8)
    return pack_int4(q.view(n, kp)), group.to(torch.uint8), channel


def widen_w4a8_weight(packed: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The int8 weight the MMA multiplies: g · q, int8 [N, Kp]."""
    n = packed.shape[0]
    q = unpack_int4(packed).to(torch.int16).view(n, group_scale.shape[1], -1)
    return (q * group_scale.to(torch.int16)[..., None]).view(n, -1).to(torch.int8)


def dequantize_w4a8_weight(
    packed: torch.Tensor, group_scale: torch.Tensor, channel_scale: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Inverse of `quantize_w4a8_weight` up to rounding: float32 [N, K]."""
    w8 = widen_w4a8_weight(packed, group_scale).to(torch.float32)
    return (w8 * channel_scale.to(torch.float32)[:, None])[:, :in_features]


def quantize_act_w4a8(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    input_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The activation pass: (x_q int8 [M, K], scale float32 [M, 1] or the static [],
    lora_act float32 [M, R] or None), as the fused kernel computes them."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if smooth is not None:
        rows = rows / smooth.to(torch.float32)
    if input_scale is None:
        scale = absmax_scale(rows.abs().amax(dim=1, keepdim=True), INT8_MAX)
    else:
        scale = input_scale.to(torch.float32)
    x_q = torch.round(rows / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    lora_act = None
    if lora_down is not None:
        lora_act = rows.to(lora_down.dtype).to(torch.float32) @ lora_down.to(torch.float32).T
    return x_q, scale, lora_act


def linear_w4a8(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_scale: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    input_scale: torch.Tensor | None,
) -> torch.Tensor:
    """y [..., N] in x.dtype; see the module docstring. Integer sums are exact
    (float64 holds any K · 127 · 119)."""
    k = x.shape[-1]
    x_q, scale, lora_act = quantize_act_w4a8(x, smooth, lora_down, input_scale)
    w8 = widen_w4a8_weight(weight, group_scale)[:, :k]
    acc = (x_q.to(torch.float64) @ w8.to(torch.float64).T).to(torch.float32)
    y = acc * scale * channel_scale.to(torch.float32)
    if lora_act is not None:
        y = y + lora_act @ lora_up.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
