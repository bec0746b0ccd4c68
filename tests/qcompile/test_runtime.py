"""The graph runtime: which path each call takes, and that both give the same output."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import runtime_of
from qcompile.metrics import sqnr
from qcompile.tiny import tiny_flux, tiny_flux_pipeline, tiny_sdxl_pipeline, tiny_unet

from .models import flux_eval_inputs, flux_images, unet_eval_inputs

# Tiny FluxPipeline, 2 steps, 32×32: image from the int8-wo transformer vs the float
# one (text encoders in eval mode: the pipeline is deterministic). Measured 78.09 dB
# (float32) and 43.87 dB (bfloat16) on torch 2.13 CPU; floors 0.5 dB below.
PIPELINE_IMAGE_SQNR_DB = {torch.float32: 77.5, torch.bfloat16: 43.3}


@pytest.fixture(scope="module")
def flux():
    return qcompile.quantize(tiny_flux(), "int8-wo")


def _call(model, **inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _assert_path(model, path):
    runtime = runtime_of(model)
    assert runtime.last_path == path, runtime.last_reason


@pytest.mark.parametrize(
    "sizes",
    [
        dict(batch=1, rows=6, cols=6, text=11),  # FluxPipeline's batch 1, other resolution
        dict(batch=3, rows=3, cols=7, text=2),
        dict(batch=2, rows=4, cols=5, text=7),  # the capture's own sizes
    ],
)
def test_matching_calls_run_the_graph_and_equal_eager(flux, sizes):
    inputs = flux_eval_inputs(flux, **sizes)
    out = _call(flux, **inputs)
    _assert_path(flux, "graph")
    with torch.no_grad():
        eager = runtime_of(flux).eager(**inputs, return_dict=False)[0]
    assert torch.equal(out, eager)


def test_uncaptured_argument_falls_back_to_eager(flux):
    inputs = flux_eval_inputs(flux)
    graph_out = _call(flux, **inputs)
    out = _call(flux, **inputs, joint_attention_kwargs={"scale": 1.0, "unused": 0})
    _assert_path(flux, "eager")
    assert "joint_attention_kwargs" in runtime_of(flux).last_reason
    assert torch.equal(out, graph_out)


def test_lora_scale_alone_stays_on_the_graph(flux):
    # Pipelines pass joint_attention_kwargs={"scale": lora_scale}; without LoRA layers
    # (the only case the graph runs) it changes nothing.
    inputs = flux_eval_inputs(flux)
    graph_out = _call(flux, **inputs)
    assert torch.equal(_call(flux, **inputs, joint_attention_kwargs={"scale": 0.5}), graph_out)
    _assert_path(flux, "graph")


def test_empty_kwargs_dict_counts_as_unset(flux):
    inputs = flux_eval_inputs(flux)
    out = _call(flux, **inputs, joint_attention_kwargs={})  # what FluxPipeline passes
    _assert_path(flux, "graph")
    with torch.no_grad():
        eager = runtime_of(flux).eager(**inputs, return_dict=False, joint_attention_kwargs={})[0]
    assert torch.equal(out, eager)


def test_other_dtype_falls_back_to_eager(flux):
    inputs = flux_eval_inputs(flux)
    graph_out = _call(flux, **inputs)
    inputs["timestep"] = inputs["timestep"].double()
    out = _call(flux, **inputs)
    _assert_path(flux, "eager")
    assert "torch.float64" in runtime_of(flux).last_reason
    torch.testing.assert_close(out, graph_out)


def test_return_dict_true_wraps_the_graph_output(flux):
    inputs = flux_eval_inputs(flux)
    with torch.no_grad():
        out = flux(**inputs)
    _assert_path(flux, "graph")
    assert type(out).__name__ == "Transformer2DModelOutput"
    assert torch.equal(out.sample, _call(flux, **inputs))


def test_disabled_graph_runs_eager(flux):
    runtime = runtime_of(flux)
    inputs = flux_eval_inputs(flux)
    runtime.graph_enabled = False
    try:
        out = _call(flux, **inputs)
        _assert_path(flux, "eager")
    finally:
        runtime.graph_enabled = True
    assert torch.equal(out, _call(flux, **inputs))


def test_unet_out_of_range_and_guarded_calls_fall_back():
    unet = qcompile.quantize(tiny_unet(), "int8-wo")
    _call(unet, **unet_eval_inputs(unet, batch=1))
    _assert_path(unet, "graph")
    # UNet2DConditionModel branches on batch >= 64: captured range is [1, 63].
    big = _call(unet, **unet_eval_inputs(unet, batch=64, height=8, width=8))
    _assert_path(unet, "eager")
    assert "outside its captured range [1, 63]" in runtime_of(unet).last_reason
    assert big.shape == (64, 4, 8, 8)
    # An odd height fails torch.export's divisibility guard; eager upsamples to size.
    odd = _call(unet, **unet_eval_inputs(unet, height=17, width=20))
    _assert_path(unet, "eager")
    assert "guard failed" in runtime_of(unet).last_reason
    assert odd.shape == (1, 4, 17, 20)


def test_dtype_cast_is_refused_like_any_diffusers_quantized_model():
    model = qcompile.quantize(tiny_flux(), "fp8-wo")
    with pytest.raises(ValueError, match=r"from torch\.float32 to torch\.bfloat16 is unsupported"):
        model.to(torch.bfloat16)
    for cast in (model.half, model.float):  # diffusers' own refusals stay
        with pytest.raises(ValueError, match="not supported for quantized model"):
            cast()


# The bf16 pipeline around an fp32 quantized transformer against the all-fp32 one: only
# the text encoders' and VAE's bf16 rounding differs (measured 44.8 dB on the tiny Flux).
MIN_SQNR_PIPELINE_CAST_DB = 20.0


def test_pipeline_cast_keeps_the_quantized_model_whole_and_working(caplog):
    pipe = tiny_flux_pipeline()
    qcompile.quantize(pipe.transformer, "int8-wo")
    float32_images = flux_images(pipe)
    with caplog.at_level("WARNING", logger="qcompile.api"):
        pipe.to(torch.bfloat16)
    assert "keeps that dtype" in caplog.text
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.transformer.dtype == torch.float32  # not half-cast: untouched
    images = flux_images(pipe)
    assert runtime_of(pipe.transformer).calls["eager"] == 0, runtime_of(
        pipe.transformer
    ).last_reason
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()
    assert sqnr(float32_images, images.float()) > MIN_SQNR_PIPELINE_CAST_DB
    pipe.to(torch.float32)
    assert runtime_of(pipe.transformer).io_dtype is None
    with pytest.raises(ValueError, match="unsupported"):
        pipe.transformer.to(torch.bfloat16)  # a direct cast stays refused


def test_quantized_linear_follows_device_moves_but_never_casts():
    model = qcompile.quantize(tiny_flux(), "fp8-wo")
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    torch.nn.Module.to(model, torch.bfloat16)  # what a plain nn.Module.to(dtype) does
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    out = _call(model, **flux_eval_inputs(model, dtype=torch.bfloat16))
    _assert_path(model, "eager")  # captured in float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_device_move_retargets_the_graph():
    model = qcompile.quantize(tiny_flux(), "int8-wo")
    model.to("meta")  # a device move with no data: the graph must follow it
    inputs = {
        k: v.to("meta") if isinstance(v, torch.Tensor) else v
        for k, v in flux_eval_inputs(model).items()
    }
    out = _call(model, **inputs)
    _assert_path(model, "graph")
    assert out.device.type == "meta" and out.shape == (1, 36, 16)
    assert model.get_submodule("transformer_blocks.0.attn.to_q").weight.dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux_pipeline_calls_take_the_graph(dtype):
    pipe = tiny_flux_pipeline(dtype=dtype)
    kwargs = dict(
        prompt="a photo of a cat",
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    reference = pipe(**kwargs).images
    qcompile.quantize(pipe.transformer, "int8-wo")
    kwargs["generator"] = torch.Generator().manual_seed(0)
    images = pipe(**kwargs).images
    runtime = runtime_of(pipe.transformer)
    assert runtime.calls == {"graph": 2}, runtime.last_reason
    assert pipe.transformer.dtype == dtype
    assert qcompile.sqnr(reference.float(), images.float()) > PIPELINE_IMAGE_SQNR_DB[dtype]


def test_integer_timesteps_stay_on_the_graph():
    # DDIM, DPM++, UniPC, LCM and TCD hand the UNet int64 timesteps (some pipelines a
    # Python int); the capture saw a float one. Cast at the boundary: exact, on graph.
    unet = qcompile.quantize(tiny_unet(), "int8-wo")
    inputs = unet_eval_inputs(unet)
    expected = _call(unet, **inputs)
    for timestep in (inputs["timestep"].long(), int(inputs["timestep"])):
        assert torch.equal(_call(unet, **{**inputs, "timestep": timestep}), expected)
        _assert_path(unet, "graph")


def test_sdxl_with_ddim_runs_every_step_on_the_graph():
    from diffusers import DDIMScheduler

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    qcompile.quantize(pipe.unet, "int8-wo")
    pipe("a cat", height=32, width=32, num_inference_steps=3, output_type="pt")
    assert runtime_of(pipe.unet).calls == {"graph": 3}, runtime_of(pipe.unet).last_reason


def test_a_call_leaving_the_graph_is_warned_once_naming_the_argument(caplog):
    # A dtype the capture did not see (here float64) runs eagerly: the user must learn
    # which argument, once, at warning level.
    unet = qcompile.quantize(tiny_unet(), "int8-wo")
    inputs = unet_eval_inputs(unet)
    inputs["timestep"] = inputs["timestep"].double()
    with caplog.at_level("WARNING", logger="qcompile.runtime"):
        _call(unet, **inputs)
        _call(unet, **inputs)
    _assert_path(unet, "eager")
    assert runtime_of(unet).last_reason.startswith("timestep is torch.float64")
    warnings = [r for r in caplog.records if "eager fallback" in r.getMessage()]
    assert len(warnings) == 1 and "timestep is torch.float64" in warnings[0].getMessage()


def test_compiled_denoising_loop_compiles_once_with_fullgraph():
    # torch.compile traces the module's forward (the same qcompile ops); the runtime's
    # Python bookkeeping must not become guards that recompile on every call.
    flux = qcompile.quantize(tiny_flux(), "int8-wo")
    inputs = flux_eval_inputs(flux)
    expected = [_call(flux, **{**inputs, "timestep": inputs["timestep"] * s}) for s in (1, 0.5)]
    torch._dynamo.reset()
    compiled = torch.compile(flux, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(2):
            for scale, want in zip((1, 0.5), expected, strict=True):
                step = {**inputs, "timestep": inputs["timestep"] * scale}
                got = compiled(**step, return_dict=False)[0]
                assert qcompile.sqnr(want, got) > COMPILED_SQNR_DB
    torch._dynamo.reset()


COMPILED_SQNR_DB = 60.0  # same ops, fp32; only the summation order may differ


def test_runtime_is_found_and_used_under_accelerate_hooks(flux):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    inputs = flux_eval_inputs(flux)
    expected = _call(flux, **inputs)
    runtime = runtime_of(flux)
    add_hook_to_module(flux, AlignDevicesHook(execution_device="cpu"))
    assert runtime_of(flux) is runtime  # accelerate keeps it as _old_forward
    assert torch.equal(_call(flux, **inputs), expected)
    assert runtime.last_path == "graph"
    remove_hook_from_module(flux)
    assert runtime_of(flux) is runtime
