"""The named presets (`qcompile recipes` lists them); imported once by `qcompile`.

Family-specific excludes are applied by `quantize` from the detected family; the
`flux-*`, `sd3-*`, `sdxl-*` family presets also spell them out as `exclude`.
"""

from __future__ import annotations

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
FAMILY_PRESET_BASES = ("svdq-w4a4", "svdq-w4a16", "svdq-nvfp4", "mxfp4-wo", "nvfp4")
for _prefix, _family in _FAMILY_PRESET_PREFIX.items():
    for _base in FAMILY_PRESET_BASES:
        register_recipe(
            resolve_recipe(_base).replace(
                name=f"{_prefix}-{_base}", exclude=_family.default_excludes
            )
        )
