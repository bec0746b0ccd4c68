"""Graph diff of `share_quantize`: one activation quantization per (tensor, scheme)."""

from __future__ import annotations

import torch
from expecttest import assert_expected_inline
from torch import fx

import qcompile  # noqa: F401 - defines torch.ops.qcompile
from qcompile.passes.share_quantize import share_quantize

Q = torch.ops.qcompile


def _three_projections(x, w, s, scale):
    """q/k/v read one tensor and each quantizes it, as a traced forward does; a fourth
    linear quantizes another tensor, and a static quantize of x has other arguments."""
    q, k, v = (_linear(x, w, s) for _ in range(3))
    o = _linear(torch.relu(q + k + v), w, s)
    static = Q.quantize_act_static(x, scale, torch.int8)
    unused = Q.quantize_act_dynamic(o, torch.int8)  # noqa: F841 - dead: removed
    return o, static


def _linear(x, w, s):
    pair = Q.quantize_act_dynamic(x, torch.int8)
    return Q.linear_int8_w8a8(pair[0], pair[1], w, s, None, torch.float32)


def _render(graph: fx.Graph) -> str:
    names = {}
    lines = []
    for node in graph.nodes:
        if node.op != "call_function":
            names[node] = node.name
            continue
        names[node] = f"v{len(lines)}"
        target = getattr(node.target, "__name__", str(node.target)).split(".")[-1]
        args = ", ".join(names.get(a, repr(a)) for a in node.args)
        lines.append(f"{names[node]} = {target}({args})")
    return "\n".join(lines)


def test_duplicate_quantizations_of_one_tensor_become_one():
    gm = fx.symbolic_trace(_three_projections)
    x, w = torch.randn(4, 8), torch.randint(-127, 128, (8, 8), dtype=torch.int8)
    s, scale = torch.rand(8) / 100, torch.tensor(0.02)
    before = gm(x, w, s, scale)
    removed = share_quantize(gm.graph)
    gm.recompile()
    assert removed == 2
    assert_expected_inline(
        _render(gm.graph),
        """\
v0 = quantize_act_dynamic(x, torch.int8)
v1 = getitem(v0, 0)
v2 = getitem(v0, 1)
v3 = linear_int8_w8a8(v1, v2, w, s, None, torch.float32)
v4 = linear_int8_w8a8(v1, v2, w, s, None, torch.float32)
v5 = linear_int8_w8a8(v1, v2, w, s, None, torch.float32)
v6 = add(v3, v4)
v7 = add(v6, v5)
v8 = relu(v7)
v9 = quantize_act_dynamic(v8, torch.int8)
v10 = getitem(v9, 0)
v11 = getitem(v9, 1)
v12 = linear_int8_w8a8(v10, v11, w, s, None, torch.float32)
v13 = quantize_act_static(x, scale, torch.int8)""",
    )
    after = gm(x, w, s, scale)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_fuse_act_quant_hands_each_quantization_to_its_reference_ops():
    from qcompile.passes.fuse_act_quant import fuse_act_quant

    gm = fx.symbolic_trace(_three_projections)
    x, w = torch.randn(4, 8), torch.randint(-127, 128, (8, 8), dtype=torch.int8)
    s, scale = torch.rand(8) / 100, torch.tensor(0.02)
    before = gm(x, w, s, scale)
    share_quantize(gm.graph)
    assert fuse_act_quant(gm.graph) == 3  # two dynamic (x, relu) and one static
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(getattr(t, "namespace", "") == "qcompile" and "quantize" in str(t)
                   for t in targets)  # fmt: skip
    assert sum(getattr(t, "__module__", "").endswith("reference.act") for t in targets) == 3
    # the reference is the ops' definition: bitwise the same values on the CPU
    after = gm(x, w, s, scale)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
