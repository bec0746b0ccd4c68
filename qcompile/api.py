"""`quantize`: capture → annotate → quantize → lower → attach, on a diffusers model.

Also the pieces the diffusers quantizer shares: `attach` (runtime, state, diffusers
marks), `attach_loaded`, `select_linears` and `dequantize`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.calibration import as_calibration_set
from qcompile.capture import Capture, capture, example_inputs_of
from qcompile.checkpoint import align_cpu_tensors
from qcompile.errors import CaptureError, NoLinearSelectedError, QCompileError, RecipeError
from qcompile.families import ModelFamily, detect_family, keep_in_fp32_globs
from qcompile.matcher import CallMatcher
from qcompile.modules import QuantizedLinear, is_float_linear
from qcompile.offload import (
    Offloaded,
    detach_offload,
    finish_capture,
    load_linear_weights,
    materialize,
    on_meta,
    to_meta,
)
from qcompile.passes import (
    annotate_linears,
    fold_lowrank,
    lower_linears,
    quantize_weights,
    smooth,
)
from qcompile.passes.observe_activations import observe_activations
from qcompile.presets import check_recipe_fits
from qcompile.recipes import LayerScheme, Recipe, resolve_recipe
from qcompile.runtime import GraphRuntime, runtime_of
from qcompile.schemes import QuantizedWeight

logger = logging.getLogger(__name__)

STATE_ATTR = "qcompile_state"


@dataclass
class QuantizationState:
    """What qcompile did to a module, kept on it as `module.qcompile_state`."""

    recipe: Recipe
    family: str | None
    schemes: dict[str, LayerScheme]  # linear FQN → scheme
    linears_total: int
    runtime: GraphRuntime | None  # None: eager only (no program could be captured)


def quantize(
    module: nn.Module,
    recipe: str | Recipe,
    calibration: Iterable[dict[str, Any]] | str | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
    skip_nonfinite: bool = False,
) -> nn.Module:
    """Quantize `module` in place and return it (same object: class, config, dtype, device).

    `recipe` is a preset name (see `list_recipes()`) or a `Recipe`. Example inputs for
    the capture are synthesized for Flux, SD3 and UNet2DCondition models; any other
    model needs `example_inputs` (a kwargs dict for its forward, batch and token counts
    ≥ 2) or `calibration` (an iterable of such dicts; the first one is used).

    `calibration` — a `CalibrationSet` from `capture_calibration`, a list of forward
    kwargs dicts, or a saved set's path — is required by recipes with static activation
    scales (int8-w8a8, fp8-w8a8) or smoothing (svdq-w4a4, svdq-nvfp4). NaN/Inf in it
    is an error naming the sample and input, or, with `skip_nonfinite=True`, such
    samples are dropped with a warning.
    """
    recipe = resolve_recipe(recipe)
    if not isinstance(module, nn.Module):
        raise QCompileError(f"quantize expects a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, STATE_ATTR, None) is not None:
        raise QCompileError(
            f"{type(module).__name__} is already quantized with "
            f"{module.qcompile_state.recipe.name!r}; quantize the float model instead"
        )
    _refuse_adapters(module)
    family = detect_family(module)
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    check_recipe_fits(recipe, type(module).__name__, family, linears)
    samples = None
    if calibration is not None:
        samples = as_calibration_set(calibration).check_finite(skip_nonfinite)
    elif recipe.needs_calibration:
        raise RecipeError(
            f"recipe {recipe.name!r} has static activation scales or smoothing, which "
            "come from calibration data: pass calibration= (see "
            "qcompile.capture_calibration) or use a preset without them such as "
            "'fp8-dynamic', 'nvfp4' or 'svdq-w4a16'"
        )
    if example_inputs is None and samples is not None and family is None:
        example_inputs = samples.samples[0]
    module.eval().requires_grad_(False)
    offloaded = detach_offload(module)  # accelerate keeps the weights elsewhere
    # Before observation: the scales calibrated from a from_pretrained model (weights
    # mmap'd misaligned) differed in the last bit from those of the same weights
    # loaded otherwise (offloaded, or in memory).
    align_cpu_tensors(module)
    try:
        load = offloaded.load if offloaded is not None else None
        captured = _capture(module, family, example_inputs, offloaded)
        # Built once (it unlifts the whole program): lowering leaves the user inputs and
        # torch.export's guards alone, so it serves observation and the runtime alike.
        matcher = CallMatcher(captured) if captured is not None and samples is not None else None
        if matcher is not None and example_inputs is None:
            reason = matcher.match((), dict(samples.samples[0]))
            if isinstance(reason, str):  # the pipeline calls differently than synthesized
                logger.info("capturing from the first calibration sample (%s)", reason)
                captured = _capture(module, None, samples.samples[0], offloaded)
                matcher = CallMatcher(captured)
        if captured is None:
            raise CaptureError(
                f"qcompile cannot synthesize inputs for {type(module).__name__}; pass "
                "example_inputs={...} (the keyword arguments of one real forward call, "
                "batch and token counts >= 2)"
            )
        program = captured.program
        excludes = _excludes(module, family, recipe)
        schemes = annotate_linears(program, recipe, excludes)
        input_scales = None
        if recipe.needs_calibration:
            search = recipe.smooth is not None and bool(recipe.smooth.search)
            input_scales, stats = observe_activations(program, samples, matcher, load, search)
            if recipe.smooth is not None:
                load_linear_weights(program, schemes, offloaded)
                smooth(program, stats, recipe.smooth)
        if recipe.rank:
            load_linear_weights(program, schemes, offloaded)
            fold_lowrank(program)
        packed = quantize_weights(program, input_scales, load)
        lower_linears(program, packed)
    except BaseException:  # nothing swapped yet: the offloaded model is put back as it was
        if offloaded is not None:
            offloaded.restore()
        raise
    _swap_linears(module, schemes, packed)
    if offloaded is not None:
        materialize(module, offloaded)  # biases, norms, embeddings: the rest is small
    attach(module, captured, recipe, schemes, family, matcher=matcher)
    return module


def _refuse_adapters(module: nn.Module) -> None:
    """LoRA adapters already in the model would be baked into the quantized graph as it
    is at capture time; load them after quantizing instead (they then stay live)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    layers = [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    if layers:
        raise QCompileError(
            f"{type(module).__name__} has LoRA adapters ({layers[0]}, ...): quantize the "
            "base model and load the adapters after, or fuse them first "
            "(pipe.fuse_lora(); pipe.unload_lora_weights()) to quantize them in"
        )


def _capture(
    module: nn.Module,
    family: ModelFamily | None,
    example_inputs: dict[str, Any] | None,
    offloaded: Offloaded | None = None,
) -> Capture | None:
    if example_inputs is None and family is None:
        return None
    if offloaded is not None:  # captured on meta, then pointed at the execution device
        with on_meta(module):
            meta_inputs = to_meta(example_inputs) if example_inputs is not None else None
            captured = _capture(module, family, meta_inputs)
        finish_capture(captured.program, module, offloaded.device)
        return captured
    if example_inputs is not None:
        return capture(module, example_inputs)
    param = next(module.parameters())
    inputs = family.example_inputs(module, param.device, param.dtype)
    return capture(module, inputs, family.dynamic_shapes(inputs))


def _swap_linears(
    module: nn.Module, schemes: dict[str, LayerScheme], packed: dict[str, QuantizedWeight]
) -> None:
    """Replace each quantized nn.Linear by a QuantizedLinear holding the packed tensors."""
    for fqn, tensors in packed.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantized = QuantizedLinear(
            linear.in_features, linear.out_features, schemes[fqn], tensors, linear.bias
        )
        setattr(parent, child, quantized)


def _excludes(module: nn.Module, family, recipe: Recipe) -> tuple[str, ...]:
    """Globs of linears left 16-bit beyond the recipe's own: the family's (unless the
    recipe opts out) and the model class's `_keep_in_fp32_modules`, as diffusers'
    quantizers honour it."""
    excludes = family.default_excludes if family is not None and recipe.family_excludes else ()
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    return tuple(dict.fromkeys((*excludes, *keep_in_fp32_globs(list(keep)))))


def select_linears(module: nn.Module, recipe: Recipe) -> dict[str, LayerScheme]:
    """The nn.Linear modules `recipe` selects (family excludes applied), by FQN."""
    family = detect_family(module)
    excludes = _excludes(module, family, recipe)
    linears = [n for n, m in module.named_modules() if is_float_linear(m)]
    check_recipe_fits(recipe, type(module).__name__, family, linears)
    selected = {
        n: recipe.scheme_for(m.out_features, m.in_features)
        for n, m in module.named_modules()
        if is_float_linear(m) and recipe.selects(n, excludes)
    }
    if not selected:
        raise NoLinearSelectedError(
            f"recipe {recipe.name!r} selects none of {type(module).__name__}'s "
            f"{len(linears)} linear layers; widen `include` or narrow `exclude`"
        )
    return selected


def _count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())  # quantized or not


