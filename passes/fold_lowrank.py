"""Split each selected linear's weight into a 16-bit rank-R branch and a residual.

Why: after smoothing, the weight carries the activations' outliers; its top singular
directions hold most of that energy. SVD gives W = up·down + residual with
down [R, K], up [N, R]; only the residual (small, flat) is quantized, and the branch
runs in 16 bits — SVDQuant's trade of 2·R·(N + K) bytes for several dB.
Pre: `annotate_linears` (and `smooth`, for smoothed schemes) have run. Post: a linear
with `scheme.rank` = R > 0 reads buffer `<fqn>.weight` = residual (in the weight's
dtype) and its output is `add(linear(x, residual, b), linear(linear(x, lora_down),
lora_up))`; the branch nodes carry `meta[LOWRANK_OF]` = FQN (they are not annotated, so
they stay 16-bit); lowering fuses all of it into one op. The program computes the same
function up to rounding and validates.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.export import ExportedProgram

from qcompile.passes.meta import LINEAR_FQN, LOWRANK_OF, SCHEME
from qcompile.program import (
    add_buffer,
    finalize,
    insert_call,
    redirect_uses,
    state_tensor,
    swap_input,
)
from qcompile.schemes import LORA_DOWN, LORA_UP
from qcompile.svdquant import lowrank_split

logger = logging.getLogger(__name__)

LINEAR = torch.ops.aten.linear.default
ADD = torch.ops.aten.add.Tensor


def fold_lowrank(program: ExportedProgram) -> list[str]:
    """Give every linear whose scheme has a rank its low-rank branch; return their FQNs."""
    by_weight: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.meta.get(SCHEME) is not None and node.meta[SCHEME].rank:
            by_weight.setdefault(node.args[1], []).append(node)
    folded = []
    for weight_node, linears in by_weight.items():
        fqn, rank = linears[0].meta[LINEAR_FQN], linears[0].meta[SCHEME].rank
        if len(weight_node.users) != len(linears):
            continue  # the weight feeds other ops too: lower_linears leaves it 16-bit
        weight = state_tensor(program, weight_node)
        down, up, residual = lowrank_split(weight, rank, weight.dtype)
        swap_input(program, weight_node, residual)
        down_node = add_buffer(program, f"{fqn}.{LORA_DOWN}", down)
        up_node = add_buffer(program, f"{fqn}.{LORA_UP}", up)
        for node in linears:
            hidden = insert_call(program, LINEAR, (node.args[0], down_node), node.next)
            branch = insert_call(program, LINEAR, (hidden, up_node), hidden.next)
            total = insert_call(program, ADD, (node, branch), branch.next)
            redirect_uses(program, node, total)
            for added in (hidden, branch, total):
                added.meta[LOWRANK_OF] = fqn
        folded.append(fqn)
    finalize(program)
    logger.info("fold_lowrank: %d linears given a low-rank branch", len(folded))
    return folded
