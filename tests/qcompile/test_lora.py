"""LoRA on quantized models: adapters ride as a live 16-bit branch on the graph, never stale."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import qcompile
from qcompile import runtime_of
from qcompile.metrics import sqnr
from qcompile.modules import QuantizedLinear
from qcompile.tiny import HELD_OUT, tiny_flux_pipeline

from .models import flux_images

# int8/fp8 weight-only on the tiny Flux measure 40+ dB against float; a LoRA on top
# must not cost more than a few dB of that.
MIN_SQNR_WITH_LORA_DB = 30.0
# A fused adapter is re-quantized with the weight: int8 rounding of W + ΔW.
MIN_SQNR_FUSED_DB = 35.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _eager(model, inputs, **extra):
    """The same call through the module's own forward (peft's layers)."""
    runtime = runtime_of(model)
    runtime.graph_enabled = False
    try:
        return _call(model, {**inputs, **extra})
    finally:
        runtime.graph_enabled = True


def _assert_graph(model):
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason


# The graph's branch is peft's computation with each adapter's scaling folded into its
# up-projection: float32 rounding apart, the two paths agree.
MIN_SQNR_GRAPH_VS_PEFT_DB = 100.0


# One recipe per lowered op: int8 / fp8 / int4 weight-only, W8A8 (a shared
# activation-quantize node before the GEMM), W4A4 and the SVDQuant branch op.
@pytest.mark.parametrize(
    "recipe", ["int8-wo", "fp8-wo", "int4-wo", "int8-dynamic", "nvfp4", "svdq-w4a16"]
)
def test_adapters_ride_on_the_graph_and_match_peft(recipe):
    build, held_out = HELD_OUT["flux"]
    float_model, model = build(), qcompile.quantize(build(), recipe)
    inputs = held_out(model)
    base = _call(model, inputs)
    _assert_graph(model)
    torch.manual_seed(1)
    float_model.add_adapter(_lora_config())
    lora_state = get_peft_model_state_dict(float_model)
    model.add_adapter(_lora_config())
    set_peft_model_state_dict(model, lora_state)  # the same adapter weights
    with_lora = _call(model, inputs)
    _assert_graph(model)
    assert sqnr(_eager(model, inputs), with_lora) > MIN_SQNR_GRAPH_VS_PEFT_DB
    assert sqnr(with_lora, base) < 40  # the adapter does change the output
    if recipe in ("int8-wo", "fp8-wo"):
        assert sqnr(_call(float_model, inputs), with_lora) > MIN_SQNR_WITH_LORA_DB
    # a pipeline's LoRA scale reaches the branch
    half = {"joint_attention_kwargs": {"scale": 0.5}}
    scaled = _call(model, {**inputs, **half})
    _assert_graph(model)
    assert sqnr(_eager(model, inputs, **half), scaled) > MIN_SQNR_GRAPH_VS_PEFT_DB
    assert sqnr(scaled, with_lora) < 60
    model.disable_adapters()
    assert torch.equal(_call(model, inputs), base)
    _assert_graph(model)
    model.enable_adapters()
    assert torch.equal(_call(model, inputs), with_lora)
    model.delete_adapters("default")
    assert torch.equal(_call(model, inputs), base)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):  # unwrap, as unload_lora does
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    assert torch.equal(_call(model, inputs), base)
    _assert_graph(model)


def test_adapters_stay_16_bit_on_fp8_weights():
    model = qcompile.quantize(HELD_OUT["flux"][0](), "fp8-wo")
    model.add_adapter(_lora_config())
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer.base_layer, QuantizedLinear)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # not the fp8 codes'


def test_two_adapters_with_weights_and_what_the_graph_cannot_run():
    build, held_out = HELD_OUT["flux"]
    model = qcompile.quantize(build(), "int8-wo")
    inputs = held_out(model)
    torch.manual_seed(2)
    model.add_adapter(_lora_config(), adapter_name="a")
    model.add_adapter(
        LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "proj_mlp"], init_lora_weights=False),
        adapter_name="b",
    )
    model.set_adapters(["a", "b"], weights=[0.7, 1.3])
    both = _call(model, inputs)
    _assert_graph(model)
    assert sqnr(_eager(model, inputs), both) > MIN_SQNR_GRAPH_VS_PEFT_DB
    model.train()  # LoRA dropout would be active: peft's forward runs it
    model.get_submodule("transformer_blocks.0.attn.to_q").lora_dropout["a"] = torch.nn.Dropout(0.5)
    _call(model, inputs)
    assert runtime_of(model).last_path == "eager"
    assert "dropout" in runtime_of(model).last_reason
    model.eval()
    _call(model, inputs)
    _assert_graph(model)


def test_any_other_module_change_runs_eagerly_until_undone():
    build, held_out = HELD_OUT["flux"]
    model = qcompile.quantize(build(), "int8-wo")
    inputs = held_out(model)
    base = _call(model, inputs)
    block = model.transformer_blocks[0].attn
    original = block.to_q
    block.to_q = torch.nn.Sequential(original, torch.nn.Tanh())
    changed = _call(model, inputs)
    assert runtime_of(model).last_path == "eager"
    assert runtime_of(model).last_reason == qcompile.runtime.STALE
    assert not torch.equal(changed, base)  # the change is honoured, not silently dropped
    block.to_q = original
    assert torch.equal(_call(model, inputs), base)
    _assert_graph(model)


def _quantized_pipeline_and_lora():
    """A tiny Flux pipeline with an int8 transformer, and a diffusers-format LoRA."""
    pipe = tiny_flux_pipeline()
    donor = HELD_OUT["flux"][0]()
    donor.add_adapter(_lora_config())
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}
    qcompile.quantize(pipe.transformer, "int8-wo")
    return pipe, lora


def test_pipeline_lora_load_set_disable_unload_fuse():
    pipe, lora = _quantized_pipeline_and_lora()

    def images():
        return flux_images(pipe)

    base = images()
    pipe.load_lora_weights(lora, adapter_name="style")
    styled = images()
    _assert_graph(pipe.transformer)  # every denoising step ran the graph with the branch
    assert runtime_of(pipe.transformer).calls["eager"] == 0
    assert not torch.equal(styled, base)
    pipe.set_adapters(["style"], [0.0])
    assert torch.equal(images(), base)
    pipe.set_adapters(["style"], [1.0])
    assert torch.equal(images(), styled)
    pipe.disable_lora()
    assert torch.equal(images(), base)
    assert runtime_of(pipe.transformer).calls["eager"] == 0
    pipe.enable_lora()
    # fuse: the adapter is folded into the packed weights (re-quantized), so it survives
    # unloading the adapter layers and runs on the graph again
    pipe.fuse_lora()
    fused = images()
    assert sqnr(styled, fused) > MIN_SQNR_FUSED_DB
    pipe.unfuse_lora()
    assert torch.equal(images(), styled)  # the packed weights exactly as before
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert torch.equal(images(), fused)
    assert runtime_of(pipe.transformer).last_path == "graph"
    assert runtime_of(pipe.transformer).last_reason == ""


def test_unloading_an_unfused_adapter_restores_the_base_model():
    pipe, lora = _quantized_pipeline_and_lora()
    inputs = HELD_OUT["flux"][1](pipe.transformer)
    base = _call(pipe.transformer, inputs)
    pipe.load_lora_weights(lora)
    assert not torch.equal(_call(pipe.transformer, inputs), base)
    pipe.unload_lora_weights()
    assert torch.equal(_call(pipe.transformer, inputs), base)
    assert runtime_of(pipe.transformer).last_path == "graph"


def test_quantizing_a_model_with_adapters_is_refused():
    model = HELD_OUT["flux"][0]()
    model.add_adapter(_lora_config())
    with pytest.raises(qcompile.QCompileError, match="LoRA adapters"):
        qcompile.quantize(model, "int8-wo")


@pytest.mark.parametrize("recipe", ["int8-wo", "int4-wo", "fp8-wo"])
def test_backward_reaches_the_input_through_the_dequantized_weight(recipe):
    model = qcompile.quantize(HELD_OUT["flux"][0](), recipe)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    weight = layer.dequantized_weight()
    torch.nn.functional.linear(reference, weight, layer.bias).square().sum().backward()
    assert sqnr(reference.grad, x.grad) > MIN_SQNR_WITH_LORA_DB
    assert not any(p.requires_grad for p in layer.parameters())


# Re-quantization of W + ΔW against float W + ΔW, one tiny-Flux layer (measured on
# CPU: int8 45.2, fp8 33.0, int4 20.2, svdq-w4a16 28.3 dB).
MIN_SQNR_FUSED_FP8_DB = 25.0
MIN_SQNR_FUSED_4BIT_DB = 15.0
MIN_SQNR_FUSED_SVDQ_DB = 22.0


@pytest.mark.parametrize(
    ("recipe", "min_db"),
    [
        ("int8-wo", MIN_SQNR_FUSED_DB),
        ("fp8-wo", MIN_SQNR_FUSED_FP8_DB),
        ("int4-wo", MIN_SQNR_FUSED_4BIT_DB),
        ("svdq-w4a16", MIN_SQNR_FUSED_SVDQ_DB),
    ],
)
def test_fuse_delta_repacks_in_place_and_unfuse_restores_bitwise(recipe, min_db):
    model = qcompile.quantize(HELD_OUT["flux"][0](), recipe)
    layer = model.get_submodule("single_transformer_blocks.0.proj_mlp")
    before = {n: t.clone() for n, t in layer.quantized_tensors.items()}
    storage = {n: t.data_ptr() for n, t in layer.quantized_tensors.items()}
    x = torch.randn(5, layer.in_features)
    delta = 0.05 * torch.randn(layer.out_features, 4) @ torch.randn(4, layer.in_features)
    want = torch.nn.functional.linear(x, layer.dequantized_weight() + delta, layer.bias)
    layer.fuse_delta(delta)
    assert {n: t.data_ptr() for n, t in layer.quantized_tensors.items()} == storage  # in place
    with torch.no_grad():
        assert sqnr(want, layer(x)) > min_db
    layer.unfuse()
    assert all(torch.equal(before[n], t) for n, t in layer.quantized_tensors.items())


@pytest.mark.parametrize("recipe", ["int4-wo", "nvfp4"])
def test_pipeline_loads_a_lora_onto_4bit_packed_layers(recipe):
    pipe = tiny_flux_pipeline()
    donor = HELD_OUT["flux"][0]()
    donor.add_adapter(_lora_config())
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}
    qcompile.quantize(pipe.transformer, recipe)
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert layer.weight.shape[1] == layer.in_features // 2  # packed two per byte
    inputs = HELD_OUT["flux"][1](pipe.transformer)
    base = _call(pipe.transformer, inputs)
    pipe.load_lora_weights(lora)
    with_lora = _call(pipe.transformer, inputs)
    _assert_graph(pipe.transformer)
    assert sqnr(_eager(pipe.transformer, inputs), with_lora) > MIN_SQNR_GRAPH_VS_PEFT_DB
    assert sqnr(with_lora, base) < 40
    pipe.unload_lora_weights()
    assert torch.equal(_call(pipe.transformer, inputs), base)


def test_lora_loader_helpers_see_the_logical_shape_and_dequantize():
    from diffusers.loaders import lora_pipeline

    model = qcompile.quantize(HELD_OUT["flux"][0](), "int4-wo")
    layer = model.get_submodule("single_transformer_blocks.0.proj_mlp")
    shape = lora_pipeline.FluxLoraLoaderMixin._calculate_module_shape
    assert shape(model, base_module=layer) == (layer.out_features, layer.in_features)
    name = "single_transformer_blocks.0.proj_mlp.weight"
    assert shape(model, base_weight_param_name=name) == (layer.out_features, layer.in_features)
    float_layer = model.get_submodule("proj_out")  # kept 16-bit: diffusers' own answer
    assert shape(model, base_module=float_layer) == float_layer.weight.shape
    weight = lora_pipeline._maybe_dequantize_weight_for_expanded_lora(model, layer)
    assert torch.equal(weight, layer.dequantized_weight())
