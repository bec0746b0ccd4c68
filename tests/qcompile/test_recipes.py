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
