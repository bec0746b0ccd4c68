"""W4A8: 4-bit weights, 8-bit activations, 8-bit integer MMA, SVDQuant's extras.

Hopper has no 4-bit tensor-core MMA but an INT8 one at twice the 16-bit rate. A weight
stored in 4 bits can feed it exactly if its per-group scale is an integer: the weight
is quantized in two levels (QServe's progressive group quantization, symmetric here):

    per channel   s[n] = max|W[n]| / 112,  W8 = round(W / s) ∈ [-112, 112]
    per group     g[n, j] = max(1, ⌈max|W8[n, group j]| / 7⌉) ∈ [1, 16]  (uint8)
                  q = round(W8 / g) ∈ [-7, 7]
    W ≈ s[n] · g[n, j] · q[n, k],  and  g · q ∈ [-112, 112] is an exact int8.

Storage, made for widening four weights per 32-bit operation (``PACK_BLOCK`` = 64):
each code is stored offset-binary, u = q + 8 ∈ [1, 15], and each 64-wide block of a row
packs into 32 bytes, byte j holding element j (low nibble) and element 32 + j (high
nibble); K is padded with zero weights (u = 8) to Kp, a multiple of max(G, 64). A
kernel reads four bytes as one int32 word w and gets four int8 weights with three
integer operations and no carry between the bytes:

    (w & 0x0F0F0F0F) · g + (128 − 8g) · 0x01010101     each byte u·g + 128 − 8g ∈ [9, 247]
    … ^ 0x80808080                                     each byte (u − 8)·g = q·g, signed

(for the high nibbles, w >> 4 first), multiplies int8 × int8 into int32 exactly, and
applies s once in the epilogue: no per-group rescale of the accumulator, unlike W4A4
on 8-bit MMA. g ≤ 16 keeps 128 − 8g ≥ 0 (no borrow) and u·g ≤ 240 (no carry).

The activation pass of one linear (one read of x):
    x_s      = x · (1 / smooth)                             (smooth float32 [K], optional)
    lora_act = x_s (in lora_down's dtype) · lora_downᵀ      (float32 [M, R], optional)
    x_q      = round(x_s · (1 / a)) ∈ [-127, 127] (int8), a = max|x_s[row]| / 127 per
               row (dynamic) or the calibrated float32 scalar (static)
Both divisions are a correctly rounded reciprocal then multiplies: one division per
column and per row instead of one per element (IEEE division is a slow multi-instruction
path on GPUs). Against x / smooth and x_s / a this moves a value by at most one ulp
before rounding to int8.
The GEMM:
    y = (x_q · (g·q)ᵀ) · a · s + lora_act · lora_upᵀ + bias

Notation: M rows of x [..., K], N outputs, G the group (32 … 256), Kp = K rounded up to
max(G, 64), R the rank. Weight tensors: packed uint8 [N, Kp/2], group scales uint8
[N, Kp/G], channel scales float32 [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.kernels.reference.common import absmax_scale
from qcompile.kernels.reference.int8 import INT8_MAX

W8_MAX = 112  # |g · q| ≤ 7 · 16: the widened weight is an exact int8
Q4_MAX = 7  # symmetric codes: q = -8 (u = 0) is never stored
GROUP_SCALE_MAX = W8_MAX // Q4_MAX  # 16
PACK_BLOCK = 64  # elements per packed block: byte j holds elements j and j + 32
OFFSET = 8  # u = q + 8


def padded_k(in_features: int, group_size: int) -> int:
    """Kp: K rounded up to whole groups and whole packed blocks."""
    step = max(group_size, PACK_BLOCK)
    return -(-in_features // step) * step


def quantize_w4a8_weight(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float → (packed uint8 [N, Kp/2], group scales uint8 [N, Kp/G], channel
    scales float32 [N])."""
    n, k = weight.shape
    kp = padded_k(k, group_size)
    w = F.pad(weight.detach().to(torch.float32), (0, kp - k))
    channel = absmax_scale(w.abs().amax(dim=1), W8_MAX)
    w8 = torch.round(w / channel[:, None]).clamp_(-W8_MAX, W8_MAX)
    groups = w8.view(n, kp // group_size, group_size)
    group = torch.ceil(groups.abs().amax(dim=2) / Q4_MAX).clamp_(1, GROUP_SCALE_MAX)
    q = torch.round(groups / group[..., None]).clamp_(-Q4_MAX, Q4_MAX).view(n, kp)
    return pack_w4a8_codes(q.to(torch.int8)), group.to(torch.uint8), channel


def pack_w4a8_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, Kp] in [-7, 7] → uint8 [N, Kp/2] in the half-split block layout."""
    n, kp = q.shape
    u = (q.to(torch.int16) + OFFSET).to(torch.uint8).view(n, kp // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).view(n, kp // 2)


def unpack_w4a8_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_w4a8_codes`: int8 codes [N, Kp]."""
    n = packed.shape[0]
    blocks = packed.view(n, -1, PACK_BLOCK // 2)
    u = torch.stack((blocks & 0xF, blocks >> 4), dim=2)  # [N, Kp/64, 2, 32]
    return (u.to(torch.int16) - OFFSET).to(torch.int8).view(n, -1)


def widen_w4a8_weight(packed: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The int8 weight the MMA multiplies: g · q, int8 [N, Kp]."""
    n = packed.shape[0]
    q = unpack_w4a8_codes(packed).to(torch.int16).view(n, group_scale.shape[1], -1)
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
        rows = rows * (1.0 / smooth.to(torch.float32))
    if input_scale is None:
        scale = absmax_scale(rows.abs().amax(dim=1, keepdim=True), INT8_MAX)
    else:
        scale = input_scale.to(torch.float32)
    x_q = torch.round(rows * (1.0 / scale)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
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
    (float64 holds any K · 127 · 112)."""
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
