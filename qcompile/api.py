"""`quantize`: capture → annotate → quantize → lower → attach, on a diffusers model."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qcompile.capture import capture
from qcompile.errors import CaptureError, QCompileError
from qcompile.families import detect_family
from qcompile.modules import QuantizedLinear
from qcompile.passes import annotate_linears, lower_linears, quantize_weights
from qcompile.passes.annotate_linears import linear_nodes
from qcompile.recipes import LayerScheme, Recipe, resolve_recipe
from qcompile.runtime import GraphRuntime, runtime_of
from qcompile.schemes import QuantizedWeight

logger = logging.getLogger(__name__)

STATE_ATTR = "qcompile_state"


@dataclass
class QuantizationState:
    """What `quantize` did to a module, kept on it as `module.qcompile_state`."""

    recipe: Recipe
    family: str | None
    schemes: dict[str, LayerScheme]  # linear FQN → scheme
    linears_total: int
    runtime: GraphRuntime


def quantize(
    module: nn.Module,
    recipe: str | Recipe,
    calibration: Iterable[dict[str, Any]] | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
) -> nn.Module:
    """Quantize `module` in place and return it (same object: class, config, dtype, device).

    `recipe` is a preset name (see `list_recipes()`) or a `Recipe`. Example inputs for
    the capture are synthesized for Flux, SD3 and UNet2DCondition models; any other
    model needs `example_inputs` (a kwargs dict for its forward, batch and token counts
    ≥ 2) or `calibration` (an iterable of such dicts; the first one is used).
    """
    recipe = resolve_recipe(recipe)
    if not isinstance(module, nn.Module):
        raise QCompileError(f"quantize expects a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, STATE_ATTR, None) is not None:
        raise QCompileError(
            f"{type(module).__name__} is already quantized with "
            f"{module.qcompile_state.recipe.name!r}; quantize the float model instead"
        )
    family = detect_family(module)
    dynamic_shapes = None
    if example_inputs is None and calibration is not None:
        example_inputs = next(iter(calibration), None)
        if example_inputs is None:
            raise QCompileError("calibration is empty; pass at least one sample")
    if example_inputs is None:
        if family is None:
            raise CaptureError(
                f"qcompile cannot synthesize inputs for {type(module).__name__}; pass "
                "example_inputs={...} (the keyword arguments of one real forward call, "
                "batch and token counts >= 2)"
            )
        param = next(module.parameters())
        example_inputs = family.example_inputs(module, param.device, param.dtype)
        dynamic_shapes = family.dynamic_shapes(example_inputs)

    module.eval().requires_grad_(False)
    captured = capture(module, example_inputs, dynamic_shapes)
    program = captured.program
    excludes = family.default_excludes if family is not None and recipe.family_excludes else ()
    linears_total = len(set(linear_nodes(program).values()))
    schemes = annotate_linears(program, recipe, excludes)
    packed = quantize_weights(program)
    lower_linears(program, packed)
    _swap_linears(module, schemes, packed)
    runtime = GraphRuntime(module, captured)
    module.forward = runtime
    setattr(
        module,
        STATE_ATTR,
        QuantizationState(recipe, family.name if family else None, schemes, linears_total, runtime),
    )
    logger.info(
        "quantized %d of %d linears of %s with %s",
        len(schemes),
        linears_total,
        type(module).__name__,
        recipe.name,
    )
    return module


def _swap_linears(
    module: nn.Module, schemes: dict[str, LayerScheme], packed: dict[str, QuantizedWeight]
) -> None:
    """Replace each quantized nn.Linear by a QuantizedLinear holding the packed tensors."""
    for fqn, tensors in packed.items():
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(
            parent,
            child,
            QuantizedLinear(
                linear.in_features, linear.out_features, schemes[fqn], tensors, linear.bias
            ),
        )


def is_quantized(module: nn.Module) -> bool:
    return runtime_of(module) is not None
