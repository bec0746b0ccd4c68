"""Horizontal fusion: linears that read one activation become one GEMM.

Why: q, k and v (and a Flux single block's attention and MLP projections) read one
normalized tensor; three GEMMs of N = 3072 each re-read that activation and pay three
launches and three partial last waves, where one GEMM over the concatenated weights
(N = 9216) reads it once. The concatenation costs nothing per call: the runtime holds
each group's weights in one tensor and the members' buffers are row views of it
(`qcompile.row_groups`), so the model's bytes do not change.

`find_groups` picks the candidates on the lowered graph: calls of one weight-only or
W8A8 op with the same activation arguments and static arguments, per-row weight
scales (scale rows = weight rows), equal K and dtypes, and all or none with a bias;
each weight and scale read by that one call only. `fuse_groups` rewrites a copy of a
graph module: each group becomes one call on new inputs (the concatenated weight,
scale and bias, appended after the graph's inputs, group by group), whose output is
sliced back into the members' outputs. A member output a `view` read becomes a
`reshape` (a slice along the last dim may not be viewable). 4-bit W4A4 / W4A8 / W4A16 calls
are not fused: their per-tensor global scales and low-rank branches differ per layer.
Pre: a lowered graph whose weights are placeholders. Post: the fused graph computes
the same values (each output column is the same dot product).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import fx

logger = logging.getLogger(__name__)

_ops = torch.ops.qcompile
# op → index of the weight among its args; the args before it are the activation
# (x, or x_q and x_scale); the scale and bias follow the weight; the rest are static.
WEIGHT_INDEX = {
    _ops.linear_int8_wo.default: 1,
    _ops.linear_fp8_wo.default: 1,
    _ops.linear_int4_wo.default: 1,
    _ops.linear_int8_w8a8.default: 2,
    _ops.linear_fp8_w8a8.default: 2,
}


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """Linears fused into one GEMM: their op nodes, and per fused operand (weight,
    scale, then bias if they have one) the members' placeholder names, in row order."""

    nodes: tuple[str, ...]
    operands: tuple[tuple[str, ...], ...]
    rows: tuple[int, ...]  # output features per member

    @property
    def has_bias(self) -> bool:
        return len(self.operands) == 3


def find_groups(graph: fx.Graph) -> list[RowGroup]:
    """The fusable groups of `graph` (two or more members each), in graph order."""
    candidates: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        key = _group_key(node)
        if key is not None:
            candidates.setdefault(key, []).append(node)
    groups = []
    for members in candidates.values():
        if len(members) < 2:
            continue
        w = WEIGHT_INDEX[members[0].target]
        count = 3 if members[0].args[w + 2] is not None else 2
        operands = tuple(tuple(m.args[w + i].name for m in members) for i in range(count))
        rows = tuple(m.args[w].meta["val"].shape[0] for m in members)
        groups.append(RowGroup(tuple(m.name for m in members), operands, rows))
    return groups


def _group_key(node: fx.Node) -> tuple | None:
    """What members of one group share, or None when `node` cannot join one."""
    if node.op != "call_function" or node.target not in WEIGHT_INDEX:
        return None
    w = WEIGHT_INDEX[node.target]
    weight, scale, bias = node.args[w : w + 3]
    operands = [t for t in (weight, scale, bias) if t is not None]
    if not all(isinstance(t, fx.Node) and t.op == "placeholder" for t in operands):
        return None
    if any(len(t.users) != 1 for t in operands[:2]):
        return None  # a weight read twice would be a member of two groups
    vals = [t.meta.get("val") for t in operands]
    if any(v is None for v in vals) or vals[1].dim() == 0:
        return None
    if vals[1].shape[0] != vals[0].shape[0]:
        return None  # a per-tensor scale does not concatenate by rows
    layouts = tuple((v.dtype, tuple(v.shape[1:])) for v in vals)
    return (node.target, tuple(node.args[:w]), tuple(node.args[w + 3 :]), layouts)


def fuse_groups(gm: fx.GraphModule, groups: list[RowGroup]) -> fx.GraphModule:
    """A copy of `gm` computing each group with one call; it takes each group's
    concatenated operands (weight, scale[, bias]), group by group, after its inputs."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {node.name: node for node in graph.nodes}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for index, group in enumerate(groups):
        fused_inputs = []
        for kind, _ in zip(("weight", "scale", "bias"), group.operands, strict=False):
            with graph.inserting_after(last):
                last = graph.placeholder(f"fused_{index}_{kind}")
            fused_inputs.append(last)
        members = [nodes[name] for name in group.nodes]
        first = members[0]
        w = WEIGHT_INDEX[first.target]
        bias = fused_inputs[2] if group.has_bias else None
        args = (*first.args[:w], fused_inputs[0], fused_inputs[1], bias, *first.args[w + 3 :])
        with graph.inserting_before(first):
            fused = graph.call_function(first.target, args)
        start, cursor = 0, fused
        for member, rows in zip(members, group.rows, strict=True):
            with graph.inserting_after(cursor):
                part = graph.call_function(
                    torch.ops.aten.slice.Tensor, (fused, -1, start, start + rows)
                )
            start, cursor = start + rows, part
            member.replace_all_uses_with(part)
            graph.erase_node(member)
            for user in list(part.users):
                if user.target is torch.ops.aten.view.default:
                    user.target = torch.ops.aten.reshape.default
    graph.lint()
    gm.recompile()
    logger.info(
        "fuse_horizontal: %d linears in %d GEMMs", sum(len(g.nodes) for g in groups), len(groups)
    )
    return gm