def attach(
    module: nn.Module,
    captured: Capture | None,
    recipe: Recipe,
    schemes: dict[str, LayerScheme],
    family: ModelFamily | None,
    hf_quantizer: Any = None,
    matcher: CallMatcher | None = None,
) -> None:
    """Install the graph runtime and qcompile's state on a module with quantized linears."""
    align_cpu_tensors(module)  # so that it computes bit for bit as its reload will
    runtime = None
    if captured is not None:
        runtime = GraphRuntime(module, captured, matcher)
        module.forward = runtime
    family_name = family.name if family else None
    state = QuantizationState(recipe, family_name, schemes, _count_linears(module), runtime)
    setattr(module, STATE_ATTR, state)
    if hasattr(module, "register_to_config"):
        _mark_diffusers(module, captured, state, hf_quantizer)
    logger.info(
        "quantized %d of %d linears of %s with %s",
        len(schemes),
        state.linears_total,
        type(module).__name__,
        recipe.name,
    )


def _mark_diffusers(module: nn.Module, captured: Capture | None, state, hf_quantizer) -> None:
    """Make the model look like any diffusers-quantized model, saved the qcompile way."""
    from qcompile.checkpoint import save
    from qcompile.integrations.diffusers import QCompileQuantizer
    from qcompile.integrations.diffusers_config import PROGRAM_NAME, QCompileConfig

    config = hf_quantizer.quantization_config if hf_quantizer else QCompileConfig(state.recipe)
    config.layers = dict(state.schemes)
    config.family = state.family
    config.dtype = str(module.dtype).removeprefix("torch.")
    config.program = PROGRAM_NAME if state.runtime is not None else None
    if state.runtime is not None:
        state.runtime.compile = config.compile
    if captured is not None and captured.output_type is not None:
        cls = captured.output_type
        config.output = {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "fields": list(captured.output_fields),
        }
    if hf_quantizer is None:
        hf_quantizer = QCompileQuantizer(config, pre_quantized=True)
    module.register_to_config(quantization_config=config)
    if module.config.get("_pre_quantization_dtype") is None:  # as from_pretrained records it
        module.register_to_config(_pre_quantization_dtype=module.dtype)
    module.hf_quantizer = hf_quantizer
    module.is_quantized = True
    module.quantization_method = config.quant_method
    module.save_pretrained = functools.partial(save, module)
    module.num_parameters = functools.partial(num_parameters, module)
    module.to = functools.partial(_to, module)


