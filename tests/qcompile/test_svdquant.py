"""4-bit presets per family: quality, checkpoints, quantize-on-load, alpha search."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import runtime_of, sqnr
from qcompile.errors import RecipeError
from qcompile.integrations.diffusers_config import QCompileConfig
from qcompile.modules import QuantizedLinear
from qcompile.recipes import SmoothSpec
from qcompile.svdquant import search_alpha, smooth_factors

from .models import FAMILIES

# Whole-model output SQNR vs float on the held-out batch-1 input; calibrated presets use
# 4 batch-2 inputs of other seeds. Measured on torch 2.13 CPU (flux / sd3 / unet):
# mxfp4-wo 33.61/37.41/18.08, nvfp4 33.90/37.43/17.26, svdq-w4a16 38.88/44.14/24.36,
# svdq-w4a4 36.06/42.57/21.42, svdq-nvfp4 36.35/42.94/22.74, svdq-w4a8 39.38/45.82/23.92;
# floors sit 0.5 dB below.
# (Tiny models are random-init: no trained outliers, so smoothing gains little here;
# benchmarks/svdquant_ablation.py measures it on an outlier model.)
MIN_SQNR_DB = {
    "flux": {
        "mxfp4-wo": 33.1,
        "nvfp4": 33.4,
        "svdq-w4a16": 38.3,
        "svdq-w4a4": 35.5,
        "svdq-w4a8": 38.8,
        "svdq-nvfp4": 35.8,
    },
    "sd3": {
        "mxfp4-wo": 36.9,
        "nvfp4": 36.9,
        "svdq-w4a16": 43.6,
        "svdq-w4a4": 42.0,
        "svdq-w4a8": 45.3,
        "svdq-nvfp4": 42.4,
    },
    "unet": {
        "mxfp4-wo": 17.5,
        "nvfp4": 16.7,
        "svdq-w4a16": 23.8,
        "svdq-w4a4": 20.9,
        "svdq-w4a8": 23.4,
        "svdq-nvfp4": 22.2,
    },
}
PRESETS = sorted(MIN_SQNR_DB["flux"])
# The single op each preset lowers a linear to.
FUSED_OP = {
    "mxfp4-wo": "linear_w4a16",
    "svdq-w4a16": "linear_w4a16",
    "nvfp4": "linear_w4a4",
    "svdq-w4a4": "linear_w4a4",
    "svdq-w4a8": "linear_w4a8",
    "svdq-nvfp4": "linear_w4a4",
}


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _calibration(model, held_out):
    return [held_out(model, batch=2, seed=seed) for seed in range(10, 14)]


@pytest.mark.parametrize("recipe", PRESETS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preset_quality_one_op_per_linear_and_round_trip(family, recipe, tmp_path):
    build, held_out = FAMILIES[family]
    model = build()
    inputs = held_out(model)
    reference = _call(model, inputs)
    needs = qcompile.get_recipe(recipe).needs_calibration
    qcompile.quantize(model, recipe, calibration=_calibration(model, held_out) if needs else None)
    out = _call(model, inputs)
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason
    assert sqnr(reference, out) >= MIN_SQNR_DB[family][recipe]
    # One fused op per quantized linear; the branch and the smoothing live inside it.
    program = runtime_of(model).program
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum(FUSED_OP[recipe] in t for t in targets) == len(model.qcompile_state.schemes)
    assert not any("qcompile.smooth" in t for t in targets)
    if family != "flux":  # the UNet's and SD3's tensors are the same kinds as Flux's
        return
    # Every new tensor is saved by FQN and reloads to the same outputs, bit for bit.
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.qcompile_state.schemes == model.qcompile_state.schemes
    assert torch.equal(_call(reloaded, inputs), out)
    assert runtime_of(reloaded).last_path == "graph", runtime_of(reloaded).last_reason
    assert torch.equal(_call(qcompile.load(tmp_path).module(), inputs), out)


def test_svdquant_bf16_tensors_keep_their_dtypes_through_a_round_trip(tmp_path):
    build, held_out = FAMILIES["flux"]
    model = build(dtype=torch.bfloat16)

    def bf16(batch=1, seed=1):
        raw = held_out(model, batch=batch, seed=seed)
        return {
            k: v.to(torch.bfloat16) if v.is_floating_point() and k != "guidance" else v
            for k, v in raw.items()
        }

    qcompile.quantize(model, "svdq-w4a4", calibration=[bf16(2, s) for s in (3, 4)])
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    assert layer.smooth.dtype == torch.float32 and layer.smooth.shape == (64,)
    assert layer.lora_down.dtype == torch.bfloat16 and layer.lora_down.shape == (16, 64)
    assert layer.lora_up.shape == (64, 16)  # rank 32 capped at min(N, K) / 4
    inputs = bf16()
    expected = _call(model, inputs)
    assert runtime_of(model).last_path == "graph"
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    again = reloaded.get_submodule("transformer_blocks.0.attn.to_q")
    assert again.lora_down.dtype == torch.bfloat16 and again.smooth.dtype == torch.float32
    assert torch.equal(_call(reloaded, inputs), expected)


@pytest.mark.parametrize("recipe", ["svdq-w4a16", "nvfp4", "mxfp4-wo"])
def test_quantize_on_load_matches_in_memory(recipe, tmp_path):
    build, held_out = FAMILIES["flux"]
    build().save_pretrained(tmp_path / "float")
    in_memory = qcompile.quantize(build(), recipe)
    inputs = held_out(in_memory)
    model = type(in_memory).from_pretrained(
        tmp_path / "float", quantization_config=QCompileConfig(recipe)
    )
    assert model.qcompile_state.schemes == in_memory.qcompile_state.schemes
    assert torch.equal(_call(model, inputs), _call(in_memory, inputs))
    assert runtime_of(model).last_path == "graph"


def test_quantize_on_load_refuses_smoothing_with_the_fix(tmp_path):
    build, _ = FAMILIES["sd3"]
    build().save_pretrained(tmp_path)
    with pytest.raises(RecipeError, match=r"calibration.*svdq-w4a16"):
        type(build()).from_pretrained(tmp_path, quantization_config=QCompileConfig("svdq-w4a4"))


def test_smoothing_without_calibration_is_told_what_to_do():
    build, _ = FAMILIES["flux"]
    with pytest.raises(RecipeError, match=r"smoothing.*pass calibration="):
        qcompile.quantize(build(), "svdq-w4a4")


def test_dequantize_folds_branch_and_smoothing_back():
    build, held_out = FAMILIES["sd3"]
    model = build()
    inputs = held_out(model)
    qcompile.quantize(model, "svdq-w4a4", calibration=_calibration(model, held_out))
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(7, layer.in_features)
    # The W4A16 weight the layer stands for: its output on x, minus activation rounding.
    weight = layer.dequantized_weight()
    smoothed = x / layer.smooth
    exact_activation = torch.ops.qcompile.linear_w4a16(
        smoothed,
        layer.weight,
        layer.weight_scale,
        None,
        layer.bias,
        layer.lora_down,
        layer.lora_up,
        "int4",
        64,
    )
    assert sqnr(exact_activation, torch.nn.functional.linear(x, weight, layer.bias)) > 100
    qcompile.dequantize(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert torch.equal(model.get_submodule("transformer_blocks.0.attn.to_q").weight, weight)
    _call(model, inputs)


def test_alpha_search_is_bounded_and_never_worse_than_the_fixed_alpha():
    torch.manual_seed(0)
    weight = torch.randn(96, 128) / 128**0.5
    rows = torch.randn(1000, 128)
    rows[:, :3] *= 40  # outlier channels
    scheme = qcompile.get_recipe("svdq-w4a4").scheme_for(96, 128)
    spec = SmoothSpec(search=(0.3, 0.5, 0.7), search_rows=200)
    found = search_alpha(weight, rows.abs().amax(0), rows, scheme, spec)
    assert found.rows == 200  # ≤ search_rows of the cached rows, whatever is cached
    assert sorted(found.sqnr_db) == [0.3, 0.5, 0.7]  # one trial per grid point, no more
    assert found.alpha in spec.search
    assert found.sqnr_db[found.alpha] == max(found.sqnr_db.values())
    assert found.sqnr_db[found.alpha] >= found.sqnr_db[0.5]


def test_alpha_search_runs_inside_quantize():
    build, held_out = FAMILIES["sd3"]
    model = build()
    recipe = qcompile.get_recipe("svdq-w4a4").replace(
        name="svdq-w4a4-search", smooth=SmoothSpec(search=(0.4, 0.6), search_rows=64)
    )
    inputs = held_out(model)
    reference = _call(model, inputs)
    qcompile.quantize(model, recipe, calibration=_calibration(model, held_out))
    assert sqnr(reference, _call(model, inputs)) >= MIN_SQNR_DB["sd3"]["svdq-w4a4"] - 1.0


def test_smooth_factors_follow_the_formula_and_leave_dead_channels_alone():
    weight = torch.tensor([[1.0, 4.0, 0.0], [-2.0, 1.0, 0.0]])
    act = torch.tensor([8.0, 1.0, 5.0])
    s = smooth_factors(act, weight, 0.5)
    assert torch.allclose(s[:2], torch.tensor([(8.0 / 2.0) ** 0.5, (1.0 / 4.0) ** 0.5]))
    assert s[2] == 1.0  # a zero weight column: nothing to migrate into


def test_randomized_svd_for_wide_layers_is_deterministic_and_close_to_exact():
    from qcompile.svdquant import lowrank_split

    gen = torch.Generator().manual_seed(5)
    # rank-8 structure plus noise, wider than the exact-SVD limit (1024)
    weight = torch.randn(1040, 8, generator=gen) @ torch.randn(8, 1100, generator=gen)
    weight += 0.01 * torch.randn(1040, 1100, generator=gen)
    down, up, residual = lowrank_split(weight, 8, torch.float32)
    again = lowrank_split(weight, 8, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip((down, up, residual), again, strict=True))
    assert torch.equal(residual, weight - up @ down)
    # the branch takes the structure: what is left is the noise (|noise|² ≈ 1e-4 per entry)
    assert residual.pow(2).mean() < 1.1e-4
