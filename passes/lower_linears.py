"""Lower each annotated `aten.linear` to `torch.ops.qcompile.*` ops.

Why: the lowered program is what runs at inference; its linears read packed weights
from FQN-named buffers (`<fqn>.weight`, `<fqn>.weight_scale`, `<fqn>.input_scale`)
that are also the checkpoint's keys and the eager module's buffers. With quantized
activations, the activation is quantized by an explicit op, once per tensor and
scheme: q/k/v projections that read one normalized tensor share one quantize node — a
graph-level saving a module-swapping tool cannot make. A 4-bit linear becomes exactly
one op (`linear_w4a4` / `linear_w4a16`) that also absorbs what `smooth` and
`fold_lowrank` inserted: the `qcompile.smooth` division and the low-rank branch
(down linear, up linear, add), so the branch is added before the single output write.
Pre: `annotate_linears` and `quantize_weights` have run. Post: no annotated
`aten.linear` is left; each float weight parameter they read is replaced by buffers
holding the packed tensors; the program validates.
"""

from __future__ import annotations

import logging
import operator

from torch import fx
from torch.export import ExportedProgram

from qcompile.passes.meta import ACT_QUANT_SHARED_BY, LINEAR_FQN, LOWRANK_OF, SCHEME
from qcompile.passes.smooth import SMOOTH_OP
from qcompile.program import (
    add_buffer,
    buffer_node,
    finalize,
    insert_call,
    remove_input,
    replace_node,
)
from qcompile.recipes import ActivationMode
from qcompile.schemes import (
    INPUT_SCALE,
    QUANTIZE_DYNAMIC,
    QUANTIZE_STATIC,
    WEIGHT,
    WEIGHT_SCALE,
    QuantizedWeight,
    activation_impl,
    fused_call,
    fused_op,
    weight_format_impl,
)

logger = logging.getLogger(__name__)


def lower_linears(program: ExportedProgram, packed: dict[str, QuantizedWeight]) -> list[fx.Node]:
    """Swap annotated linears for qcompile ops in place; return the new GEMM nodes."""
    by_weight: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if SCHEME in node.meta:
            by_weight.setdefault(node.args[1], []).append(node)
    buffers: dict[fx.Node, dict[str, fx.Node]] = {}  # linear node → its buffer nodes
    for weight_node, linears in by_weight.items():
        fqn = linears[0].meta[LINEAR_FQN]
        if len(weight_node.users) != len(linears):
            logger.warning("%s.weight is read by other ops too; left in 16-bit", fqn)
            for node in linears:
                del node.meta[SCHEME]
            continue
        # The packed weight takes over the float weight's FQN: drop the float one first.
        for node in linears:
            node.args = (node.args[0], None, *node.args[2:])
        remove_input(program, weight_node)
        added = {
            name: buffer_node(program, f"{fqn}.{name}") or add_buffer(program, f"{fqn}.{name}", t)
            for name, t in packed[fqn].items()
        }
        for node in linears:
            buffers[node] = added
    quantized_inputs = _quantize_activations(program, buffers)
    lowered = []
    for node, nodes in buffers.items():
        scheme, fqn = node.meta[SCHEME], node.meta[LINEAR_FQN]
        x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
        if fused_op(scheme) is not None:
            new = _lower_fused(program, node, nodes, bias)
        elif scheme.activation.quantized:
            x_q, x_scale = quantized_inputs[node]
            gemm = activation_impl(scheme.activation).gemm
            out_dtype = node.meta["val"].dtype
            args = (x_q, x_scale, nodes[WEIGHT], nodes[WEIGHT_SCALE], bias, out_dtype)
            new = replace_node(program, node, gemm, args)
        else:
            impl = weight_format_impl(scheme.weight)
            args = (x, nodes[WEIGHT], nodes[WEIGHT_SCALE], bias, *impl.static_args(scheme.weight))
            new = replace_node(program, node, impl.op, args)
        new.meta[SCHEME], new.meta[LINEAR_FQN] = scheme, fqn
        lowered.append(new)
    finalize(program)
    logger.info(
        "lower_linears: %d linears lowered, %d activation-quant nodes",
        len(lowered),
        len({id(v[0]) for v in quantized_inputs.values()}),
    )
    return lowered


def _lower_fused(
    program: ExportedProgram, node: fx.Node, buffers: dict[str, fx.Node], bias: fx.Node | None
) -> fx.Node:
    """linear [+ smooth before, + low-rank branch after] → one 4-bit op."""
    scheme, fqn = node.meta[SCHEME], node.meta[LINEAR_FQN]
    x = node.args[0]
    if scheme.smooth:
        if x.target is not SMOOTH_OP:
            raise RuntimeError(f"{fqn}: smoothed scheme but no smooth node; run `smooth` first")
        x = x.args[0]
    last, dead = node, []  # `last` is replaced by the fused op; `dead` erased after it
    if scheme.rank:
        add = next((u for u in node.users if u.meta.get(LOWRANK_OF) == fqn), None)
        if add is None:
            raise RuntimeError(f"{fqn}: scheme has a rank but no branch; run `fold_lowrank`")
        up = add.args[1]
        last, dead = add, [up, up.args[0], node]
    op, args = fused_call(scheme, x, buffers, bias)
    smoothed = node.args[0]
    new = replace_node(program, last, op, args)
    for unused in dead:
        program.graph.erase_node(unused)
    if smoothed.target is SMOOTH_OP and not smoothed.users:
        program.graph.erase_node(smoothed)
    return new


def _quantize_activations(
    program: ExportedProgram, buffers: dict[fx.Node, dict[str, fx.Node]]
) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
    """One quantize node per (activation tensor, activation scheme); linear → (x_q, scale)."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in buffers:
        activation = node.meta[SCHEME].activation
        if activation.quantized and fused_op(node.meta[SCHEME]) is None:
            groups.setdefault((node.args[0], activation), []).append(node)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    result = {}
    for (x, activation), consumers in groups.items():
        first = min(consumers, key=order.__getitem__)
        dtype = activation_impl(activation).dtype
        if activation.mode is ActivationMode.STATIC:
            scale = buffers[first][INPUT_SCALE]
            x_q = insert_call(program, QUANTIZE_STATIC, (x, scale, dtype), first)
        else:
            pair = insert_call(program, QUANTIZE_DYNAMIC, (x, dtype), first)
            x_q = insert_call(program, operator.getitem, (pair, 0), first)
            scale = insert_call(program, operator.getitem, (pair, 1), first)
        x_q.meta[ACT_QUANT_SHARED_BY] = [c.meta[LINEAR_FQN] for c in consumers]
        for consumer in consumers:
            result[consumer] = (x_q, scale)
    return result