def _to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """diffusers' `ModelMixin.to`, except that a "cast" to the dtype the model already
    has is a move, not an error (`pipe.to("cuda", torch.bfloat16)` on a bf16 pipeline).
    A real cast stays refused, as diffusers refuses it for every quantized model,
    except from `DiffusionPipeline.to`, which casts the components before this one
    first: refusing there would leave the pipeline half-cast. There, as diffusers does
    for bitsandbytes, the model keeps its dtype with a warning, and its runtime casts
    floating inputs to it and outputs back (`GraphRuntime.io_dtype`)."""
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    runtime = runtime_of(module)
    from_pipeline = dtype is not None and _called_by_pipeline_to(inspect.currentframe())
    if dtype is not None and dtype != module.dtype:
        if not from_pipeline or runtime is None:
            raise ValueError(
                f"casting a qcompile-quantized {type(module).__name__} from {module.dtype} "
                f"to {dtype} is unsupported (its weights are packed and its graph is "
                f"{module.dtype}): load it with torch_dtype={dtype} or quantize a {dtype} "
                "model; in a pipeline, cast the other components one by one "
                "(pipe.vae.to(dtype), ...)"
            )
        logger.warning(
            "%s is qcompile-quantized in %s and keeps that dtype; the pipeline's other "
            "components are cast to %s, and the model's inputs and outputs are cast at its "
            "boundary. For a %s model, load it with torch_dtype=%s or quantize a %s model.",
            type(module).__name__,
            module.dtype,
            dtype,
            dtype,
            dtype,
            dtype,
        )
        runtime.io_dtype = dtype
    elif from_pipeline and runtime is not None:
        runtime.io_dtype = None  # the pipeline is back at the model's own dtype
    if device is None:
        return module
    return type(module).to(module, device, non_blocking=non_blocking)


def _called_by_pipeline_to(frame) -> bool:
    """Whether the caller of `_to` is diffusers' `DiffusionPipeline.to`."""
    caller = frame.f_back if frame is not None else None
    if caller is None or caller.f_code.co_name != "to":
        return False
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(caller.f_locals.get("self"), DiffusionPipeline)


