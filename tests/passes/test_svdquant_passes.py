"""Graph diffs of smooth → fold_lowrank → lower: golden text, op counts, numerics."""

from __future__ import annotations

import copy

import pytest
import torch
from expecttest import assert_expected_inline

from qcompile import get_recipe, sqnr
from qcompile.capture import capture
from qcompile.matcher import CallMatcher
from qcompile.passes import annotate_linears, fold_lowrank, lower_linears, quantize_weights, smooth
from qcompile.passes.meta import LOWRANK_OF
from qcompile.passes.observe_activations import observe_activations
from qcompile.render import op_counts, render_graph

from .blocks import AttentionBlock, block_inputs

# `smooth` and `fold_lowrank` rewrite the float program into one computing the same
# function: only float32 rounding differs (x / s · (W·s)ᵀ; the SVD's up·down + residual).
# Measured 136.6 dB for smooth, 131.3 dB for smooth + fold on this block (fp32 CPU).
REWRITE_EXACT_DB = 110.0
# The lowered svdq-w4a4 block vs float, measured 21.58 dB (K = 32, 64: one group per row).
BLOCK_W4A4_DB = 21.0
LINEARS = 6  # to_q, to_k, to_v, to_out, ff_in, ff_out (embed is excluded)


def _qcompile_and_linear_lines(program) -> str:
    keep = ("qcompile", "aten.linear", "aten.add(f32[s0, s1, 32], f32[s0, s1, 32])")
    return "\n".join(line for line in render_graph(program).splitlines() if line.startswith(keep))


@pytest.fixture
def block():
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    with torch.no_grad():
        model.norm.weight[:2] = 20.0  # two outlier channels in the norm's output
    captured = capture(model, block_inputs())
    program = captured.program
    annotate_linears(program, get_recipe("svdq-w4a4").replace(exclude=("embed",)))
    _, stats = observe_activations(
        program, [block_inputs(batch=3), block_inputs(batch=2)], CallMatcher(captured)
    )
    return program, stats


def _run(program, inputs):
    with torch.no_grad():
        return program.module()(**inputs)


def test_smooth_divides_each_input_and_scales_each_weight(block):
    program, stats = block
    inputs = block_inputs(batch=1, tokens=7)
    before, counts_before = _run(program, inputs), op_counts(program)
    alphas = smooth(program, stats, get_recipe("svdq-w4a4").smooth)
    assert alphas == dict.fromkeys(alphas, 0.5) and len(alphas) == LINEARS
    assert_expected_inline(
        _qcompile_and_linear_lines(program),
        """\
aten.linear(f32[s0, 8], f32[32, 8], f32[32]) -> f32[s0, 32]
qcompile.smooth(f32[s0, s1, 32], f32[32]) -> f32[s0, s1, 32]
aten.linear(f32[s0, s1, 32], f32[32, 32], f32[32]) -> f32[s0, s1, 32]
qcompile.smooth(f32[s0, s1, 32], f32[32]) -> f32[s0, s1, 32]
aten.linear(f32[s0, s1, 32], f32[32, 32]) -> f32[s0, s1, 32]
qcompile.smooth(f32[s0, s1, 32], f32[32]) -> f32[s0, s1, 32]
aten.linear(f32[s0, s1, 32], f32[32, 32], f32[32]) -> f32[s0, s1, 32]
qcompile.smooth(f32[s0, s1, 32], f32[32]) -> f32[s0, s1, 32]
aten.linear(f32[s0, s1, 32], f32[32, 32], f32[32]) -> f32[s0, s1, 32]
aten.add(f32[s0, s1, 32], f32[s0, s1, 32]) -> f32[s0, s1, 32]
qcompile.smooth(f32[s0, s1, 32], f32[32]) -> f32[s0, s1, 32]
aten.linear(f32[s0, s1, 32], f32[64, 32], f32[64]) -> f32[s0, s1, 64]
qcompile.smooth(f32[s0, s1, 64], f32[64]) -> f32[s0, s1, 64]
aten.linear(f32[s0, s1, 64], f32[32, 64], f32[32]) -> f32[s0, s1, 32]
aten.add(f32[s0, s1, 32], f32[s0, s1, 32]) -> f32[s0, s1, 32]""",
    )
    counts = op_counts(program)
    # One division per smoothed linear: q, k and v read one tensor but each has its own s.
    assert counts["qcompile.smooth"] == LINEARS
    assert counts["aten.linear"] == counts_before["aten.linear"]  # nothing else changes
    assert sqnr(before, _run(program, inputs)) > REWRITE_EXACT_DB
    # The outlier channels are divided by the largest factors.
    factors = program.state_dict["to_q.smooth"]
    assert set(factors.topk(2).indices.tolist()) == {0, 1}


