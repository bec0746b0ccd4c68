"""qcompile: a graph-level quantization compiler for diffusion models.

Public API (everything else is internal and may change):

    quantize(module, recipe, calibration=None, *, example_inputs=None) -> module
    Recipe, WeightSpec, ActivationSpec, LayerScheme, WeightFormat, Granularity,
    ActivationMode, list_recipes, get_recipe
    runtime_of(module)  — the graph runtime of a quantized module (path statistics)
    sqnr, weight_bytes  — measures
    QCompileError and its subclasses
"""

from qcompile import kernels as _kernels  # noqa: F401 - registers the qcompile:: ops
from qcompile.api import QuantizationState, is_quantized, quantize
from qcompile.errors import (
    CaptureError,
    NoLinearSelectedError,
    QCompileError,
    RecipeError,
    WeightError,
)
from qcompile.metrics import sqnr, weight_bytes
from qcompile.recipes import (
    ActivationMode,
    ActivationSpec,
    Granularity,
    LayerScheme,
    Recipe,
    WeightFormat,
    WeightSpec,
    list_recipes,
    resolve_recipe,
)
from qcompile.runtime import runtime_of

get_recipe = resolve_recipe

__all__ = [
    # recipes
    "ActivationMode",
    "ActivationSpec",
    # errors
    "CaptureError",
    "Granularity",
    "LayerScheme",
    "NoLinearSelectedError",
    "QCompileError",
    # quantization
    "QuantizationState",
    "Recipe",
    "RecipeError",
    "WeightError",
    "WeightFormat",
    "WeightSpec",
    "get_recipe",
    "is_quantized",
    "list_recipes",
    "quantize",
    "resolve_recipe",
    "runtime_of",
    # measures
    "sqnr",
    "weight_bytes",
]