def num_parameters(
    module: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False
) -> int:
    """diffusers' `num_parameters`, counting each quantized weight as the N×K float
    weight it stands for (it is a packed buffer, frozen): the float model's count."""
    count = type(module).num_parameters(module, only_trainable, exclude_embeddings)
    if only_trainable:
        return count
    return count + sum(
        m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantizedLinear)
    )


def attach_loaded(model: nn.Module, config, hf_quantizer, program_path: Path | None) -> None:
    """Finish a model diffusers loaded through QCompileQuantizer: program, runtime, state."""
    from qcompile.pt2 import check_program_fits, load_program

    family = detect_family(model)
    model.eval().requires_grad_(False)
    schemes = {n: m.scheme for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    program = None
    if program_path is not None:
        program = load_program(program_path)
        check_program_fits(program, model, program_path)
    saved_dtype = getattr(torch, config.dtype or "", None)
    if program is not None and saved_dtype is not None and saved_dtype != model.dtype:
        # The graph was traced in the saved dtype: its casts (a norm's float32 upcast,
        # which a float32 trace never records) are that dtype's. Trace the model again
        # in the one it loaded in, from inputs shaped like the saved program's.
        logger.info(
            "%s: saved in %s, loaded in %s: capturing its graph again",
            type(model).__name__,
            saved_dtype,
            model.dtype,
        )
        captured = _recapture(model, program, family, saved_dtype)
    elif program is not None:
        captured = Capture(
            program=program,
            signature=inspect.signature(model.forward),
            input_names=_kwarg_names(program.call_spec.in_spec),
            output_type=_output_class(config.output),
            output_fields=tuple((config.output or {}).get("fields", ())),
            seconds=0.0,
        )
    else:
        captured = _capture(model, family, None)
        if captured is None:
            logger.warning(
                "%s: no lowered program and no way to synthesize inputs; running eagerly",
                type(model).__name__,
            )
    attach(model, captured, config.recipe, schemes, family, hf_quantizer)


def _recapture(
    model: nn.Module, program, family: ModelFamily | None, saved_dtype: torch.dtype
) -> Capture | None:
    """`model` captured again like `program` was, in the model's dtype (a known
    family's inputs in the dtypes its pipeline passes: Flux's guidance stays float32);
    None (eager only, with a warning) when torch.export cannot."""
    device, dtypes = next(model.parameters()).device, None
    if family is not None:
        synthesized = family.example_inputs(model, device, model.dtype)
        dtypes = {k: v.dtype for k, v in synthesized.items() if isinstance(v, torch.Tensor)}
    inputs, shapes = example_inputs_of(program, model.dtype, device, dtypes)
    try:
        return capture(model, inputs, shapes)
    except CaptureError as exc:
        logger.warning(
            "%s: could not capture the graph again in %s, so calls run the eager "
            "fallback; load it with torch_dtype=%s to use the saved graph (%s)",
            type(model).__name__,
            model.dtype,
            str(saved_dtype).removeprefix("torch."),
            exc,
        )
        return None


def _kwarg_names(in_spec) -> tuple[str, ...]:
    """Names of the keyword arguments in an export in_spec ((args, kwargs))."""
    kwargs = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
    return tuple(kwargs.context)


def _output_class(output: dict | None) -> type | None:
    """Import the recorded output class; only diffusers BaseOutput subclasses qualify."""
    if not output or "class" not in output:
        return None
    from diffusers.utils import BaseOutput

    module_name, _, name = output["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseOutput)):
        logger.warning("ignoring unknown output class %r", output["class"])
        return None
    return cls


def dequantize(module: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear by a float nn.Linear; drop the graph runtime."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    for name, child in list(module.named_modules()):
        if not isinstance(child, QuantizedLinear):
            continue
        weight = child.dequantized_weight()
        linear = nn.Linear(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if child.bias is not None:
                linear.bias.copy_(child.bias)
        linear.requires_grad_(False)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, linear)
    for attr in ("forward", "save_pretrained", "num_parameters", "to", STATE_ATTR):
        module.__dict__.pop(attr, None)
    if hasattr(module, "register_to_config"):
        config = dict(module.config)
        config.pop("quantization_config", None)
        from diffusers.configuration_utils import FrozenDict

        module._internal_dict = FrozenDict(config)
    return module


def is_quantized(module: nn.Module) -> bool:
    return getattr(module, STATE_ATTR, None) is not None


__all__ = ["QuantizationState", "dequantize", "is_quantized", "quantize", "runtime_of"]
