"""Horizontal fusion: which linears fuse, the fused graph, its numerics and its storage."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.metrics import sqnr
from qcompile.passes.fuse_horizontal import WEIGHT_INDEX, find_groups, fuse_groups
from qcompile.tiny import HELD_OUT

# One GEMM over concatenated rows computes each output column with the same dot product
# as the member GEMM did; only a wrong row, scale or bias mapping would move it.
FUSED_VS_UNFUSED_DB = 100.0
RECIPES = ("int8-wo", "fp8-wo", "int4-wo", "int8-dynamic", "fp8-dynamic")


def _fresh(family: str, recipe: str):
    build, inputs_of = HELD_OUT[family]
    model = qcompile.quantize(build(), recipe)
    return model, qcompile.runtime_of(model), inputs_of(model, batch=2)


def _members(runtime) -> list[list[str]]:
    """Each group as its linears' FQNs."""
    targets = {s.arg.name: s.target for s in runtime.program.graph_signature.input_specs}
    return [[targets[n].removesuffix(".weight") for n in g.operands[0]] for g in runtime._groups]


def _run(model, runtime, inputs, fused: bool) -> torch.Tensor:
    runtime.horizontal_fusion = fused
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert runtime.last_path == "graph"
    return out


def test_groups_are_the_projections_reading_one_tensor():
    _, runtime, _ = _fresh("flux", "int8-dynamic")
    qkv = ["attn.to_q", "attn.to_k", "attn.to_v"]
    added = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    expected = []
    for i in range(2):
        expected += [[f"transformer_blocks.{i}.{n}" for n in names] for names in (qkv, added)]
    for i in range(2):
        expected.append([f"single_transformer_blocks.{i}.{n}" for n in ["proj_mlp", *qkv]])
    assert sorted(_members(runtime)) == sorted(expected)


def test_unet_cross_attention_keys_and_values_fuse_across_blocks():
    # every cross-attention to_k/to_v reads encoder_hidden_states itself
    _, runtime, _ = _fresh("unet", "int8-wo")
    widest = max(_members(runtime), key=len)
    assert len(widest) == 16
    assert all(fqn.endswith(("attn2.to_k", "attn2.to_v")) for fqn in widest)


def test_fused_graph_has_one_gemm_per_group_and_slices_back():
    _, runtime, _ = _fresh("flux", "int8-dynamic")
    gm = runtime.program.graph_module
    fused = fuse_groups(gm, runtime._groups)

    def gemms(graph):
        return [n for n in graph.nodes if n.op == "call_function" and n.target in WEIGHT_INDEX]

    members = sum(len(g.nodes) for g in runtime._groups)
    assert len(gemms(fused.graph)) == len(gemms(gm.graph)) - members + len(runtime._groups)
    slices = [
        n
        for n in fused.graph.nodes
        if n.target is torch.ops.aten.slice.Tensor and n.args[0].target in WEIGHT_INDEX
    ]
    assert len(slices) == members
    assert all(u.target is not torch.ops.aten.view.default for s in slices for u in s.users)
    # inputs: the program's, then weight, scale and bias per group
    inputs = [n.name for n in fused.graph.nodes if n.op == "placeholder"]
    added = inputs[len([n for n in gm.graph.nodes if n.op == "placeholder"]) :]
    assert added[:3] == ["fused_0_weight", "fused_0_scale", "fused_0_bias"]
    assert len(added) == 3 * len(runtime._groups)


def test_four_bit_w4a4_and_w4a16_calls_are_not_grouped():
    for recipe in ("nvfp4", "svdq-w4a16"):
        _, runtime, _ = _fresh("flux", recipe)
        assert find_groups(runtime.program.graph) == []


# every fusable op on Flux; the other families' groups (SD3's, the UNet's 16-wide one)
# with one recipe each
CASES = [("flux", r) for r in RECIPES] + [("sd3", "int8-dynamic"), ("unet", "int4-wo")]


@pytest.mark.parametrize(("family", "recipe"), CASES)
def test_fused_graph_matches_the_unfused_one(family, recipe):
    model, runtime, inputs = _fresh(family, recipe)
    assert runtime._groups
    unfused = _run(model, runtime, inputs, fused=False)
    fused = _run(model, runtime, inputs, fused=True)
    assert any(len(key) == 3 for key in runtime._graph_modules)  # the fused variant ran
    assert sqnr(unfused, fused) > FUSED_VS_UNFUSED_DB


def test_members_become_row_views_of_one_tensor_and_the_model_holds_no_more_bytes():
    model, runtime, inputs = _fresh("flux", "int8-wo")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, runtime, inputs, fused=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    attn = model.transformer_blocks[0].attn
    storages = {attn.to_q.weight.untyped_storage().data_ptr()}
    storages |= {attn.to_k.weight.untyped_storage().data_ptr()}
    assert len(storages) == 1
    distinct = {}
    for tensor in model.buffers():
        distinct[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    assert sum(distinct.values()) == sum(t.nbytes for t in model.buffers())


def test_a_replaced_member_buffer_rebuilds_its_group():
    model, runtime, inputs = _fresh("sd3", "int8-wo")
    first = _run(model, runtime, inputs, fused=True)
    to_v = model.transformer_blocks[0].attn.to_v
    to_v.weight = -to_v.weight.clone()  # a new tensor the group has not seen
    second = _run(model, runtime, inputs, fused=True)
    eager = runtime.eager(**inputs, return_dict=False)[0]
    assert sqnr(eager, second) > FUSED_VS_UNFUSED_DB
    assert sqnr(first, second) < 40  # the edit is visible
    to_q = model.transformer_blocks[0].attn.to_q
    assert to_v.weight.untyped_storage().data_ptr() == to_q.weight.untyped_storage().data_ptr()


def test_an_in_place_edit_of_a_member_is_seen_by_the_fused_gemm():
    model, runtime, inputs = _fresh("sd3", "int8-dynamic")
    first = _run(model, runtime, inputs, fused=True)
    with torch.no_grad():
        model.transformer_blocks[0].attn.to_v.weight_scale.mul_(-4.0)
    second = _run(model, runtime, inputs, fused=True)
    eager = runtime.eager(**inputs, return_dict=False)[0]
    assert sqnr(eager, second) > FUSED_VS_UNFUSED_DB
    assert sqnr(first, second) < 40


def test_a_member_bias_changed_in_place_reaches_the_fused_bias():
    model, runtime, inputs = _fresh("flux", "fp8-wo")
    _run(model, runtime, inputs, fused=True)
    with torch.no_grad():
        model.single_transformer_blocks[0].proj_mlp.bias.add_(1.0)
    fused = _run(model, runtime, inputs, fused=True)
    eager = runtime.eager(**inputs, return_dict=False)[0]
    assert sqnr(eager, fused) > FUSED_VS_UNFUSED_DB


def test_save_and_reload_of_a_fused_model(tmp_path):
    model, runtime, inputs = _fresh("flux", "int4-wo")
    out = _run(model, runtime, inputs, fused=True)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    again = _run(reloaded, qcompile.runtime_of(reloaded), inputs, fused=True)
    assert torch.equal(out, again)


def test_turning_fusion_off_runs_the_unfused_graph():
    model, runtime, inputs = _fresh("flux", "int8-wo")
    _run(model, runtime, inputs, fused=False)
    assert all(len(key) == 2 for key in runtime._graph_modules)
