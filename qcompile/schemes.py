"""Registry from a weight format to its implementation: quantizer, dequantizer, op.

Passes and modules never branch on the format; they look it up here
(`weight_impl` for a layer's scheme, `weight_format_impl` for a format). A new format
registers one `WeightFormatImpl`; W4A8 (INT4 weights with INT8 activations) stores its
INT4 weight differently, with integer group scales (`W4A8_WEIGHT`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qcompile.kernels import ops as _ops  # noqa: F401 - defines torch.ops.qcompile.*
from qcompile.kernels import reference
from qcompile.recipes import (
    FOUR_BIT_ACTIVATIONS,
    FP4_BLOCK,
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
WEIGHT_GLOBAL_SCALE = "weight_global_scale"  # NVFP4's float32 per-tensor scale
WEIGHT_GROUP_SCALE = "weight_group_scale"  # W4A8's integer (uint8) scale per group
INPUT_SCALE = "input_scale"
SMOOTH = "smooth"  # float32 [K]: the activation is divided by it before quantization
LORA_DOWN = "lora_down"  # 16-bit [R, K]
LORA_UP = "lora_up"  # 16-bit [N, R]
BIAS = "bias"
# Owned tensors that follow the model's float dtype (like the bias); the others keep
# the dtype they were packed in.
FLOAT_TENSORS = (LORA_DOWN, LORA_UP)

QuantizedWeight = dict[str, torch.Tensor]  # buffer suffix → tensor


@dataclass(frozen=True)
class WeightFormatImpl:
    """What a weight format needs: pack a float weight, unpack it, run a linear."""

    quantize: Callable[[torch.Tensor, WeightSpec], QuantizedWeight]
    dequantize: Callable[[QuantizedWeight, WeightSpec, int], torch.Tensor]
    op: Callable[..., torch.Tensor]  # torch.ops.qcompile.<op>.default
    static_args: Callable[[WeightSpec], tuple] = lambda spec: ()
    # True when each weight row packs to its own rows of every output tensor (no scale
    # over the whole tensor): `pack_weight` may then pack the rows in chunks.
    rowwise: Callable[[WeightSpec], bool] = lambda spec: False


_WEIGHT_FORMATS: dict[WeightFormat, WeightFormatImpl] = {}


def register_weight_format(fmt: WeightFormat, impl: WeightFormatImpl) -> None:
    _WEIGHT_FORMATS[fmt] = impl


def weight_format_impl(spec: WeightSpec) -> WeightFormatImpl:
    try:
        return _WEIGHT_FORMATS[spec.format]
    except KeyError:
        raise NotImplementedError(f"no implementation registered for {spec.format}") from None


# Packing works in float32 with a few weight-sized temporaries (int8: about 14 bytes
# per parameter at peak); row-wise formats pack at most this many float32 bytes of rows
# at a time, so memory grows by the packed result plus one chunk, not by a multiple of
# the largest linear.
PACK_CHUNK_BYTES = 8 << 20


def weight_impl(scheme: LayerScheme) -> WeightFormatImpl:
    """How a layer of `scheme` stores its weight: its format's, except for W4A8, whose
    INT4 weight has integer group scales the 8-bit MMA can use (`W4A8_WEIGHT`)."""
    return W4A8_WEIGHT if is_w4a8(scheme) else weight_format_impl(scheme.weight)


def is_w4a8(scheme: LayerScheme) -> bool:
    return scheme.weight.format is WeightFormat.INT4 and (
        scheme.activation.format is ActivationFormat.INT8
    )


def pack_weight(
    weight: torch.Tensor, spec: WeightSpec, impl: WeightFormatImpl | None = None
) -> QuantizedWeight:
    """Quantize and pack a float [N, K] weight with `impl` (default: the format's);
    bitwise what `impl.quantize` returns."""
    impl = impl or weight_format_impl(spec)
    n = weight.shape[0]
    rows = max(1, PACK_CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    if n <= rows or weight.is_meta or not impl.rowwise(spec):
        return impl.quantize(weight, spec)
    out: QuantizedWeight = {}
    for start in range(0, n, rows):
        part = impl.quantize(weight[start : start + rows], spec)
        for name, tensor in part.items():
            if name not in out:
                out[name] = tensor.new_empty((n, *tensor.shape[1:]))
            out[name][start : start + tensor.shape[0]] = tensor
    return out


def _not_per_tensor(spec: WeightSpec) -> bool:
    return spec.granularity is not Granularity.PER_TENSOR


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
        rowwise=_not_per_tensor,
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
        rowwise=_not_per_tensor,
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
        rowwise=_not_per_tensor,
    ),
)


def _fp4(fmt: WeightFormat) -> WeightFormatImpl:
    def quantize(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
        packed, scale, global_scale = reference.w4.quantize_4bit(weight, fmt.value, spec.group_size)
        tensors = {WEIGHT: packed, WEIGHT_SCALE: scale}
        if global_scale is not None:
            tensors[WEIGHT_GLOBAL_SCALE] = global_scale
        return tensors

    def dequantize(t: QuantizedWeight, spec: WeightSpec, k: int) -> torch.Tensor:
        return reference.w4.dequantize_4bit(
            t[WEIGHT], t[WEIGHT_SCALE], t.get(WEIGHT_GLOBAL_SCALE), fmt.value, spec.group_size, k
        )

    # NVFP4's global scale comes from the whole tensor: it packs in one piece.
    rowwise = fmt is WeightFormat.MXFP4
    return WeightFormatImpl(quantize, dequantize, op=LINEAR_W4A16, rowwise=lambda spec: rowwise)


LINEAR_W4A16 = torch.ops.qcompile.linear_w4a16.default
LINEAR_W4A4 = torch.ops.qcompile.linear_w4a4.default
LINEAR_W4A8 = torch.ops.qcompile.linear_w4a8.default


def _w4a8_quantize(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    packed, group_scale, channel_scale = reference.w4a8.quantize_w4a8_weight(
        weight, spec.group_size
    )
    return {WEIGHT: packed, WEIGHT_GROUP_SCALE: group_scale, WEIGHT_SCALE: channel_scale}


W4A8_WEIGHT = WeightFormatImpl(
    quantize=_w4a8_quantize,
    dequantize=lambda t, spec, k: reference.w4a8.dequantize_w4a8_weight(
        t[WEIGHT], t[WEIGHT_GROUP_SCALE], t[WEIGHT_SCALE], k
    ),
    op=LINEAR_W4A8,
    rowwise=lambda spec: True,
)
register_weight_format(WeightFormat.MXFP4, _fp4(WeightFormat.MXFP4))
register_weight_format(WeightFormat.NVFP4, _fp4(WeightFormat.NVFP4))


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
    names = [WEIGHT, WEIGHT_SCALE]
    if scheme.weight.format is WeightFormat.NVFP4:
        names.append(WEIGHT_GLOBAL_SCALE)
    if is_w4a8(scheme):
        names.append(WEIGHT_GROUP_SCALE)
    if scheme.activation.mode is ActivationMode.STATIC:
        names.append(INPUT_SCALE)
    if scheme.smooth:
        names.append(SMOOTH)
    if scheme.rank:
        names += [LORA_DOWN, LORA_UP]
    return tuple(names)


def fused_call(scheme: LayerScheme, x, t: dict, bias) -> tuple | None:
    """(op, args) of the single op a 4-bit linear lowers to, or None for the others.

    `x`, `t` (tensors by buffer name) and `bias` are tensors for the eager module and
    fx nodes for lowering: both build the same call.
    """
    op = fused_op(scheme)
    if op is None:
        return None
    w = scheme.weight
    if op is LINEAR_W4A8:
        branch = (t.get(SMOOTH), t.get(LORA_DOWN), t.get(LORA_UP), t.get(INPUT_SCALE))
        return op, (x, t[WEIGHT], t[WEIGHT_GROUP_SCALE], t[WEIGHT_SCALE], bias, *branch,
                    w.group_size)  # fmt: skip
    common = (x, t[WEIGHT], t[WEIGHT_SCALE], t.get(WEIGHT_GLOBAL_SCALE), bias)
    branch = (t.get(LORA_DOWN), t.get(LORA_UP), w.format.value, w.group_size)
    if op is LINEAR_W4A4:
        return op, (*common, t.get(SMOOTH), *branch)
    return op, (*common, *branch)


def fused_op(scheme: LayerScheme):
    """The single 4-bit op of a scheme (W4A8, W4A4, or FP4 / low-rank W4A16), else None."""
    if is_w4a8(scheme):
        return LINEAR_W4A8
    if scheme.activation.format in FOUR_BIT_ACTIVATIONS:
        return LINEAR_W4A4
    if scheme.weight.format in FP4_BLOCK or scheme.rank:
        return LINEAR_W4A16
    return None


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
    fused = fused_call(scheme, x, tensors, bias)
    if fused is not None:
        op, args = fused
        return op(*args)
    weight = weight_format_impl(scheme.weight)
    if not scheme.activation.quantized:
        return weight.op(
            x, tensors[WEIGHT], tensors[WEIGHT_SCALE], bias, *weight.static_args(scheme.weight)
        )
    x_q, x_scale = quantize_activation(x, scheme.activation, tensors.get(INPUT_SCALE))
    gemm = activation_impl(scheme.activation).gemm
    return gemm(x_q, x_scale, tensors[WEIGHT], tensors[WEIGHT_SCALE], bias, x.dtype)
