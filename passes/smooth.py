"""Smooth each selected linear: its input is divided by s, its weight multiplied by s.

Why: W4A4 quantizes activations per group, and a few input channels with outliers
(×10–×100 the rest) waste every group they fall in. With s[k] = max|x_k|^α /
max|W_k|^(1−α) from calibration, x·Wᵀ = (x / s)·(W·diag(s))ᵀ: the activation that
gets quantized is x / s, whose outliers are flattened, and the weight absorbs them —
SVDQuant then moves the weight's new outliers into the 16-bit low-rank branch
(`fold_lowrank`). The division must happen before activation quantization: folding
1/s back into the weight would leave the outliers in x (benchmarks/svdquant_ablation.py
measures both). Lowering fuses the division into the layer's single 4-bit op.
Pre: `annotate_linears` has run; `stats` holds the observed input of every linear whose
scheme has `smooth`. Post: such a linear reads `qcompile.smooth(x, <fqn>.smooth)` and a
buffer `<fqn>.weight` = W·diag(s) (in W's dtype; the module's own weight is untouched);
the program computes the same function up to rounding and validates.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.export import ExportedProgram

from qcompile.passes.meta import LINEAR_FQN, SCHEME
from qcompile.passes.observers import ActivationStats
from qcompile.program import add_buffer, finalize, insert_call, state_tensor, swap_input
from qcompile.recipes import SmoothSpec
from qcompile.schemes import SMOOTH
from qcompile.svdquant import search_alpha, smooth_factors, smooth_weight

logger = logging.getLogger(__name__)

SMOOTH_OP = torch.ops.qcompile.smooth.default


def smooth(
    program: ExportedProgram, stats: dict[str, ActivationStats], spec: SmoothSpec
) -> dict[str, float]:
    """Smooth every linear whose scheme asks for it, in place; return {FQN: alpha used}."""
    by_weight: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.meta.get(SCHEME) is not None and node.meta[SCHEME].smooth:
            by_weight.setdefault(node.args[1], []).append(node)
    alphas: dict[str, float] = {}
    for weight_node, linears in by_weight.items():
        fqn, scheme = linears[0].meta[LINEAR_FQN], linears[0].meta[SCHEME]
        if len(weight_node.users) != len(linears):
            continue  # the weight feeds other ops too: lower_linears leaves it 16-bit
        if fqn not in stats:
            raise KeyError(f"smooth: no calibration statistics for {fqn}'s input")
        weight = state_tensor(program, weight_node)
        observed = stats[fqn]
        alpha = spec.alpha
        if spec.search and observed.rows.numel():
            found = search_alpha(weight, observed.channel_absmax, observed.rows, scheme, spec)
            alpha = found.alpha
            logger.debug("smooth: %s alpha %.2f (%s)", fqn, alpha, found.sqnr_db)
        factors = smooth_factors(observed.channel_absmax, weight, alpha)
        swap_input(program, weight_node, smooth_weight(weight, factors))
        factors_node = add_buffer(program, f"{fqn}.{SMOOTH}", factors)
        for node in linears:
            x = node.args[0]
            node.args = (insert_call(program, SMOOTH_OP, (x, factors_node), node), *node.args[1:])
        alphas[fqn] = alpha
    finalize(program)
    logger.info("smooth: %d linears smoothed", len(alphas))
    return alphas
