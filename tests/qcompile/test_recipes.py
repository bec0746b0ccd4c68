"""Recipes: presets, validation, JSON round trip, clear errors."""

from __future__ import annotations

import pytest

import qcompile
from qcompile import Recipe, RecipeError, WeightSpec


def test_presets_listed():
    assert {"int8-wo", "fp8-wo", "int4-wo", "int4-wo-g128"} <= set(qcompile.list_recipes())
    assert qcompile.get_recipe("int4-wo").weight.group_size == 64
    assert qcompile.get_recipe("int4-wo-g128").weight.group_size == 128


@pytest.mark.parametrize("name", qcompile.list_recipes())
def test_json_round_trip(name):
    recipe = qcompile.get_recipe(name).replace(exclude=("a.*", "b"))
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert isinstance(again.exclude, tuple)


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(RecipeError) as info:
        qcompile.get_recipe("int3-wo")
    message = str(info.value)
    assert "unknown recipe 'int3-wo'" in message
    for name in qcompile.list_recipes():
        assert name in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="int4", granularity="per_channel"), "int4 weights need granularity"),
        (dict(format="int4", granularity="per_group", group_size=48), "group_size must be one of"),
        (dict(format="int8", group_size=64), "take no group_size"),
        (dict(format="int7"), "weight.format='int7' is not valid"),
    ],
)
def test_invalid_weight_specs(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        WeightSpec(**kwargs)


def test_malformed_recipe_dicts():
    with pytest.raises(RecipeError, match="unknown recipe fields"):
        Recipe.from_dict({"name": "x", "weight": {"format": "int8"}, "wieght": 1})
    with pytest.raises(RecipeError, match="sequence of glob strings"):
        Recipe("x", WeightSpec("int8"), include="*")
    with pytest.raises(RecipeError, match="newer than this qcompile supports"):
        Recipe("x", WeightSpec("int8"), version=99)


def test_selects_with_globs():
    recipe = Recipe("x", WeightSpec("int8"), include=("blocks.*",), exclude=("*.proj_out",))
    assert recipe.selects("blocks.0.attn.to_q")
    assert not recipe.selects("blocks.0.proj_out")
    assert not recipe.selects("proj_out")
    assert not recipe.selects("blocks.0.attn.to_q", extra_excludes=("*to_q",))


def test_four_bit_presets_and_what_they_carry():
    w4a4 = qcompile.get_recipe("svdq-w4a4")
    assert w4a4.rank == 32 and w4a4.smooth.alpha == 0.5 and w4a4.needs_calibration
    assert (
        w4a4.activation.format.value == "int4" and w4a4.activation.granularity.value == "per_group"
    )
    assert qcompile.get_recipe("svdq-w4a16").smooth is None
    assert not qcompile.get_recipe("svdq-w4a16").needs_calibration
    assert qcompile.get_recipe("mxfp4-wo").weight.group_size == 32
    assert qcompile.get_recipe("nvfp4").weight.group_size == 16
    # rank capped per layer at min(N, K) / 4; real layers (≥ 320 wide) keep 32
    assert w4a4.scheme_for(64, 64).rank == 16 and w4a4.scheme_for(3072, 320).rank == 32
    assert w4a4.scheme_for(3, 64).rank == 0


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])
def test_family_presets_spell_out_the_family_excludes(family):
    from qcompile.families import FLUX, SD3, UNET

    excludes = {"flux": FLUX, "sd3": SD3, "sdxl": UNET}[family].default_excludes
    for base in ("svdq-w4a4", "svdq-w4a16", "mxfp4-wo", "nvfp4"):
        recipe = qcompile.get_recipe(f"{family}-{base}")
        assert recipe.exclude == excludes
        assert recipe.replace(name=base, exclude=()) == qcompile.get_recipe(base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=WeightSpec("int8"), rank=16), "pairs with 4-bit weights"),
        (dict(weight=WeightSpec("int4", "per_group", 64), rank=-1), "recipe.rank must be"),
        (
            dict(
                weight=WeightSpec("int8"),
                activation={"mode": "static", "format": "int8"},
                smooth={"alpha": 0.5},
            ),
            "needs 4-bit dynamic activations",
        ),
        (
            dict(
                weight=WeightSpec("int4", "per_group", 64),
                activation={"mode": "dynamic", "format": "nvfp4"},
            ),
            "int4 weights cannot pair with nvfp4",
        ),
        (
            dict(
                weight=WeightSpec("int4", "per_group", 64),
                activation={"mode": "static", "format": "int4"},
            ),
            "int4 activations are dynamic",
        ),
        (
            dict(
                weight=WeightSpec("int4", "per_group", 64),
                activation={"mode": "dynamic", "format": "int4"},
                smooth={"alpha": 1.5},
            ),
            r"alpha values must be in \[0, 1\]",
        ),
    ],
)
def test_invalid_four_bit_recipes(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        Recipe("x", **kwargs)


def test_fp4_block_is_fixed_by_the_format():
    assert WeightSpec("mxfp4", "per_group").group_size == 32
    with pytest.raises(RecipeError, match="nvfp4 weights are per_group with group_size 16"):
        WeightSpec("nvfp4", "per_group", 32)


def test_a_misspelled_preset_gets_a_suggestion():
    with pytest.raises(RecipeError, match=r"did you mean 'int8-wo'( or '[\w-]+')*\? "):
        qcompile.get_recipe("int8-w0")
    with pytest.raises(RecipeError, match=r"did you mean 'svdq-w4a4'"):
        qcompile.get_recipe("svdq-w4a44")


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"weight": None}, "recipe.weight must be a qcompile.WeightSpec"),
        ({"activation": "int8"}, "recipe.activation must be a qcompile.ActivationSpec"),
        ({"smooth": 0.5}, "recipe.smooth must be a qcompile.SmoothSpec or None"),
    ],
)
def test_replace_with_a_wrong_part_is_a_recipe_error(change, what):
    # Recipe.replace(weight=None) raised AttributeError from inside the validation.
    with pytest.raises(RecipeError, match=what):
        qcompile.get_recipe("int8-wo").replace(**change)


def test_w4a8_presets_pair_int4_weights_with_int8_activations():
    svdq, plain = qcompile.get_recipe("svdq-w4a8"), qcompile.get_recipe("w4a8")
    for recipe in (svdq, plain):
        assert recipe.weight.format.value == "int4" and recipe.weight.group_size == 64
        assert recipe.activation.format.value == "int8"
        assert recipe.activation.mode.value == "dynamic"
    assert svdq.rank == 32 and svdq.smooth is not None and svdq.needs_calibration
    assert plain.rank == 0 and plain.smooth is None and not plain.needs_calibration
    assert qcompile.get_recipe("flux-svdq-w4a8").exclude  # a family preset too


def test_w4a8_smoothing_needs_dynamic_activations():
    from qcompile.recipes import ActivationSpec, SmoothSpec

    static = ActivationSpec("static", "int8")
    int4 = WeightSpec("int4", "per_group", 64)
    Recipe("w4a8-static", int4, static)  # a calibrated scale alone is fine
    with pytest.raises(RecipeError, match="use activation mode 'dynamic' with smooth="):
        Recipe("x", int4, static, smooth=SmoothSpec())
    with pytest.raises(RecipeError, match=r"or int4 weights with int8 activations \(W4A8\)"):
        Recipe("x", WeightSpec("int8"), ActivationSpec("dynamic", "int8"), smooth=SmoothSpec())
