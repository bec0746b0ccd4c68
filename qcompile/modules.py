"""`QuantizedLinear`: the eager module that owns a quantized linear's tensors.

The same tensor objects are read by the lowered program (by FQN) and by this module's
forward (the eager fallback), so a quantized model holds each packed weight once.

It is an `nn.Linear` (without a float weight), as bitsandbytes', quanto's and torchao's
quantized linears are: diffusers' and peft's code that looks for linears (LoRA
adapters, layer counts) finds it. qcompile's own passes tell the two apart with
`is_float_linear`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from qcompile.errors import QCompileError
from qcompile.recipes import LayerScheme
from qcompile.schemes import (
    BIAS,
    FLOAT_TENSORS,
    INPUT_SCALE,
    LORA_DOWN,
    LORA_UP,
    SMOOTH,
    QuantizedWeight,
    linear,
    tensor_names,
    weight_impl,
)
from qcompile.svdquant import quantize_layer, split_layer


class QuantizedLinear(nn.Linear):
    """A linear whose weight is packed; forward calls the scheme's ``qcompile::`` op.

    Packed weights, scales and smoothing factors are buffers that keep their dtype under
    ``module.to(dtype)`` (only their device follows); the bias (a parameter) and the
    16-bit low-rank branch (`lora_down`, `lora_up`) follow the model's dtype.

    The packed weight is frozen. With autograd on (training adapters beside it), the
    gradient flows to the input through the dequantized weight; activation
    quantization, where the scheme has it, passes gradients straight through.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerScheme,
        tensors: QuantizedWeight,
        bias: torch.Tensor | None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight to make
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.quantized_names = tensor_names(scheme)
        self._unfused: QuantizedWeight | None = None  # see fuse_delta
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
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantizedLinear.apply(x, self)
        return linear(x, self.quantized_tensors, self.bias, self.scheme)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [N, K] this layer computes with (branch and smoothing
        folded back in)."""
        impl = weight_impl(self.scheme)
        weight = impl.dequantize(self.quantized_tensors, self.scheme.weight, self.in_features)
        if self.scheme.rank:
            up, down = getattr(self, LORA_UP).float(), getattr(self, LORA_DOWN).float()
            weight = weight + up @ down
        if self.scheme.smooth:
            weight = weight / getattr(self, SMOOTH)
        return weight

    def fuse_delta(self, delta: torch.Tensor, check_finite: bool = False) -> None:
        """Fold a float [N, K] delta (a fused LoRA) into the weight: dequantize, add,
        re-split and re-pack with this layer's scheme and smoothing, written in place
        (same shapes and dtypes, so the lowered graph reads the new values). The
        tensors before the first fuse are kept for `unfuse`."""
        weight = self.dequantized_weight() + delta.float()
        if check_finite and not torch.isfinite(weight).all():
            raise ValueError("NaNs detected in the fused weights; the adapter may be broken")
        smooth = getattr(self, SMOOTH) if self.scheme.smooth else None
        with torch.no_grad():
            tensors = quantize_layer(split_layer(weight, self.scheme, smooth), self.scheme)
            if self._unfused is None:
                self._unfused = {n: t.clone() for n, t in self.quantized_tensors.items()}
            for name, tensor in tensors.items():
                if name != INPUT_SCALE:  # calibrated on activations: unchanged
                    getattr(self, name).copy_(tensor)

    def unfuse(self) -> None:
        """Restore the packed tensors from before the first `fuse_delta`, exactly."""
        if self._unfused is not None:
            with torch.no_grad():
                for name, tensor in self._unfused.items():
                    getattr(self, name).copy_(tensor)
            self._unfused = None

    def reset_parameters(self) -> None:  # nn.Linear's would initialise a float weight
        return None

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


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = quantized linear(x); dy/dx through the dequantized weight (frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        return linear(x, module.quantized_tensors, module.bias, module.scheme)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantized_weight().to(grad.dtype)
        return grad @ weight, None


def adopt_lora_layer(layer: nn.Module) -> None:
    """Make a peft LoRA layer around a QuantizedLinear correct: its adapters stay a
    16-bit branch beside the quantized GEMM (peft casts them to the base weight's dtype,
    which for fp8 weights is float8), and fusing re-packs the weight with the adapter
    folded in (peft would add a float delta into the integer codes)."""
    dtype = layer.base_layer.bias.dtype if layer.base_layer.bias is not None else torch.float32
    for name in getattr(layer, "adapter_layer_names", ()):
        for param in getattr(layer, name).parameters():
            if param.dtype.itemsize == 1 and param.dtype.is_floating_point:
                param.data = param.data.to(dtype)
    layer.merge = functools.partial(_merge, layer)
    layer.unmerge = functools.partial(_unmerge, layer)


def _merge(layer, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    """peft's `merge` for a LoRA layer on a QuantizedLinear (diffusers' fuse_lora)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    base = layer.get_base_layer()
    for name in check_adapters_to_merge(layer, adapter_names):
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name) or getattr(layer, "lora_bias", {}).get(name):
            raise QCompileError(
                f"adapter {name!r} uses DoRA or a LoRA bias, which qcompile cannot fuse into "
                "a quantized weight; keep it unfused"
            )
        base.fuse_delta(layer.get_delta_weight(name), check_finite=safe_merge)
        layer.merged_adapters.append(name)


def _unmerge(layer) -> None:
    """peft's `unmerge`: the packed weight exactly as it was before the first fuse."""
    if layer.merged_adapters:
        layer.get_base_layer().unfuse()
        layer.merged_adapters.clear()


def is_lora_layer(module: nn.Module | None) -> bool:
    """A peft LoRA layer (wraps its `base_layer`; adapters in `lora_A` / `lora_B`)."""
    return (
        type(module).__module__.startswith("peft.")
        and hasattr(module, "base_layer")
        and hasattr(module, "lora_A")
    )


def _is_lora_on_quantized(module: nn.Module | None) -> bool:
    return is_lora_layer(module) and isinstance(module.base_layer, QuantizedLinear)


def adopt_lora_layers(layers: Iterable[nn.Module]) -> None:
    """`adopt_lora_layer` on those of the peft LoRA `layers` around a QuantizedLinear
    (peft casts adapters again after loading their weights: the runtime calls this on
    the first forward after any module change)."""
    for layer in layers:
        if _is_lora_on_quantized(layer):
            adopt_lora_layer(layer)


_generation = 0  # bumped whenever any module anywhere registers a submodule


def registration_generation() -> int:
    """Changes whenever a submodule was registered (setattr, add_module) anywhere: a
    runtime re-checks its model's structure only after that happened."""
    return _generation


def _module_registered(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """The one global module-registration hook: counts registrations, and adopts peft
    LoRA layers as peft swaps them in (so a fuse before the first forward re-packs).
    Under torch.compile it does nothing: forwards that slice a ModuleList build
    temporary containers, and a global counter bumped in a traced forward would become
    a guard that fails on every call (a recompile each step)."""
    global _generation
    if torch.compiler.is_compiling():
        return
    _generation += 1
    if _is_lora_on_quantized(submodule):
        adopt_lora_layer(submodule)


torch.nn.modules.module.register_module_module_registration_hook(_module_registered)


def is_float_linear(module: nn.Module) -> bool:
    """An `nn.Linear` that qcompile has not quantized."""
    return isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear)
