"""Share activation quantization across the consumers of one tensor, then drop dead code.

Why: under `torch.compile` Dynamo traces the model's own forward, where every quantized
linear quantizes its input itself: q, k and v (or a single block's attention and MLP
projections) read one normalized tensor and quantize it three times. The lowered
program shares one quantize node per (tensor, scheme) by construction
(`lower_linears`); this pass gives the compiled path the same. Two calls of a
`qcompile` quantize op with the same inputs and arguments compute the same result
(the ops are pure), so the later one is replaced by the earlier, and so are the
`getitem`s that unpack them. Then nodes nothing reads are removed.
Pre: an fx graph in any IR (Dynamo's, or inductor's post-grad ATen). Post: no two
quantize calls share (op, args, kwargs); the graph computes the same values.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

logger = logging.getLogger(__name__)


def _quantize_ops() -> frozenset:
    ops = torch.ops.qcompile
    packets = [ops.quantize_act_dynamic, ops.quantize_act_static]
    return frozenset(overload for packet in packets for overload in (packet, packet.default))


def share_quantize(graph: fx.Graph) -> int:
    """Merge duplicate quantize calls (and their getitems) in place; return how many
    quantize calls were removed."""
    quantize_ops = _quantize_ops()
    seen: dict[tuple, fx.Node] = {}
    kept: set[fx.Node] = set()  # quantize calls left in place: their getitems merge
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        is_quantize = node.target in quantize_ops
        is_unpack = node.target is operator.getitem and node.args[0] in kept
        if not (is_quantize or is_unpack):
            continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        first = seen.setdefault(key, node)
        if first is node:
            kept.add(node)
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        removed += is_quantize
    graph.eliminate_dead_code()
    if removed:
        logger.info("share_quantize: %d duplicate activation quantizations removed", removed)
    return removed


def _hashable(value):
    """args/kwargs as a hashable key; nodes compare by identity."""
    if isinstance(value, slice):
        return ("slice", _hashable(value.start), _hashable(value.stop), _hashable(value.step))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