def test_fold_lowrank_adds_a_branch_per_linear(block):
    program, stats = block
    inputs = block_inputs(batch=1, tokens=7)
    before, counts_before = _run(program, inputs), op_counts(program)
    smooth(program, stats, get_recipe("svdq-w4a4").smooth)
    folded = fold_lowrank(program)
    assert len(folded) == LINEARS
    counts = op_counts(program)
    # Each branch: down linear + up linear + the add that joins it to the main linear.
    assert counts["aten.linear"] == counts_before["aten.linear"] + 2 * LINEARS
    assert counts["aten.add"] == counts_before["aten.add"] + LINEARS
    assert sum(LOWRANK_OF in n.meta for n in program.graph.nodes) == 3 * LINEARS
    # rank 32 capped at min(N, K) / 4: 8 for every layer of this 32/64-wide block
    assert program.state_dict["to_q.lora_down"].shape == (8, 32)
    assert program.state_dict["ff_in.lora_up"].shape == (64, 8)
    assert sqnr(before, _run(program, inputs)) > REWRITE_EXACT_DB


def test_lowering_fuses_smooth_branch_and_linear_into_one_op(block):
    program, stats = block
    inputs = block_inputs(batch=1, tokens=7)
    float_program = copy.deepcopy(program)
    smooth(program, stats, get_recipe("svdq-w4a4").smooth)
    fold_lowrank(program)
    lower_linears(program, quantize_weights(program))
    assert_expected_inline(
        _qcompile_and_linear_lines(program),
        """\
aten.linear(f32[s0, 8], f32[32, 8], f32[32]) -> f32[s0, 32]
qcompile.linear_w4a4(f32[s0, s1, 32], u8[32, 32], f32[32, 1], None, f32[32], f32[32], f32[8, 32], f32[32, 8], 'int4', 64) -> f32[s0, s1, 32]
qcompile.linear_w4a4(f32[s0, s1, 32], u8[32, 32], f32[32, 1], None, None, f32[32], f32[8, 32], f32[32, 8], 'int4', 64) -> f32[s0, s1, 32]
qcompile.linear_w4a4(f32[s0, s1, 32], u8[32, 32], f32[32, 1], None, f32[32], f32[32], f32[8, 32], f32[32, 8], 'int4', 64) -> f32[s0, s1, 32]
qcompile.linear_w4a4(f32[s0, s1, 32], u8[32, 32], f32[32, 1], None, f32[32], f32[32], f32[8, 32], f32[32, 8], 'int4', 64) -> f32[s0, s1, 32]
aten.add(f32[s0, s1, 32], f32[s0, s1, 32]) -> f32[s0, s1, 32]
qcompile.linear_w4a4(f32[s0, s1, 32], u8[64, 32], f32[64, 1], None, f32[64], f32[32], f32[8, 32], f32[64, 8], 'int4', 64) -> f32[s0, s1, 64]
qcompile.linear_w4a4(f32[s0, s1, 64], u8[32, 32], f32[32, 1], None, f32[32], f32[64], f32[8, 64], f32[32, 8], 'int4', 64) -> f32[s0, s1, 32]
aten.add(f32[s0, s1, 32], f32[s0, s1, 32]) -> f32[s0, s1, 32]""",
    )
    counts = op_counts(program)
    assert counts["qcompile.linear_w4a4"] == LINEARS  # one op per linear, nothing beside it
    assert "qcompile.smooth" not in counts  # folded into the op
    assert counts["aten.linear"] == 1  # the excluded embedder
    assert not any(LOWRANK_OF in n.meta for n in program.graph.nodes)
    buffers = {s.target for s in program.graph_signature.input_specs if s.kind.name == "BUFFER"}
    assert {"to_q.weight", "to_q.weight_scale", "to_q.smooth", "to_q.lora_down"} <= buffers
    assert sqnr(_run(float_program, inputs), _run(program, inputs)) > BLOCK_W4A4_DB


def test_w4a16_branch_lowers_to_one_op_without_smoothing():
    model = AttentionBlock().eval()
    program = capture(model, block_inputs()).program
    annotate_linears(program, get_recipe("svdq-w4a16").replace(exclude=("embed",)))
    fold_lowrank(program)
    lower_linears(program, quantize_weights(program))
    counts = op_counts(program)
    assert counts["qcompile.linear_w4a16"] == LINEARS
    assert counts["aten.linear"] == 1 and "qcompile.smooth" not in counts
