"""W8A8 presets per family: quality, sharing, calibration rules, checkpoints, on-load."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import CalibrationError, QCompileConfig, RecipeError, runtime_of
from qcompile.render import op_counts
from qcompile.tiny import HELD_OUT

# Whole-model output SQNR (dB) vs float on a held-out batch-1 input; static presets
# calibrated on 4 batch-2 inputs of other seeds. Measured on torch 2.13 CPU; floors sit
# 0.5 dB below. Weight-only int8 for comparison: Flux 65.55, SD3 69.32, UNet 49.02.
W8A8_SQNR_DB = {
    ("flux", "int8-w8a8"): 55.3,  # measured 55.85
    ("flux", "fp8-w8a8"): 45.1,  # 45.62
    ("flux", "int8-dynamic"): 57.8,  # 58.39
    ("flux", "fp8-dynamic"): 44.9,  # 45.47
    ("sd3", "int8-w8a8"): 62.0,  # 62.57
    ("sd3", "fp8-w8a8"): 49.5,  # 50.09
    ("sd3", "int8-dynamic"): 63.7,  # 64.21
    ("sd3", "fp8-dynamic"): 49.4,  # 49.99
    ("unet", "int8-w8a8"): 38.5,  # 39.61; 39.00 on another CPU at 1 thread (xdist)
    ("unet", "fp8-w8a8"): 28.3,  # 28.80
    ("unet", "int8-dynamic"): 42.5,  # 43.05
    ("unet", "fp8-dynamic"): 29.4,  # 29.99
}
# Activation-quant nodes vs W8A8 GEMMs: linears reading one tensor share one node.
# Flux: per double block q/k/v (3→1) and add_q/k/v (3→1); per single block q/k/v and
# proj_mlp (4→1): 40 GEMMs, 26 nodes. SD3 25 → 17. UNet 96 → 65 (q/k/v of self-attn
# 3→1, k/v of cross-attn 2→1 per transformer block).
SHARING = {"flux": (40, 26), "sd3": (25, 17), "unet": (96, 65)}


def _calibration(model, held_out):
    return [held_out(model, batch=2, seed=seed) for seed in range(10, 14)]


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family, recipe", sorted(W8A8_SQNR_DB))
def test_w8a8_sqnr_and_sharing(family, recipe):
    build, held_out = HELD_OUT[family]
    model = build()
    inputs = held_out(model)
    reference = _call(model, inputs)
    static = qcompile.get_recipe(recipe).needs_calibration
    qcompile.quantize(model, recipe, calibration=_calibration(model, held_out) if static else None)
    out = _call(model, inputs)
    runtime = runtime_of(model)
    assert runtime.last_path == "graph", runtime.last_reason
    assert qcompile.sqnr(reference, out) > W8A8_SQNR_DB[family, recipe]
    counts = op_counts(runtime.program)
    gemms = sum(v for k, v in counts.items() if k.endswith("_w8a8"))
    act_nodes = sum(v for k, v in counts.items() if k.startswith("qcompile.quantize_act"))
    assert (gemms, act_nodes) == SHARING[family]
    with torch.no_grad():
        assert torch.equal(runtime.eager(**inputs, return_dict=False)[0], out)


def test_shared_observer_gives_one_scale_to_qkv():
    build, held_out = HELD_OUT["flux"]
    model = qcompile.quantize(build(), "int8-w8a8", calibration=_calibration(build(), held_out))
    scales = [
        model.get_submodule(f"transformer_blocks.0.attn.{n}").input_scale
        for n in ("to_q", "to_k", "to_v")
    ]
    assert scales[0] == scales[1] == scales[2] and scales[0] > 0


@pytest.mark.parametrize("recipe", ["int8-w8a8", "fp8-w8a8", "int8-dynamic", "fp8-dynamic"])
def test_w8a8_checkpoint_round_trip(recipe, tmp_path):
    build, held_out = HELD_OUT["sd3"]
    static = qcompile.get_recipe(recipe).needs_calibration
    calibration = _calibration(build(), held_out) if static else None
    model = qcompile.quantize(build(), recipe, calibration=calibration)
    inputs = held_out(model)
    expected = _call(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(_call(reloaded, inputs), expected)
    assert runtime_of(reloaded).last_path == "graph"
    layer = reloaded.get_submodule("transformer_blocks.0.attn.to_q")
    assert ("input_scale" in dict(layer.named_buffers())) == static


def test_static_recipe_without_calibration_is_told_what_to_do():
    build, _ = HELD_OUT["sd3"]
    with pytest.raises(RecipeError, match=r"pass calibration=.*'fp8-dynamic'"):
        qcompile.quantize(build(), "int8-w8a8")


def test_empty_calibration_is_an_error():
    build, _ = HELD_OUT["sd3"]
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        qcompile.quantize(build(), "int8-w8a8", calibration=[])


def test_nonfinite_calibration_is_named_or_skipped(caplog):
    build, held_out = HELD_OUT["sd3"]
    calibration = _calibration(build(), held_out)
    calibration[2]["encoder_hidden_states"][0, 3, 5] = float("inf")
    with pytest.raises(CalibrationError, match="sample 2: input 'encoder_hidden_states'"):
        qcompile.quantize(build(), "int8-w8a8", calibration=calibration)
    model = qcompile.quantize(build(), "int8-w8a8", calibration=calibration, skip_nonfinite=True)
    assert torch.isfinite(model.get_submodule("transformer_blocks.0.attn.to_q").input_scale)
    assert "sample 2" in caplog.text and "skipped" in caplog.text


def test_all_zero_activations_get_a_finite_scale():
    build, held_out = HELD_OUT["sd3"]
    calibration = [
        {k: torch.zeros_like(v) if k == "encoder_hidden_states" else v for k, v in s.items()}
        for s in _calibration(build(), held_out)
    ]
    model = qcompile.quantize(build(), "int8-w8a8", calibration=calibration)
    scale = model.get_submodule("transformer_blocks.0.attn.add_q_proj").input_scale
    assert torch.isfinite(scale) and scale > 0


def test_quantize_on_load_takes_dynamic_and_refuses_static(tmp_path):
    build, held_out = HELD_OUT["flux"]
    build().save_pretrained(tmp_path)
    model = type(build()).from_pretrained(
        tmp_path, quantization_config=QCompileConfig("fp8-dynamic")
    )
    in_memory = qcompile.quantize(build(), "fp8-dynamic")
    inputs = held_out(model)
    assert torch.equal(_call(model, inputs), _call(in_memory, inputs))
    with pytest.raises(
        RecipeError, match="static activation scales or smoothing, which need calibration"
    ):
        type(build()).from_pretrained(tmp_path, quantization_config=QCompileConfig("int8-w8a8"))
