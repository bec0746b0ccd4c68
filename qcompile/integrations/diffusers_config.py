"""`QCompileConfig`: the `quantization_config` of a qcompile checkpoint (format version 1).

In config.json it reads:

    {"quant_method": "qcompile", "format_version": 1, "recipe": {...}, "family": "flux",
     "dtype": "bfloat16", "program": "qcompile_program.pt2",
     "output": {"class": "diffusers.models.modeling_outputs.Transformer2DModelOutput",
                "fields": ["sample"]},
     "schemes": {"s0": {"weight": {...}, "activation": {...}}},
     "layers": {"transformer_blocks.0.attn.to_q": "s0", ...}}

Passed to `from_pretrained(quantization_config=QCompileConfig("int8-wo"))` it carries
only a recipe: the model is quantized as its weights stream in.
"""

from __future__ import annotations

import copy
import glob
import json
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from qcompile.errors import CheckpointError, QCompileError
from qcompile.recipes import LayerScheme, Recipe, resolve_recipe

FORMAT_VERSION = 1
PROGRAM_NAME = "qcompile_program.pt2"
_WHERE = "config.json quantization_config"


class QCompileMethod(str, Enum):
    QCOMPILE = "qcompile"


class QCompileConfig(QuantizationConfigMixin):
    """qcompile's diffusers quantization config; see the module docstring."""

    def __init__(
        self,
        recipe: str | Recipe | dict = "int8-wo",
        *,
        format_version: int = FORMAT_VERSION,
        family: str | None = None,
        dtype: str | None = None,
        program: str | None = None,
        output: dict[str, Any] | None = None,
        schemes: dict[str, dict] | None = None,
        layers: dict[str, str] | dict[str, LayerScheme] | None = None,
        modules_to_not_convert: list[str] | None = None,
        compile: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QCompileMethod.QCOMPILE
        kwargs.pop("quant_method", None)
        if kwargs:
            raise CheckpointError(f"{_WHERE}: unknown fields {sorted(kwargs)}")
        if not isinstance(format_version, int) or format_version < 1:
            raise CheckpointError(f"{_WHERE}: format_version must be a positive int")
        if format_version > FORMAT_VERSION:
            raise CheckpointError(
                f"{_WHERE}: format_version {format_version} is newer than this qcompile "
                f"reads ({FORMAT_VERSION}); upgrade qcompile"
            )
        self.format_version = format_version
        self.recipe = recipe if isinstance(recipe, Recipe) else _recipe(recipe)
        self.family = family
        self.dtype = dtype
        self.program = program
        self.output = output
        self.layers = _layers(layers, schemes)
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str)
            or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise QCompileError(
                f"modules_to_not_convert must be a list of module names, got "
                f"{modules_to_not_convert!r}"
            )
        # diffusers' standard kwarg: modules (by name) whose linears stay 16-bit; applied
        # as recipe excludes when the model is quantized on load (see not_convert_globs).
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        if compile is not None and not isinstance(compile, bool):
            raise QCompileError(f"compile must be True, False or None (auto), got {compile!r}")
        # Run the lowered graph through torch.compile(backend="qcompile"), compiled on
        # the first call: True, False, or None = on CUDA only. Saved with the checkpoint.
        self.compile = compile

    @property
    def pre_quantized(self) -> bool:
        return bool(self.layers)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        if not isinstance(config_dict, dict):
            raise CheckpointError(f"{_WHERE} must be a JSON object")
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "quant_method": self.quant_method.value,
            "format_version": self.format_version,
            "recipe": self.recipe.to_dict(),
        }
        for key in ("family", "dtype", "program", "output", "compile"):
            if getattr(self, key) is not None:
                out[key] = copy.deepcopy(getattr(self, key))
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.layers:
            ids: dict[LayerScheme, str] = {}
            for scheme in self.layers.values():
                ids.setdefault(scheme, f"s{len(ids)}")
            out["schemes"] = {sid: scheme.to_dict() for scheme, sid in ids.items()}
            out["layers"] = {fqn: ids[scheme] for fqn, scheme in self.layers.items()}
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields a default `QCompileConfig()` has alike (the
        method is always kept), as diffusers' configs do."""
        default = QCompileConfig().to_dict()
        out = self.to_dict()
        return {k: v for k, v in out.items() if k == "quant_method" or default.get(k) != v}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:  # diffusers' form: the class name, then the JSON
        return f"{type(self).__name__} {self.to_json_string()}"


def not_convert_globs(names: list[str]) -> tuple[str, ...]:
    """Excludes for diffusers' `modules_to_not_convert`: a linear stays 16-bit when one
    of `names` occurs anywhere in its dotted name, the rule diffusers' own quantizer
    tests check (`any(key in name ...)`): "proj_out" keeps the top-level `proj_out`
    and every `single_transformer_blocks.N.proj_out`, "transformer_blocks.0.attn"
    also `single_transformer_blocks.0.attn.*`, as bitsandbytes' `key + "." in name`
    does."""
    return tuple(f"*{glob.escape(name)}*" for name in names)


def unmatched_names(names: list[str], linears: list[str]) -> list[str]:
    """The `modules_to_not_convert` entries that occur in no linear layer's name."""
    return [name for name in names if not any(name in linear for linear in linears)]


def _recipe(value: Any) -> Recipe:
    if not isinstance(value, dict):  # a name the user wrote, not a saved config
        return resolve_recipe(value)
    try:
        return Recipe.from_dict(value)
    except QCompileError as exc:
        raise CheckpointError(f"{_WHERE}: recipe is invalid: {exc}") from exc


def _layers(layers: Any, schemes: Any) -> dict[str, LayerScheme]:
    if not layers:
        return {}
    if not isinstance(layers, dict):
        raise CheckpointError(f"{_WHERE}: layers must map layer names to scheme ids")
    if all(isinstance(v, LayerScheme) for v in layers.values()):
        return dict(layers)
    if not isinstance(schemes, dict):
        raise CheckpointError(f"{_WHERE}: layers given without a schemes table")
    try:
        table = {sid: LayerScheme.from_dict(spec) for sid, spec in schemes.items()}
    except (QCompileError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{_WHERE}: a scheme is invalid: {exc!r}") from exc
    unknown = sorted({sid for sid in layers.values() if sid not in table})
    if unknown:
        raise CheckpointError(f"{_WHERE}: layers name unknown scheme ids {unknown}")
    return {fqn: table[sid] for fqn, sid in layers.items()}
