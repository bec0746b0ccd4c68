"""Activation quantization and W8A8 GEMM references.

Static: one float32 scale for the whole tensor (from calibration). Dynamic: a float32
scale per row of x (all dims but the last), shape [..., 1]. INT8 is symmetric in
[-127, 127]; FP8 is e4m3 (|f| ≤ 448). The GEMM accumulates exactly (int8: float64,
which holds any K·127² sum; fp8: float32, as tensor cores do), then applies
x_scale · w_scale, adds the bias and casts to the output dtype.
"""

from __future__ import annotations

import torch

from qcompile.kernels.reference.common import absmax_scale
from qcompile.kernels.reference.fp8 import FP8_E4M3_MAX
from qcompile.kernels.reference.int8 import INT8_MAX

_QMAX = {torch.int8: INT8_MAX, torch.float8_e4m3fn: FP8_E4M3_MAX}


def qmax(dtype: torch.dtype) -> float:
    try:
        return _QMAX[dtype]
    except KeyError:
        raise ValueError(f"activations quantize to int8 or float8_e4m3fn, not {dtype}") from None


def _cast(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = qmax(dtype)
    if dtype is torch.int8:
        return torch.round(scaled).clamp_(-limit, limit).to(torch.int8)
    return scaled.clamp_(-limit, limit).to(dtype)


def fake_quantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantize to `dtype` with `scale` and back, in float32 (what observers score)."""
    return _cast(values / scale, dtype).to(torch.float32) * scale


def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()  # the op's outputs are contiguous, as its fake says, whatever x is
    return _cast(x.to(torch.float32) / scale.to(torch.float32), dtype)


def quantize_act_dynamic(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.contiguous().to(torch.float32)  # contiguous outputs, as the op's fake says
    scale = absmax_scale(xf.abs().amax(dim=-1, keepdim=True), qmax(dtype))
    return _cast(xf / scale, dtype), scale


def linear_w8a8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    acc_dtype = torch.float64 if x_q.dtype is torch.int8 else torch.float32
    acc = torch.matmul(x_q.to(acc_dtype), weight.to(acc_dtype).T).to(torch.float32)
    out = acc * x_scale.to(torch.float32) * weight_scale.to(torch.float32).reshape(-1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
