"""The named presets (`qcompile recipes` lists them); imported once by `qcompile`.

Family-specific excludes are applied by `quantize` from the detected family; the
`flux-*`, `sd3-*`, `sdxl-*` family presets also spell them out as `exclude`.
"""

from __future__ import annotations

import difflib
import fnmatch

from qcompile.errors import NoLinearSelectedError, RecipeError
from qcompile.families import FLUX, SD3, UNET
from qcompile.recipes import (
    DEFAULT_INT4_GROUP_SIZE,
    DEFAULT_RANK,
    ActivationFormat,
    ActivationMode,
    ActivationSpec,
    Granularity,
    Observer,
    Recipe,
    SmoothSpec,
    WeightFormat,
    WeightSpec,
    register_recipe,
    resolve_recipe,
)

register_recipe(Recipe("int8-wo", WeightSpec(WeightFormat.INT8)))
register_recipe(Recipe("fp8-wo", WeightSpec(WeightFormat.FP8_E4M3)))
register_recipe(
    Recipe("int4-wo", WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, DEFAULT_INT4_GROUP_SIZE))
)
register_recipe(Recipe("int4-wo-g128", WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, 128)))
register_recipe(
    Recipe(
        "int8-w8a8",
        WeightSpec(WeightFormat.INT8),
        # histogram: best or within 0.13 dB of best of the four observers on tiny Flux,
        # SD3 and UNet (docs/design.md)
        ActivationSpec(ActivationMode.STATIC, ActivationFormat.INT8, observer=Observer.HISTOGRAM),
    )
)
register_recipe(
    Recipe(
        "fp8-w8a8",
        WeightSpec(WeightFormat.FP8_E4M3, Granularity.PER_TENSOR),
        ActivationSpec(ActivationMode.STATIC, ActivationFormat.FP8_E4M3, observer=Observer.MIN_MAX),
    )
)
register_recipe(
    Recipe(
        "fp8-dynamic",
        WeightSpec(WeightFormat.FP8_E4M3),
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.FP8_E4M3),
    )
)
register_recipe(
    Recipe(
        "int8-dynamic",
        WeightSpec(WeightFormat.INT8),
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.INT8),
    )
)
register_recipe(Recipe("mxfp4-wo", WeightSpec(WeightFormat.MXFP4, Granularity.PER_GROUP)))
register_recipe(
    Recipe(
        "nvfp4",
        WeightSpec(WeightFormat.NVFP4, Granularity.PER_GROUP),
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.NVFP4),
    )
)
_INT4_G64 = WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, DEFAULT_INT4_GROUP_SIZE)
register_recipe(Recipe("svdq-w4a16", _INT4_G64, rank=DEFAULT_RANK))
register_recipe(
    Recipe(
        "svdq-w4a4",
        _INT4_G64,
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.INT4),
        smooth=SmoothSpec(),
        rank=DEFAULT_RANK,
    )
)
# W4A8: 4-bit weights in memory, int8 × int8 tensor-core MMA (Hopper has no 4-bit MMA)
_INT8_DYNAMIC = ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.INT8)
register_recipe(Recipe("w4a8", _INT4_G64, _INT8_DYNAMIC))
register_recipe(
    Recipe("svdq-w4a8", _INT4_G64, _INT8_DYNAMIC, smooth=SmoothSpec(), rank=DEFAULT_RANK)
)
register_recipe(
    Recipe(
        "svdq-nvfp4",
        WeightSpec(WeightFormat.NVFP4, Granularity.PER_GROUP),
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.NVFP4),
        smooth=SmoothSpec(),
        rank=DEFAULT_RANK,
    )
)


# Family presets: the 4-bit presets with the family's 16-bit layers spelled out.
# (The low-rank branch is never a candidate: it is added after selection.)
_FAMILY_PRESET_PREFIX = {"flux": FLUX, "sd3": SD3, "sdxl": UNET}
FAMILY_PRESET_BASES = (
    "svdq-w4a4", "svdq-w4a8", "svdq-w4a16", "svdq-nvfp4", "mxfp4-wo", "nvfp4",
)  # fmt: skip
for _prefix, _family in _FAMILY_PRESET_PREFIX.items():
    for _base in FAMILY_PRESET_BASES:
        register_recipe(
            resolve_recipe(_base).replace(
                name=f"{_prefix}-{_base}", exclude=_family.default_excludes
            )
        )


GLOB_FORM = "globs match whole dotted names such as 'transformer_blocks.0.attn.to_q'"


def preset_family(recipe: Recipe):
    """The family a `flux-*` / `sd3-*` / `sdxl-*` preset (or a recipe made from one,
    excludes kept) was written for; None for any other recipe."""
    prefix = recipe.name.partition("-")[0]
    family = _FAMILY_PRESET_PREFIX.get(prefix)
    if family is None or not set(family.default_excludes) <= set(recipe.exclude):
        return None
    return family


def check_recipe_fits(recipe: Recipe, model_name: str, family, linears: list[str]) -> None:
    """Refuse what would otherwise quantize without a word but not as asked: a family
    preset on a model of another family, and an include / exclude glob that matches
    none of the model's linear layers (a typo leaves the layer it meant quantized).
    Globs a family preset spells out for its own family are not checked: not every
    model of a family has every one of them."""
    written_for = preset_family(recipe)
    if written_for is not None and (family is None or family.name != written_for.name):
        base = recipe.name.partition("-")[2]
        ours = [p for p, f in _FAMILY_PRESET_PREFIX.items() if family and f.name == family.name]
        instead = f"{ours[0]}-{base}" if ours else base
        raise RecipeError(
            f"recipe {recipe.name!r} is written for {written_for.class_name} (its excludes "
            f"name that family's layers); {model_name} is "
            f"{family.class_name if family else 'not of that family'}: use {instead!r}"
        )
    own = set(written_for.default_excludes) if written_for is not None else set()
    for attr in ("include", "exclude"):
        for glob in getattr(recipe, attr):
            if glob == "*" or glob in own or any(fnmatch.fnmatchcase(n, glob) for n in linears):
                continue
            shapes = sorted({"*." + ".".join(n.split(".")[-2:]) for n in linears})
            close = difflib.get_close_matches(glob, shapes, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            if attr == "include":  # nothing it names is quantized
                raise NoLinearSelectedError(
                    f"recipe {recipe.name!r} selects none of the model's layers that include "
                    f"glob {glob!r} names: it matches none of {model_name}'s "
                    f"{len(linears)} linear layers{hint}; {GLOB_FORM}"
                )
            raise RecipeError(
                f"recipe {recipe.name!r}: exclude glob {glob!r} matches none of "
                f"{model_name}'s {len(linears)} linear layers{hint}, so it keeps nothing "
                f"16-bit; {GLOB_FORM}"
            )
