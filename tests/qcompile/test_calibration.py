"""capture_calibration on real (tiny, offline) Flux, SD3 and SDXL pipelines."""

from __future__ import annotations

import inspect

import pytest
import torch

import qcompile
from qcompile import CalibrationError, CalibrationSet, capture_calibration
from qcompile.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red city at night", "a lake at sunset"]
STEPS = 3
# (builder, component, pipeline batch per call: CFG doubles SD3's and SDXL's)
PIPELINES = {
    "flux": (tiny_flux_pipeline, "transformer", 1),
    "sd3": (tiny_sd3_pipeline, "transformer", 2),
    "sdxl": (tiny_sdxl_pipeline, "unet", 2),
}


def _pipe(name):
    build, attr, batch = PIPELINES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return pipe, getattr(pipe, attr), batch


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_capture_counts_keys_and_file_round_trip(name, tmp_path):
    pipe, module, batch = _pipe(name)
    calibration = capture_calibration(
        pipe, module, PROMPTS, num_inference_steps=STEPS, height=32, width=32
    )
    assert len(calibration) == len(PROMPTS) * STEPS
    params = set(inspect.signature(type(module).forward).parameters) - {"self", "return_dict"}
    first = calibration.samples[0]
    assert set(first) <= params
    latents = first["hidden_states"] if "hidden_states" in first else first["sample"]
    assert latents.shape[0] == batch and latents.device.type == "cpu"
    assert calibration.nbytes > 0 and calibration.module_class == type(module).__name__
    # Prompts get different generator seeds: the first step's latents differ.
    second = calibration.samples[STEPS]
    assert not torch.equal(latents, second.get("hidden_states", second.get("sample")))
    calibration.save(tmp_path / "calibration.safetensors")
    again = CalibrationSet.load(tmp_path / "calibration.safetensors")
    assert len(again) == len(calibration)
    assert all(_equal(a, b) for a, b in zip(calibration, again, strict=True))
    # The captured calls drive a static preset end to end, and the program fits them.
    qcompile.quantize(module, "int8-w8a8", calibration=again)
    with torch.no_grad():
        module(**again.samples[0])
    assert qcompile.runtime_of(module).last_path == "graph"


def test_max_samples_stops_the_pipeline():
    pipe, module, _ = _pipe("flux")
    calibration = capture_calibration(
        pipe, module, PROMPTS, num_inference_steps=STEPS, max_samples=4, height=32, width=32
    )
    assert len(calibration) == 4


def test_module_must_be_a_pipeline_component():
    pipe, _, _ = _pipe("flux")
    with pytest.raises(CalibrationError, match="is not a component of FluxPipeline"):
        capture_calibration(pipe, qcompile.tiny.tiny_flux(), PROMPTS)


def test_module_never_called_is_an_error():
    pipe, _, _ = _pipe("flux")
    # With output_type="latent" (the default here) the VAE never runs.
    with pytest.raises(CalibrationError, match="never called AutoencoderKL"):
        capture_calibration(pipe, pipe.vae, PROMPTS[:1], num_inference_steps=1, height=32, width=32)


def test_a_file_that_is_not_a_calibration_set(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(qcompile.CheckpointError, match="not a qcompile calibration file"):
        CalibrationSet.load(path)


def test_calibrating_a_quantized_model_is_refused_at_once():
    """It ran every prompt through the quantized model (minutes to hours) before
    `quantize` refused the already-quantized model."""
    pipe, _, _ = _pipe("flux")
    qcompile.quantize(pipe.transformer, "int8-wo")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(CalibrationError, match="already quantized with 'int8-wo'"):
        capture_calibration(pipe, pipe.transformer, ["a cat"], num_inference_steps=1)
    assert calls == []


def test_tiny_sd3_pipeline_saves_loads_and_decodes(tmp_path):
    """It lacked text_encoder_3 (its folder did not load) and its VAE had no
    shift_factor (every decode failed)."""
    from diffusers import DiffusionPipeline

    pipe = tiny_sd3_pipeline()
    pipe.save_pretrained(tmp_path / "sd3")
    again = DiffusionPipeline.from_pretrained(tmp_path / "sd3")
    assert type(again).__name__ == "StableDiffusion3Pipeline"
    assert again.text_encoder_3 is not None and again.vae.config.shift_factor is not None
    images = []
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
        kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
        images.append(p("a cat", generator=torch.manual_seed(0), **kwargs).images)
    assert images[0].shape == (1, 3, 32, 32) and torch.isfinite(images[0]).all()
    assert torch.equal(images[0], images[1])
