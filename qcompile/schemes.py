"""Registry from a weight format to its implementation: quantizer, dequantizer, op.

Passes and modules never branch on the format; they look it up here
(`weight_format_impl`). A new format registers one `WeightFormatImpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.kernels import reference
from qcompile.recipes import (
    ActivationFormat,
    ActivationMode,
    ActivationSpec,
    Granularity,
    LayerScheme,
    WeightFormat,
    WeightSpec,
)

# Buffer names a quantized linear owns, as suffixes of the linear's FQN.
WEIGHT = "weight"
WEIGHT_SCALE = "weight_scale"
INPUT_SCALE = "input_scale"
BIAS = "bias"

QuantizedWeight = dict[str, torch.Tensor]  # buffer suffix → tensor


@dataclass(frozen=True)
class WeightFormatImpl:
    """What a weight format needs: pack a float weight, unpack it, run a linear."""

    quantize: Callable[[torch.Tensor, WeightSpec], QuantizedWeight]
    dequantize: Callable[[QuantizedWeight, WeightSpec, int], torch.Tensor]
    op: Callable[..., torch.Tensor]  # torch.ops.qcompile.<op>.default
    static_args: Callable[[WeightSpec], tuple] = lambda spec: ()


_WEIGHT_FORMATS: dict[WeightFormat, WeightFormatImpl] = {}


def register_weight_format(fmt: WeightFormat, impl: WeightFormatImpl) -> None:
    _WEIGHT_FORMATS[fmt] = impl


def weight_format_impl(spec: WeightSpec) -> WeightFormatImpl:
    try:
        return _WEIGHT_FORMATS[spec.format]
    except KeyError:
        raise NotImplementedError(f"no implementation registered for {spec.format}") from None


def _pair(
    per_channel: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    per_tensor: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Callable[..., QuantizedWeight]:
    by_granularity = {Granularity.PER_CHANNEL: per_channel, Granularity.PER_GROUP: per_channel}
    if per_tensor is not None:
        by_granularity[Granularity.PER_TENSOR] = per_tensor

    def quantize(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
        args = (spec.group_size,) if spec.group_size is not None else ()
        q, scale = by_granularity[spec.granularity](weight, *args)
        return {WEIGHT: q, WEIGHT_SCALE: scale}

    return quantize


register_weight_format(
    WeightFormat.INT8,
    WeightFormatImpl(
        quantize=_pair(reference.quantize_int8_per_channel, reference.quantize_int8_per_tensor),
        dequantize=lambda t, spec, k: reference.dequantize_int8_per_channel(
            t[WEIGHT], t[WEIGHT_SCALE]
        ),
        op=torch.ops.qcompile.linear_int8_wo.default,
    ),
)
register_weight_format(
    WeightFormat.FP8_E4M3,
    WeightFormatImpl(
        quantize=_pair(reference.quantize_fp8_per_channel, reference.quantize_fp8_per_tensor),
        dequantize=lambda t, spec, k: reference.dequantize_fp8_per_channel(
            t[WEIGHT], t[WEIGHT_SCALE]
        ),
        op=torch.ops.qcompile.linear_fp8_wo.default,
    ),
)
register_weight_format(
    WeightFormat.INT4,
    WeightFormatImpl(
        quantize=_pair(reference.quantize_int4_per_group),
        dequantize=lambda t, spec, k: reference.dequantize_int4_per_group(
            t[WEIGHT], t[WEIGHT_SCALE], spec.group_size, k
        ),
        op=torch.ops.qcompile.linear_int4_wo.default,
        static_args=lambda spec: (spec.group_size,),
    ),
)


@dataclass(frozen=True)
class ActivationImpl:
    """An activation format: the dtype activations are quantized to and the GEMM."""

    dtype: torch.dtype
    gemm: Callable[..., torch.Tensor]  # (x_q, x_scale, w, w_scale, bias, out_dtype)


_ACTIVATION_FORMATS = {
    ActivationFormat.INT8: ActivationImpl(torch.int8, torch.ops.qcompile.linear_int8_w8a8.default),
    ActivationFormat.FP8_E4M3: ActivationImpl(
        torch.float8_e4m3fn, torch.ops.qcompile.linear_fp8_w8a8.default
    ),
}
QUANTIZE_STATIC = torch.ops.qcompile.quantize_act_static.default
QUANTIZE_DYNAMIC = torch.ops.qcompile.quantize_act_dynamic.default


def activation_impl(spec: ActivationSpec) -> ActivationImpl:
    return _ACTIVATION_FORMATS[spec.format]


def tensor_names(scheme: LayerScheme) -> tuple[str, ...]:
    """The buffers a quantized linear of this scheme owns (suffixes of its FQN)."""
    static = scheme.activation.mode is ActivationMode.STATIC
    return (WEIGHT, WEIGHT_SCALE, INPUT_SCALE) if static else (WEIGHT, WEIGHT_SCALE)


def quantize_activation(
    x: torch.Tensor, spec: ActivationSpec, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, x_scale) as the lowered graph computes them."""
    dtype = activation_impl(spec).dtype
    if spec.mode is ActivationMode.STATIC:
        return QUANTIZE_STATIC(x, input_scale, dtype), input_scale
    return QUANTIZE_DYNAMIC(x, dtype)


def linear(
    x: torch.Tensor, tensors: QuantizedWeight, bias: torch.Tensor | None, scheme: LayerScheme
) -> torch.Tensor:
    """A quantized linear, eagerly: the same ops, in the same order, as the lowered graph."""
    weight = weight_format_impl(scheme.weight)
    if not scheme.activation.quantized:
        return weight.op(
            x, tensors[WEIGHT], tensors[WEIGHT_SCALE], bias, *weight.static_args(scheme.weight)
        )
    x_q, x_scale = quantize_activation(x, scheme.activation, tensors.get(INPUT_SCALE))
    gemm = activation_impl(scheme.activation).gemm
    return gemm(x_q, x_scale, tensors[WEIGHT], tensors[WEIGHT_SCALE], bias, x.dtype)
