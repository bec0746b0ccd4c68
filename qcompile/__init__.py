"""qcompile: a graph-level quantization compiler for diffusion models.

Public API (everything else is internal and may change):

    quantize(module, recipe, calibration=None, *, example_inputs=None,
             skip_nonfinite=False) -> module
    capture_calibration(pipe, module, prompts, ...) -> CalibrationSet
    CALIBRATION_PROMPTS, load_prompts(path) — built-in prompts, prompt files
    save(module, dir), load(dir) -> ExportedProgram, dequantize(module)
    QCompileConfig — for from_pretrained(quantization_config=...) and pipelines
    Recipe, WeightSpec, ActivationSpec, LayerScheme, WeightFormat, ActivationFormat,
    Granularity, ActivationMode, Observer, SmoothSpec, list_recipes, get_recipe
    runtime_of(module)  — the graph runtime of a quantized module (path statistics)
    sqnr, weight_bytes  — measures
    QCompileError and its subclasses
"""

from qcompile import _checkout  # noqa: F401 - first: maps qcompile.kernels in a checkout
from qcompile import presets as _presets  # noqa: F401 - registers the named recipes
from qcompile.api import QuantizationState, dequantize, is_quantized, quantize
from qcompile.calibration import CalibrationError, CalibrationSet, capture_calibration
from qcompile.checkpoint import load, save
from qcompile.errors import (
    CaptureError,
    CheckpointError,
    NoLinearSelectedError,
    QCompileError,
    RecipeError,
    WeightError,
)
from qcompile.integrations.diffusers import QCompileQuantizer, register
from qcompile.integrations.diffusers_config import QCompileConfig
from qcompile.kernels import cuda as _cuda  # noqa: F401 - the ops' Triton kernels for CUDA
from qcompile.metrics import sqnr, weight_bytes
from qcompile.prompts import CALIBRATION_PROMPTS, load_prompts
from qcompile.recipes import (
    ActivationFormat,
    ActivationMode,
    ActivationSpec,
    Granularity,
    LayerScheme,
    Observer,
    Recipe,
    SmoothSpec,
    WeightFormat,
    WeightSpec,
    list_recipes,
    resolve_recipe,
)
from qcompile.runtime import runtime_of

register()  # diffusers' from_pretrained now dispatches quant_method "qcompile" here

get_recipe = resolve_recipe

__all__ = [  # noqa: RUF022 - grouped by concern
    # quantization
    "QuantizationState",
    "dequantize",
    "is_quantized",
    "quantize",
    "runtime_of",
    # calibration
    "CALIBRATION_PROMPTS",
    "CalibrationSet",
    "capture_calibration",
    "load_prompts",
    # checkpoints and diffusers
    "QCompileConfig",
    "QCompileQuantizer",
    "load",
    "save",
    # recipes
    "ActivationFormat",
    "ActivationMode",
    "ActivationSpec",
    "Granularity",
    "LayerScheme",
    "Observer",
    "Recipe",
    "SmoothSpec",
    "WeightFormat",
    "WeightSpec",
    "get_recipe",
    "list_recipes",
    "resolve_recipe",
    # measures
    "sqnr",
    "weight_bytes",
    # errors
    "CalibrationError",
    "CaptureError",
    "CheckpointError",
    "NoLinearSelectedError",
    "QCompileError",
    "RecipeError",
    "WeightError",
]
