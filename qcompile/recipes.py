"""Recipes: which linear layers get which quantization scheme.

A recipe is a frozen, validated dataclass with a version and a JSON round trip. Named
presets (defined in `qcompile/presets.py`) live in a small registry; `resolve_recipe`
turns a preset name or a `Recipe` into a `Recipe` and lists the valid names when the
name is unknown.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qcompile.errors import RecipeError

RECIPE_VERSION = 1
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64
DEFAULT_RANK = 32
MAX_RANK = 1024


class WeightFormat(str, Enum):
    INT8 = "int8"
    FP8_E4M3 = "fp8_e4m3"
    INT4 = "int4"
    MXFP4 = "mxfp4"  # e2m1 values, e8m0 scale per 32 (OCP MX)
    NVFP4 = "nvfp4"  # e2m1 values, e4m3 scale per 16, float32 per-tensor scale


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_ROW = "per_row"  # activations: one scale per token row (dynamic)


class ActivationMode(str, Enum):
    NONE = "none"  # activations stay 16-bit (weight-only)
    STATIC = "static"  # scale calibrated once, stored as `<fqn>.input_scale`
    DYNAMIC = "dynamic"  # scale computed from each call's activation


class ActivationFormat(str, Enum):
    INT8 = "int8"
    FP8_E4M3 = "fp8_e4m3"
    INT4 = "int4"  # 4-bit activations are dynamic, per group of the weight's group size
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


# Block size of the FP4 formats: fixed by the format, not a choice.
FP4_BLOCK = {WeightFormat.MXFP4: 32, WeightFormat.NVFP4: 16}
FOUR_BIT_WEIGHTS = (WeightFormat.INT4, WeightFormat.MXFP4, WeightFormat.NVFP4)
FOUR_BIT_ACTIVATIONS = (ActivationFormat.INT4, ActivationFormat.MXFP4, ActivationFormat.NVFP4)


class Observer(str, Enum):
    MIN_MAX = "min_max"
    PERCENTILE = "percentile"
    HISTOGRAM = "histogram"
    MSE = "mse"


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
        if self.format in FP4_BLOCK:
            block = FP4_BLOCK[self.format]
            if self.granularity is not Granularity.PER_GROUP or self.group_size not in (
                None,
                block,
            ):
                raise RecipeError(
                    f"{self.format.value} weights are per_group with group_size {block}; got "
                    f"granularity={self.granularity.value!r}, group_size={self.group_size!r}"
                )
            object.__setattr__(self, "group_size", block)
        elif self.format is WeightFormat.INT4:
            if self.granularity is not Granularity.PER_GROUP:
                raise RecipeError("int4 weights need granularity 'per_group'")
            if self.group_size not in INT4_GROUP_SIZES:
                raise RecipeError(
                    f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}"
                )
        elif (
            self.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR)
            or self.group_size is not None
        ):
            raise RecipeError(
                f"{self.format.value} weights are per_channel or per_tensor and take no "
                f"group_size; got granularity={self.granularity.value!r}, "
                f"group_size={self.group_size!r}"
            )


@dataclass(frozen=True)
class ActivationSpec:
    """How activations entering a quantized linear are treated.

    static: one per-tensor scale from calibration (`observer` picks the range);
    dynamic: a scale per token row, computed on every call.
    """

    mode: ActivationMode = ActivationMode.NONE
    format: ActivationFormat | None = None
    granularity: Granularity | None = None
    observer: Observer | None = None
    percentile: float | None = None  # for observer "percentile"

    def __post_init__(self) -> None:
        mode = _enum(ActivationMode, self.mode, "activation.mode")
        object.__setattr__(self, "mode", mode)
        if mode is ActivationMode.NONE:
            if any(v is not None for v in (self.format, self.granularity, self.observer)):
                raise RecipeError("activation mode 'none' takes no format/granularity/observer")
            return
        object.__setattr__(
            self, "format", _enum(ActivationFormat, self.format, "activation.format")
        )
        four_bit = self.format in FOUR_BIT_ACTIVATIONS
        if four_bit and mode is ActivationMode.STATIC:
            raise RecipeError(
                f"{self.format.value} activations are dynamic (a scale per group, computed "
                "on every call); use mode 'dynamic'"
            )
        want = Granularity.PER_TENSOR if mode is ActivationMode.STATIC else Granularity.PER_ROW
        want = Granularity.PER_GROUP if four_bit else want
        granularity = _enum(Granularity, self.granularity or want, "activation.granularity")
        if granularity is not want:
            raise RecipeError(
                f"{mode.value} activations are {want.value}, got {granularity.value!r}"
            )
        object.__setattr__(self, "granularity", granularity)
        if mode is ActivationMode.DYNAMIC:
            if self.observer is not None:
                raise RecipeError("dynamic activations need no observer")
            return
        observer = _enum(Observer, self.observer or Observer.MIN_MAX, "activation.observer")
        object.__setattr__(self, "observer", observer)
        if observer is Observer.PERCENTILE:
            value = 99.99 if self.percentile is None else self.percentile
            if not (isinstance(value, (int, float)) and 50 < value <= 100):
                raise RecipeError(f"activation.percentile must be in (50, 100], got {value!r}")
            object.__setattr__(self, "percentile", float(value))
        elif self.percentile is not None:
            raise RecipeError("activation.percentile only applies to observer 'percentile'")

    @property
    def quantized(self) -> bool:
        return self.mode is not ActivationMode.NONE


@dataclass(frozen=True)
class SmoothSpec:
    """SVDQuant/SmoothQuant smoothing: s = max|x|^alpha / max|W|^(1 - alpha) per channel.

    With `search`, each layer picks the alpha of the grid that minimizes its output
    error on at most `search_rows` cached calibration rows (docs/svdquant.md states the
    time and memory this costs); `alpha` is then only the fallback.
    """

    alpha: float = 0.5
    search: tuple[float, ...] = ()
    search_rows: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "search", tuple(self.search))
        for value in (self.alpha, *self.search):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise RecipeError(f"smooth alpha values must be in [0, 1], got {value!r}")
        if len(self.search) > 16:
            raise RecipeError(f"smooth.search takes at most 16 alphas, got {len(self.search)}")
        if not (isinstance(self.search_rows, int) and 1 <= self.search_rows <= 4096):
            raise RecipeError(
                f"smooth.search_rows must be an int in [1, 4096], got {self.search_rows!r}"
            )


@dataclass(frozen=True)
class LayerScheme:
    """What one linear layer becomes: the per-layer entry of a quantized model.

    `smooth`: the layer's input is divided by a per-channel `<fqn>.smooth` before it is
    quantized; `rank`: the layer keeps a 16-bit rank-`rank` branch
    (`<fqn>.lora_down` [rank, K], `<fqn>.lora_up` [N, rank]).
    """

    weight: WeightSpec
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    smooth: bool = False
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerScheme:
        return cls(
            weight=WeightSpec(**data["weight"]),
            activation=ActivationSpec(**data.get("activation", {})),
            smooth=bool(data.get("smooth", False)),
            rank=int(data.get("rank", 0)),
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
    smooth: SmoothSpec | None = None
    rank: int = 0  # SVD low-rank branch (0: none)
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
        if isinstance(self.smooth, dict):
            object.__setattr__(self, "smooth", SmoothSpec(**self.smooth))
        for attr, cls, optional in (
            ("weight", WeightSpec, False),
            ("activation", ActivationSpec, False),
            ("smooth", SmoothSpec, True),
        ):
            value = getattr(self, attr)
            if not isinstance(value, cls) and not (optional and value is None):
                raise RecipeError(
                    f"recipe.{attr} must be a qcompile.{cls.__name__}"
                    f"{' or None' if optional else ''}, got {value!r}"
                )
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
        self._check_pairing()

    def _check_pairing(self) -> None:
        if self.activation.quantized:
            pair = (self.weight.format, self.activation.format)
            if pair not in _PAIRS:
                raise RecipeError(
                    f"{self.weight.format.value} weights cannot pair with "
                    f"{self.activation.format.value} activations; supported: "
                    + ", ".join(f"{w.value}+{a.value}" for w, a in _PAIRS)
                )
        if not (isinstance(self.rank, int) and 0 <= self.rank <= MAX_RANK):
            raise RecipeError(f"recipe.rank must be an int in [0, {MAX_RANK}], got {self.rank!r}")
        if self.rank and self.weight.format not in FOUR_BIT_WEIGHTS:
            raise RecipeError(
                f"a low-rank branch (rank={self.rank}) pairs with 4-bit weights "
                f"(int4, mxfp4, nvfp4), not {self.weight.format.value}; set rank=0"
            )
        w4a8 = self.weight.format is WeightFormat.INT4 and (
            self.activation.format is ActivationFormat.INT8
        )
        if self.smooth is not None and self.activation.format not in FOUR_BIT_ACTIVATIONS:
            if not w4a8:
                raise RecipeError(
                    "smoothing moves activation outliers into the weights before the "
                    "activation is quantized; it needs 4-bit dynamic activations (int4, "
                    "mxfp4, nvfp4) or int4 weights with int8 activations (W4A8). Drop "
                    "smooth= or quantize the activations"
                )
            if self.activation.mode is ActivationMode.STATIC:
                raise RecipeError(
                    "W4A8 with smoothing quantizes the smoothed activation, whose scale "
                    "calibration does not observe; use activation mode 'dynamic' with "
                    "smooth=, or a static scale without smooth="
                )

    @property
    def needs_calibration(self) -> bool:
        """Static scales and smoothing factors both come from calibration data."""
        return self.activation.mode is ActivationMode.STATIC or self.smooth is not None

    @property
    def scheme(self) -> LayerScheme:
        return LayerScheme(self.weight, self.activation, self.smooth is not None, self.rank)

    def scheme_for(self, out_features: int, in_features: int) -> LayerScheme:
        """The scheme of one N×K layer: the rank is capped at min(N, K) // 4."""
        rank = min(self.rank, min(out_features, in_features) // 4)
        return dataclasses.replace(self.scheme, rank=rank)

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
        close = difflib.get_close_matches(recipe, list_recipes(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise RecipeError(
            f"unknown recipe {recipe!r}; {hint}valid recipes: {', '.join(list_recipes())} "
            "(`qcompile recipes` describes them; or pass a qcompile.Recipe)"
        )
    raise RecipeError(f"recipe must be a preset name or a qcompile.Recipe, got {type(recipe)!r}")


_PAIRS = (
    (WeightFormat.INT8, ActivationFormat.INT8),
    (WeightFormat.INT4, ActivationFormat.INT8),  # W4A8: int4 weights widened to int8
    (WeightFormat.FP8_E4M3, ActivationFormat.FP8_E4M3),
    (WeightFormat.INT4, ActivationFormat.INT4),
    (WeightFormat.MXFP4, ActivationFormat.MXFP4),
    (WeightFormat.NVFP4, ActivationFormat.NVFP4),
)


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
