"""annotate_linears: glob selection by FQN, family excludes, clear error on empty selection."""

from __future__ import annotations

import pytest
import torch

from qcompile import NoLinearSelectedError, get_recipe
from qcompile.capture import capture
from qcompile.families import FLUX
from qcompile.passes import SCHEME, annotate_linears
from qcompile.tiny import tiny_flux

from .blocks import AttentionBlock, block_inputs


@pytest.fixture(scope="module")
def block_program():
    return capture(AttentionBlock().eval(), block_inputs()).program


@pytest.fixture(scope="module")
def flux_program():
    model = tiny_flux()
    inputs = FLUX.example_inputs(model, torch.device("cpu"), torch.float32)
    return capture(model, inputs, FLUX.dynamic_shapes(inputs)).program


def test_include_exclude_globs(block_program):
    recipe = get_recipe("int8-wo").replace(include=("to_*",), exclude=("to_out",))
    schemes = annotate_linears(block_program, recipe)
    assert sorted(schemes) == ["to_k", "to_q", "to_v"]
    marked = [n for n in block_program.graph.nodes if SCHEME in n.meta]
    assert len(marked) == 3


def test_flux_family_excludes_anchor_top_level_proj_out(flux_program):
    schemes = annotate_linears(flux_program, get_recipe("int8-wo"), FLUX.default_excludes)
    # The single blocks' proj_out holds ~15 % of Flux's parameters: it is quantized;
    # only the top-level output projection stays 16-bit.
    assert "single_transformer_blocks.0.proj_out" in schemes
    assert "proj_out" not in schemes
    assert not any(f.startswith(("time_text_embed", "x_embedder", "norm_out")) for f in schemes)
    assert "transformer_blocks.0.norm1.linear" in schemes


def test_empty_selection_names_the_problem_and_the_linears(block_program):
    recipe = get_recipe("int8-wo").replace(include=("nothing*",))
    with pytest.raises(NoLinearSelectedError) as info:
        annotate_linears(block_program, recipe)
    message = str(info.value)
    assert "selects none of the model's 7 linear layers" in message
    assert "to_q" in message and "Widen `include`" in message
