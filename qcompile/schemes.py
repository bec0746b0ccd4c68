"""Registry from a weight format to its implementation: quantizer, dequantizer, op.

Passes and modules never branch on the format; they look it up here
(`weight_format_impl`). A new format registers one `WeightFormatImpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.kernels import reference
from qcompile.recipes import WeightFormat, WeightSpec

# Buffer names a quantized linear owns, as suffixes of the linear's FQN.
WEIGHT = "weight"
WEIGHT_SCALE = "weight_scale"
BIAS = "bias"

QuantizedWeight = dict[str, torch.Tensor]  # buffer suffix → tensor


@dataclass(frozen=True)
class WeightFormatImpl:
    """What a weight format needs: pack a float weight, unpack it, run a linear."""

    quantize: Callable[[torch.Tensor, WeightSpec], QuantizedWeight]
    dequantize: Callable[[QuantizedWeight, WeightSpec, int], torch.Tensor]
    op: Callable[..., torch.Tensor]  # torch.ops.qcompile.<op>.default
    static_args: Callable[[WeightSpec], tuple] = lambda spec: ()

    def linear(
        self,
        x: torch.Tensor,
        tensors: QuantizedWeight,
        bias: torch.Tensor | None,
        spec: WeightSpec,
    ) -> torch.Tensor:
        return self.op(x, tensors[WEIGHT], tensors[WEIGHT_SCALE], bias, *self.static_args(spec))


_WEIGHT_FORMATS: dict[WeightFormat, WeightFormatImpl] = {}


def register_weight_format(fmt: WeightFormat, impl: WeightFormatImpl) -> None:
    _WEIGHT_FORMATS[fmt] = impl


def weight_format_impl(spec: WeightSpec) -> WeightFormatImpl:
    try:
        return _WEIGHT_FORMATS[spec.format]
    except KeyError:
        raise NotImplementedError(f"no implementation registered for {spec.format}") from None


def _pair(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., QuantizedWeight]:
    def quantize(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
        args = (spec.group_size,) if spec.group_size is not None else ()
        q, scale = fn(weight, *args)
        return {WEIGHT: q, WEIGHT_SCALE: scale}

    return quantize


register_weight_format(
    WeightFormat.INT8,
    WeightFormatImpl(
        quantize=_pair(reference.quantize_int8_per_channel),
        dequantize=lambda t, spec, k: reference.dequantize_int8_per_channel(
            t[WEIGHT], t[WEIGHT_SCALE]
        ),
        op=torch.ops.qcompile.linear_int8_wo.default,
    ),
)
register_weight_format(
    WeightFormat.FP8_E4M3,
    WeightFormatImpl(
        quantize=_pair(reference.quantize_fp8_per_channel),
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
