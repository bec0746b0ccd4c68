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
