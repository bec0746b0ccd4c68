"""Lower each annotated `aten.linear` to its `torch.ops.qcompile.*` op.

Why: the lowered program is what runs at inference; its linears read packed weights
from FQN-named buffers (`<fqn>.weight`, `<fqn>.weight_scale`) that are also the
checkpoint's keys and the eager module's buffers.
Pre: `annotate_linears` and `quantize_weights` have run. Post: no annotated
`aten.linear` is left; each float weight parameter they read is replaced by buffers
holding the packed tensors; the program validates.
"""

from __future__ import annotations

import logging

from torch import fx
from torch.export import ExportedProgram

from qcompile.passes.meta import LINEAR_FQN, SCHEME
from qcompile.program import add_buffer, finalize, remove_input, replace_node
from qcompile.schemes import WEIGHT, WEIGHT_SCALE, QuantizedWeight, weight_format_impl

logger = logging.getLogger(__name__)


def lower_linears(program: ExportedProgram, packed: dict[str, QuantizedWeight]) -> list[fx.Node]:
    """Swap annotated linears for qcompile ops in place; return the new op nodes."""
    by_weight: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if SCHEME in node.meta:
            by_weight.setdefault(node.args[1], []).append(node)
    lowered = []
    for weight_node, linears in by_weight.items():
        fqn = linears[0].meta[LINEAR_FQN]
        if len(weight_node.users) != len(linears):
            logger.warning("%s.weight is read by other ops too; left in 16-bit", fqn)
            continue
        scheme = linears[0].meta[SCHEME]
        tensors = packed[fqn]
        # The packed weight takes over the float weight's FQN: drop the float one first.
        for node in linears:
            node.args = (node.args[0], None, *node.args[2:])
        remove_input(program, weight_node)
        buffers = {name: add_buffer(program, f"{fqn}.{name}", t) for name, t in tensors.items()}
        impl = weight_format_impl(scheme.weight)
        for node in linears:
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else None
            args = (x, buffers[WEIGHT], buffers[WEIGHT_SCALE], bias)
            new = replace_node(program, node, impl.op, (*args, *impl.static_args(scheme.weight)))
            new.meta[SCHEME] = scheme
            new.meta[LINEAR_FQN] = fqn
            lowered.append(new)
    finalize(program)
    logger.info("lower_linears: %d linears lowered to qcompile ops", len(lowered))
    return lowered
