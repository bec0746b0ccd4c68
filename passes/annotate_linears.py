"""Mark each `aten.linear` the recipe selects with its LayerScheme.

Why: the later passes must agree on one decision per linear, keyed by the linear's
module FQN, which torch.export exposes as the weight placeholder's target.
Pre: an ExportedProgram in the default export IR (`aten.linear` nodes intact).
Post: selected linear nodes carry `meta[SCHEME]` and `meta[LINEAR_FQN]`; nothing else
changes. Raises NoLinearSelectedError when the recipe selects nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from qcompile.errors import NoLinearSelectedError
from qcompile.passes.meta import LINEAR_FQN, SCHEME
from qcompile.program import input_spec_of
from qcompile.recipes import LayerScheme, Recipe

logger = logging.getLogger(__name__)

WEIGHT_SUFFIX = ".weight"


def linear_nodes(program: ExportedProgram) -> dict[fx.Node, str]:
    """Every `aten.linear` whose weight is a 2-D parameter → the linear's module FQN."""
    found = {}
    for node in program.graph.nodes:
        if node.target is not torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        spec = input_spec_of(program, weight) if weight.op == "placeholder" else None
        if spec is None or spec.kind is not InputKind.PARAMETER:
            continue
        if not spec.target.endswith(WEIGHT_SUFFIX) or weight.meta["val"].dim() != 2:
            continue
        found[node] = spec.target[: -len(WEIGHT_SUFFIX)]
    return found


def annotate_linears(
    program: ExportedProgram, recipe: Recipe, extra_excludes: tuple[str, ...] = ()
) -> dict[str, LayerScheme]:
    """Annotate selected linears in place; return {linear FQN: LayerScheme}."""
    linears = linear_nodes(program)
    schemes: dict[str, LayerScheme] = {}
    for node, fqn in linears.items():
        if recipe.selects(fqn, extra_excludes):
            scheme = recipe.scheme_for(*node.args[1].meta["val"].shape)
            node.meta[SCHEME] = scheme
            node.meta[LINEAR_FQN] = fqn
            schemes[fqn] = scheme
    if not schemes:
        names = sorted(set(linears.values()))
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise NoLinearSelectedError(
            f"recipe {recipe.name!r} selects none of the model's {len(names)} linear layers "
            f"(include={list(recipe.include)}, exclude={list(recipe.exclude)}, family "
            f"excludes={list(extra_excludes)}); linear layers: {shown or 'none'}. "
            "Widen `include` or narrow `exclude`."
        )
    logger.info("annotate_linears: %d of %d linears selected", len(schemes), len(linears))
    return schemes
