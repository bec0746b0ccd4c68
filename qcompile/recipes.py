"""Recipes: which linear layers get which quantization scheme.

A recipe is a frozen, validated dataclass with a version and a JSON round trip. Named
presets are registered in a small registry; `resolve_recipe` turns a preset name or a
`Recipe` into a `Recipe` and lists the valid names when the name is unknown.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qcompile.errors import RecipeError

RECIPE_VERSION = 1
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64


class WeightFormat(str, Enum):
    INT8 = "int8"
    FP8_E4M3 = "fp8_e4m3"
    INT4 = "int4"


class Granularity(str, Enum):
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ActivationMode(str, Enum):
    NONE = "none"  # activations stay 16-bit (weight-only)


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is stored: format, scale granularity, group size (per-group only)."""

    format: WeightFormat
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", _enum(WeightFormat, self.format, "weight.format"))
        object.__setattr__(
            self, "granularity", _enum(Granularity, self.granularity, "weight.granularity")
        )
        if self.format is WeightFormat.INT4:
            if self.granularity is not Granularity.PER_GROUP:
                raise RecipeError("int4 weights need granularity 'per_group'")
            if self.group_size not in INT4_GROUP_SIZES:
                raise RecipeError(
                    f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}"
                )
        elif self.granularity is not Granularity.PER_CHANNEL or self.group_size is not None:
            raise RecipeError(
                f"{self.format.value} weights are per_channel and take no group_size; "
                f"got granularity={self.granularity.value!r}, group_size={self.group_size!r}"
            )


@dataclass(frozen=True)
class ActivationSpec:
    """How activations entering a quantized linear are treated."""

    mode: ActivationMode = ActivationMode.NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum(ActivationMode, self.mode, "activation.mode"))


@dataclass(frozen=True)
class LayerScheme:
    """What one linear layer becomes: the per-layer entry of a quantized model."""

    weight: WeightSpec
    activation: ActivationSpec = field(default_factory=ActivationSpec)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerScheme:
        return cls(
            weight=WeightSpec(**data["weight"]),
            activation=ActivationSpec(**data.get("activation", {})),
        )


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    `include` / `exclude` are fnmatch globs over linear-module names (FQNs such as
    ``transformer_blocks.0.attn.to_q``). A linear is selected when it matches an include
    glob and no exclude glob. With `family_excludes`, the model family's own list of
    layers that must stay 16-bit (embedders, final projection, ...) is excluded too.
    """

    name: str
    weight: WeightSpec
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    family_excludes: bool = True
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError("a recipe needs a non-empty name")
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", WeightSpec(**self.weight))
        if isinstance(self.activation, dict):
            object.__setattr__(self, "activation", ActivationSpec(**self.activation))
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str) or not all(isinstance(g, str) for g in value):
                raise RecipeError(
                    f"recipe.{attr} must be a sequence of glob strings, got {value!r}"
                )
            object.__setattr__(self, attr, tuple(value))
        if self.version > RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version} is newer than this qcompile supports "
                f"({RECIPE_VERSION}); upgrade qcompile"
            )

    @property
    def scheme(self) -> LayerScheme:
        return LayerScheme(weight=self.weight, activation=self.activation)

    def selects(self, fqn: str, extra_excludes: tuple[str, ...] = ()) -> bool:
        if not any(fnmatch.fnmatchcase(fqn, glob) for glob in self.include):
            return False
        return not any(fnmatch.fnmatchcase(fqn, glob) for glob in self.exclude + extra_excludes)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe fields {unknown}; valid fields: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RecipeError(f"malformed recipe {data!r}: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))


_PRESETS: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a named preset; names are unique."""
    if recipe.name in _PRESETS:
        raise RecipeError(f"a recipe named {recipe.name!r} is already registered")
    _PRESETS[recipe.name] = recipe
    return recipe


def list_recipes() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def resolve_recipe(recipe: str | Recipe) -> Recipe:
    """A preset name or a Recipe → a Recipe; unknown names list the valid ones."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe in _PRESETS:
            return _PRESETS[recipe]
        raise RecipeError(
            f"unknown recipe {recipe!r}; valid recipes: {', '.join(list_recipes())} "
            "(or pass a qcompile.Recipe)"
        )
    raise RecipeError(f"recipe must be a preset name or a qcompile.Recipe, got {type(recipe)!r}")


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise RecipeError(f"{what}={value!r} is not valid; choose one of {valid}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# Presets. Family-specific excludes are applied by `quantize` from the detected family.
register_recipe(Recipe("int8-wo", WeightSpec(WeightFormat.INT8)))
register_recipe(Recipe("fp8-wo", WeightSpec(WeightFormat.FP8_E4M3)))
register_recipe(
    Recipe("int4-wo", WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, DEFAULT_INT4_GROUP_SIZE))
)
register_recipe(Recipe("int4-wo-g128", WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, 128)))
