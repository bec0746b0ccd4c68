"""Teach diffusers' LoRA loaders a quantized linear's logical shape.

diffusers' Flux-family loaders (`load_lora_weights`) compare each LoRA's in/out
features with the base layer's weight shape to decide whether the layer must be
expanded (Control LoRAs). A packed 4-bit weight is [N, K/2], so every LoRA on an int4
or FP4 layer looked like an expansion and failed inside diffusers. diffusers reads the
logical shape of bitsandbytes' and GGUF's weights by class name, with no hook for other
backends; `register` therefore wraps its two helpers, for `QuantizedLinear` only:
`_calculate_module_shape` answers [out_features, in_features], and a layer that
really is expanded is first dequantized (it becomes a 16-bit linear, which the runtime
sees as a module change and runs eagerly). Every other module goes to diffusers' own
code unchanged.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from qcompile.modules import QuantizedLinear

logger = logging.getLogger(__name__)

_WRAPPED = "__qcompile_wrapped__"


def _quantized_base(
    model: nn.Module, base_module, base_weight_param_name
) -> QuantizedLinear | None:
    module = base_module
    if module is None and isinstance(base_weight_param_name, str):
        fqn = base_weight_param_name.rsplit(".weight", 1)[0]
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            return None
    return module if isinstance(module, QuantizedLinear) else None


def _wrap_module_shape(original):
    @functools.wraps(original)
    def calculate_module_shape(model, base_module=None, base_weight_param_name=None):
        layer = _quantized_base(model, base_module, base_weight_param_name)
        if layer is not None:
            return torch.Size((layer.out_features, layer.in_features))
        return original(model, base_module, base_weight_param_name)

    setattr(calculate_module_shape, _WRAPPED, True)
    return staticmethod(calculate_module_shape)


def _wrap_dequantize(original):
    @functools.wraps(original)
    def dequantize_for_expanded_lora(model, module):
        if isinstance(module, QuantizedLinear):
            logger.warning(
                "a LoRA expands the quantized layer %r: it becomes a 16-bit linear", module
            )
            return module.dequantized_weight().to(model.dtype)
        return original(model, module)

    setattr(dequantize_for_expanded_lora, _WRAPPED, True)
    return dequantize_for_expanded_lora


def patch_lora_loaders() -> None:
    """Wrap diffusers' LoRA-loader shape helpers (once; a no-op if they are absent)."""
    try:
        from diffusers.loaders import lora_pipeline
    except ImportError:  # a diffusers without LoRA loaders, or without peft support
        return
    for cls in list(vars(lora_pipeline).values()):
        helper = vars(cls).get("_calculate_module_shape") if isinstance(cls, type) else None
        if isinstance(helper, staticmethod) and not hasattr(helper.__func__, _WRAPPED):
            cls._calculate_module_shape = _wrap_module_shape(helper.__func__)
    name = "_maybe_dequantize_weight_for_expanded_lora"
    original = getattr(lora_pipeline, name, None)
    if callable(original) and not hasattr(original, _WRAPPED):
        setattr(lora_pipeline, name, _wrap_dequantize(original))
