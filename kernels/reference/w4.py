"""4-bit linears: W4A16 and W4A4 in INT4, MXFP4 or NVFP4, with SVDQuant's extras.

Notation: x [..., K] activation, M its rows, N output features, G the group (INT4: the
recipe's group size; MXFP4: 32; NVFP4: 16), Kp = K rounded up to G, R the rank.

A 4-bit tensor is (packed uint8 [rows, Kp/2], block scales [rows, Kp/G], global scale
or None): INT4 scales are float32, MXFP4 scales e8m0 (uint8), NVFP4 scales e4m3 with a
float32 per-tensor global scale (see `int4.py`, `fp4.py`). Activations use the weight's
format and group and are quantized dynamically, per row and group, on every call
(NVFP4's global scale from the whole activation).

SVDQuant (one op per linear):
    x_s = x / smooth                       (smooth float32 [K]; skipped when None)
    y   = Q(x_s) · Q(R)ᵀ                   (4-bit GEMM, float32 accumulation)
        + (x_s · lora_downᵀ) · lora_upᵀ    (16-bit branch, lora_down [R, K], lora_up [N, R])
        + bias
The reference dequantizes both operands and multiplies in float32: the same sums an
integer or FP4 GEMM with per-group scales computes, up to summation order.
"""

from __future__ import annotations

import torch

from qcompile.kernels.reference import fp4
from qcompile.kernels.reference.int4 import dequantize_int4_per_group, quantize_int4_per_group

FORMATS = ("int4", "mxfp4", "nvfp4")
BLOCK = {"mxfp4": fp4.MX_BLOCK, "nvfp4": fp4.NV_BLOCK}

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def quantize_4bit(values: torch.Tensor, fmt: str, group_size: int) -> Packed:
    """[rows, K] float → (packed uint8, block scales, global scale or None)."""
    if fmt == "int4":
        packed, scale = quantize_int4_per_group(values, group_size)
        return packed, scale, None
    if fmt == "mxfp4":
        packed, scale = fp4.quantize_mxfp4(values)
        return packed, scale, None
    if fmt == "nvfp4":
        return fp4.quantize_nvfp4(values)
    raise ValueError(f"unknown 4-bit format {fmt!r}; expected one of {FORMATS}")


def dequantize_4bit(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: str,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Inverse of `quantize_4bit` up to rounding: float32 [rows, K]."""
    if fmt == "int4":
        return dequantize_int4_per_group(packed, scale, group_size, in_features)
    if fmt == "mxfp4":
        return fp4.dequantize_mxfp4(packed, scale, in_features)
    if fmt == "nvfp4":
        return fp4.dequantize_nvfp4(packed, scale, global_scale, in_features)
    raise ValueError(f"unknown 4-bit format {fmt!r}; expected one of {FORMATS}")


def fake_quantize_4bit(values: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """x [..., K] → float32 x after a dynamic 4-bit round trip (what W4A4 computes with)."""
    k = values.shape[-1]
    rows = values.reshape(-1, k).to(torch.float32)
    return dequantize_4bit(*quantize_4bit(rows, fmt, group_size), fmt, group_size, k).view(
        values.shape
    )


def quantize_act_4bit(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    fmt: str | None,
    group_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The activation pass of a 4-bit linear, as the fused kernel computes it.

    Returns (packed, scales, global scale, lora_act): x_s = x / smooth quantized per row
    and group (all None without a format) and lora_act = x_s (in lora_down's dtype) ·
    lora_downᵀ in float32 [M, R] (None without a branch).
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if smooth is not None:
        rows = rows / smooth.to(torch.float32)
    packed, scale, global_scale = (
        (None, None, None) if fmt is None else quantize_4bit(rows, fmt, group_size)
    )
    lora_act = None
    if lora_down is not None:
        lora_act = rows.to(lora_down.dtype).to(torch.float32) @ lora_down.to(torch.float32).T
    return packed, scale, global_scale, lora_act


def _lowrank(
    x_s: torch.Tensor, lora_down: torch.Tensor | None, lora_up: torch.Tensor | None
) -> torch.Tensor | None:
    if lora_down is None:
        return None
    # The branch reads the 16-bit smoothed activation, as the fused kernel does.
    x16 = x_s.to(lora_down.dtype).to(torch.float32)
    return (x16 @ lora_down.to(torch.float32).T) @ lora_up.to(torch.float32).T


def _finish(
    y: torch.Tensor, branch: torch.Tensor | None, bias: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    if branch is not None:
        y = y + branch
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(like.dtype)


def linear_w4a16(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    fmt: str,
    group_size: int,
) -> torch.Tensor:
    k = x.shape[-1]
    w = dequantize_4bit(weight, weight_scale, weight_global_scale, fmt, group_size, k)
    xf = x.to(torch.float32)
    return _finish(xf @ w.T, _lowrank(x, lora_down, lora_up), bias, x)


def linear_w4a4(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    fmt: str,
    group_size: int,
) -> torch.Tensor:
    k = x.shape[-1]
    x_s = x.to(torch.float32)
    if smooth is not None:
        x_s = x_s / smooth.to(torch.float32)
    w = dequantize_4bit(weight, weight_scale, weight_global_scale, fmt, group_size, k)
    y = fake_quantize_4bit(x_s, fmt, group_size) @ w.T
    return _finish(y, _lowrank(x_s, lora_down, lora_up), bias, x)
