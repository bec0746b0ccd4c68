"""qcompile's diffusers quantizer: reload pre-quantized folders, quantize on load.

Registered under "qcompile" in diffusers' auto mappings by `import qcompile`.

Pre-quantized: the meta-built model gets a `QuantizedLinear` (meta buffers with the
packed shapes and dtypes) for every layer of the config; packed tensors then load
straight into it, never through a float copy and never cast to `torch_dtype`; each is
checked against its scheme and against the CRC32 recorded at save time. Afterwards the
lowered program (`qcompile_program.pt2`) is re-attached.

Quantize-on-load: the model keeps its float `nn.Linear`s (so diffusers casts incoming
weights to the right float dtype, not to int8 zeros); each selected weight is quantized
the moment it is read and its module swapped, so only one float weight is alive at a
time. The quantized model is then captured with torch.export — its linears already call
the `qcompile::` ops, so the program equals what lowering produces.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from qcompile.checkpoint import read_checksums, verify_tensor
from qcompile.errors import CheckpointError, QCompileError, RecipeError, WeightError
from qcompile.integrations.diffusers_config import (
    PROGRAM_NAME,
    QCompileConfig,
    QCompileMethod,
    not_convert_globs,
    unmatched_names,
)
from qcompile.integrations.diffusers_lora import patch_lora_loaders
from qcompile.memory import release_freed_memory
from qcompile.modules import QuantizedLinear, is_float_linear
from qcompile.recipes import LayerScheme
from qcompile.schemes import FLOAT_TENSORS, tensor_names
from qcompile.svdquant import empty_layer, quantize_layer, split_layer

logger = logging.getLogger(__name__)


class QCompileQuantizer(DiffusersQuantizer):
    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: QCompileConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[Path] = []
        self.checksums: dict[str, tuple[Path, int]] = {}
        self.selected: dict[str, LayerScheme] = {}

    # ------------------------------------------------------------ environment
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized and not config.layers:
            raise CheckpointError("config.json quantization_config lists no quantized layers")
        if not self.pre_quantized and config.recipe.needs_calibration:
            raise RecipeError(
                f"recipe {config.recipe.name!r} has static activation scales or smoothing, "
                "which need calibration: quantize-on-load cannot take it. Use a weight-only "
                "or dynamic recipe (e.g. 'fp8-dynamic', 'nvfp4', 'svdq-w4a16'), or "
                "qcompile.quantize(model, recipe, calibration=...) and save the result"
            )

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype the model loads in, which diffusers also records as the config's
        `_pre_quantization_dtype`: the one asked for, else the one the checkpoint was
        saved in, else float32 (what diffusers builds a model in without torch_dtype)."""
        if torch_dtype is not None:
            return torch_dtype
        recorded = self.quantization_config.dtype
        return getattr(torch, recorded) if recorded else torch.float32

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list) -> list:
        self.checkpoint_files = [Path(f) for f in checkpoint_files if isinstance(f, (str, Path))]
        if self.pre_quantized:
            for path in self.checkpoint_files:
                if path.suffix == ".safetensors":
                    self.checksums.update({k: (path, v) for k, v in read_checksums(path).items()})
        return loaded_keys

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        for name, tensor in state_dict.items():
            if name in self.checksums:
                path, crc = self.checksums[name]
                verify_tensor(path, name, tensor, {name: crc})
        return state_dict

    # ------------------------------------------------------------ skeleton
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:
            for fqn, scheme in config.layers.items():
                linear = _linear_at(model, fqn, self._where())
                tensors = empty_layer(
                    scheme, linear.out_features, linear.in_features, linear.weight.dtype
                )
                _replace(
                    model,
                    fqn,
                    QuantizedLinear(
                        linear.in_features, linear.out_features, scheme, tensors, linear.bias
                    ),
                )
            return
        from qcompile.api import select_linears

        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        unmatched = unmatched_names(config.modules_to_not_convert, linears)
        if unmatched:
            raise QCompileError(
                f"modules_to_not_convert names {unmatched}, which occur in none of "
                f"{type(model).__name__}'s {len(linears)} linear layer names (an entry "
                "keeps every linear whose dotted name contains it): fix or drop them"
            )
        # The model class's _keep_in_fp32_modules (what diffusers passes as
        # keep_in_fp32_modules) are excluded by select_linears itself, as in `quantize`.
        skips = not_convert_globs(config.modules_to_not_convert)
        if skips:  # recorded in the recipe, so the checkpoint says what stayed 16-bit
            excludes = tuple(dict.fromkeys((*config.recipe.exclude, *skips)))  # no repeats
            config.recipe = config.recipe.replace(exclude=excludes)
        self.selected = select_linears(model, config.recipe)

    def check_if_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        state_dict: dict,
        **kwargs: Any,
    ) -> bool:
        owner, _, attr = param_name.rpartition(".")
        if self.pre_quantized:
            scheme = self.quantization_config.layers.get(owner)
            return scheme is not None and attr in tensor_names(scheme)
        return owner in self.selected and attr == "weight"

    def check_quantized_param_shape(self, param_name: str, current: Any, loaded: Any) -> bool:
        raise CheckpointError(
            f"{self._where()}: tensor {param_name!r} has shape {list(loaded.shape)}, its "
            f"layer's scheme expects {list(current.shape)}"
        )

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: Any,
        state_dict: dict,
        unexpected_keys: Any = None,
        **kwargs: Any,
    ) -> None:
        owner, _, attr = param_name.rpartition(".")
        module = model.get_submodule(owner)
        if self.pre_quantized:
            # diffusers has already cast float tensors (our float32 scales) to torch_dtype;
            # the shard's own state_dict still holds them as saved. The 16-bit branch is
            # the exception: it follows the model's dtype, like the bias.
            expected = module._buffers[attr]
            if attr in FLOAT_TENSORS:
                param_value = param_value.to(expected.dtype)
            else:
                param_value = state_dict.get(param_name, param_value)
            if param_value.dtype != expected.dtype or param_value.shape != expected.shape:
                raise CheckpointError(
                    f"{self._where()}: tensor {param_name!r} is {param_value.dtype}"
                    f"{list(param_value.shape)}, but scheme "
                    f"{module.scheme.weight.format.value} expects {expected.dtype}"
                    f"{list(expected.shape)}"
                )
            module._buffers[attr] = param_value.to(target_device)
            return
        scheme = self.selected[owner]
        weight = param_value.to(target_device)
        if not torch.isfinite(weight).all():
            raise WeightError(f"{param_name} contains NaN or Inf; fix the checkpoint")
        with torch.no_grad():
            tensors = quantize_layer(split_layer(weight, scheme), scheme)
        _replace(
            model,
            owner,
            QuantizedLinear(module.in_features, module.out_features, scheme, tensors, module.bias),
        )
        del weight, param_value
        release_freed_memory()  # see qcompile.memory: otherwise the float temporaries stay

    # ------------------------------------------------------------ finish
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        from qcompile.api import attach_loaded

        missing = [
            f"{name}.{attr}"
            for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear)
            for attr, tensor in module.quantized_tensors.items()
            if tensor.is_meta
        ]
        if missing:
            raise CheckpointError(
                f"{self._where()}: the checkpoint lacks quantized tensors {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}"
            )
        if not self.pre_quantized:
            unloaded = [fqn for fqn in self.selected if is_float_linear(model.get_submodule(fqn))]
            if unloaded:
                raise CheckpointError(f"{self._where()}: no weight was loaded for {unloaded[:8]}")
        program = None
        if self.pre_quantized and self.checkpoint_files:
            name = self.quantization_config.program or PROGRAM_NAME
            path = self.checkpoint_files[0].parent / name
            if path.exists():
                program = path
            else:
                logger.warning("%s is missing; capturing the model again", path)
        attach_loaded(model, self.quantization_config, self, program)

    def _dequantize(self, model: nn.Module) -> nn.Module:
        from qcompile.api import dequantize

        return dequantize(model)

    def _where(self) -> str:
        return str(self.checkpoint_files[0]) if self.checkpoint_files else "checkpoint"

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _linear_at(model: nn.Module, fqn: str, where: str) -> nn.Linear:
    try:
        linear = model.get_submodule(fqn)
    except AttributeError:
        linear = None
    if not is_float_linear(linear):
        raise CheckpointError(
            f"{where}: quantization_config lists layer {fqn!r}, which "
            f"{type(model).__name__} has no nn.Linear named"
        )
    return linear


def _replace(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class TransformersSideConfig:
    """What `PipelineQuantizationConfig(quant_backend="qcompile")` finds on the
    transformers side. diffusers checks that a backend exists in both libraries with
    one `__init__` signature; qcompile quantizes diffusers models only, so building it
    (for a text encoder) is a clear error naming the fix."""

    @functools.wraps(QCompileConfig.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "qcompile quantizes diffusers models (transformer, unet), not transformers "
            "models such as text encoders: pass PipelineQuantizationConfig(quant_backend="
            '"qcompile", quant_kwargs={...}, components_to_quantize=["transformer"])'
        )


def register() -> None:
    """Make diffusers dispatch quant_method "qcompile" to this quantizer, let
    `PipelineQuantizationConfig(quant_backend="qcompile")` find it, and let its LoRA
    loaders read a packed layer's logical shape (`diffusers_lora`)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QCompileMethod.QCOMPILE.value] = QCompileQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QCompileMethod.QCOMPILE.value] = QCompileConfig
    patch_lora_loaders()
    if importlib.util.find_spec("transformers") is not None:
        from transformers.quantizers import auto as transformers_auto

        mapping = transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING
        mapping.setdefault(QCompileMethod.QCOMPILE.value, TransformersSideConfig)
