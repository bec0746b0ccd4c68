"""`QuantizedLinear`: the eager module that owns a quantized linear's tensors.

The same tensor objects are read by the lowered program (by FQN) and by this module's
forward (the eager fallback), so a quantized model holds each packed weight once.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompile.recipes import LayerScheme
from qcompile.schemes import (
    BIAS,
    FLOAT_TENSORS,
    LORA_DOWN,
    LORA_UP,
    SMOOTH,
    QuantizedWeight,
    linear,
    tensor_names,
    weight_format_impl,
)


class QuantizedLinear(nn.Module):
    """A linear whose weight is packed; forward calls the scheme's ``qcompile::`` op.

    Packed weights, scales and smoothing factors are buffers that keep their dtype under
    ``module.to(dtype)`` (only their device follows); the bias (a parameter) and the
    16-bit low-rank branch (`lora_down`, `lora_up`) follow the model's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerScheme,
        tensors: QuantizedWeight,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.quantized_names = tensor_names(scheme)
        for name in self.quantized_names:
            self.register_buffer(name, tensors[name])
        if bias is None:
            self.register_parameter(BIAS, None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)

    @property
    def quantized_tensors(self) -> QuantizedWeight:
        return {name: getattr(self, name) for name in self.quantized_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.quantized_tensors, self.bias, self.scheme)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [N, K] this layer computes with (branch and smoothing
        folded back in)."""
        impl = weight_format_impl(self.scheme.weight)
        weight = impl.dequantize(self.quantized_tensors, self.scheme.weight, self.in_features)
        if self.scheme.rank:
            up, down = getattr(self, LORA_UP).float(), getattr(self, LORA_DOWN).float()
            weight = weight + up @ down
        if self.scheme.smooth:
            weight = weight / getattr(self, SMOOTH)
        return weight

    def _apply(self, fn, recurse=True):
        packed = {n: self._buffers[n] for n in self.quantized_names if n not in FLOAT_TENSORS}
        for name in packed:
            self._buffers[name] = None  # nn.Module._apply skips None buffers
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(packed)
            raise
        for name, tensor in packed.items():
            moved = fn(tensor)
            if moved.dtype != tensor.dtype:  # a dtype cast: move, never convert
                moved = tensor.to(device=moved.device)
            self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        w = self.scheme.weight
        group = f", group_size={w.group_size}" if w.group_size else ""
        a = self.scheme.activation
        act = f", activations={a.format.value} {a.mode.value}" if a.quantized else ""
        svd = (", smooth" if self.scheme.smooth else "") + (
            f", rank={self.scheme.rank}" if self.scheme.rank else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={w.format.value}{group}{act}{svd}, bias={self.bias is not None}"
        )
