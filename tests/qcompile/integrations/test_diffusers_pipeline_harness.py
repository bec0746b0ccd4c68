"""diffusers' pipeline-level quantization tests, ported to qcompile on a tiny Flux pipeline.

Upstream: diffusers `tests/pipelines/testing_utils/quantization.py`, class
`TestPipelineQuantization` (test names kept), and `QuantCompileTests`. The tiny pipeline
is built in code and saved once. DIVERGENCE throughout: upstream quantizes
`text_encoder_2` with transformers' bitsandbytes; qcompile quantizes diffusers models
only, so only the transformer is quantized here (a text encoder given to qcompile is a
clear error, tested at the end).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.quantizers import PipelineQuantizationConfig

from qcompile import QCompileConfig, runtime_of, sqnr
from qcompile.tiny import tiny_flux_pipeline

torch_device = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = "a beautiful sunset amidst the mountains."
NUM_INFERENCE_STEPS = 2  # trimmed from 10 for time
SEED = 0
# A dequantized int8 transformer against the float one, final latents, tiny pipeline.
MIN_DEQUANTIZED_LATENT_SQNR_DB = 30.0


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-pipe")
    tiny_flux_pipeline().save_pretrained(folder)
    return str(folder)


def _run(pipe, **kwargs):
    return pipe(
        PROMPT,
        num_inference_steps=NUM_INFERENCE_STEPS,
        height=32,
        width=32,
        generator=torch.manual_seed(SEED),
        output_type="latent",
        **kwargs,
    ).images


def _parse_config_string(config_string: str) -> dict:
    return json.loads(config_string[config_string.find("{") :])


def test_quant_config_set_correctly_through_kwargs(model_name):
    components_to_quantize = ["transformer"]
    quant_config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-wo"},
        components_to_quantize=components_to_quantize,
    )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    ).to(torch_device)
    for name, component in pipe.components.items():
        if name in components_to_quantize:
            quantization_config = component.config.quantization_config
            assert quantization_config.quant_method == "qcompile"
            assert quantization_config.recipe.name == "int8-wo"
    _run(pipe)
    assert runtime_of(pipe.transformer).calls == {"graph": NUM_INFERENCE_STEPS}


def test_quant_config_set_correctly_through_granular(model_name):
    quant_config = PipelineQuantizationConfig(
        quant_mapping={"transformer": QCompileConfig("int4-wo")}
    )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    ).to(torch_device)
    assert pipe.transformer.config.quantization_config.quant_method == "qcompile"
    assert pipe.text_encoder_2.config.to_dict().get("quantization_config") is None
    _run(pipe)


def test_raises_error_for_invalid_config():
    with pytest.raises(ValueError) as err_context:
        PipelineQuantizationConfig(
            quant_mapping={"transformer": QCompileConfig("int8-wo")}, quant_backend="qcompile"
        )
    assert (
        str(err_context.value)
        == "Both `quant_backend` and `quant_mapping` cannot be specified at the same time."
    )


def test_validation_for_kwargs():
    # Upstream shows torchao's diffusers and transformers configs differ; qcompile's
    # transformers-side entry has the diffusers signature, so validation passes, and an
    # unknown kwarg fails when the config is built.
    config = PipelineQuantizationConfig(
        quant_backend="qcompile", quant_kwargs={"recipe": "int8-wo"}
    )
    with pytest.raises(Exception, match="unknown fields"):
        PipelineQuantizationConfig(
            quant_backend="qcompile", quant_kwargs={"recipe": "int8-wo", "bits": 4}
        )._resolve_quant_config(module_name="transformer")
    assert config._resolve_quant_config(module_name="transformer").recipe.name == "int8-wo"


def test_raises_error_for_wrong_config_class(model_name):
    with pytest.raises(ValueError) as err_context:
        DiffusionPipeline.from_pretrained(
            model_name,
            quantization_config={"transformer": QCompileConfig("int8-wo")},
            torch_dtype=torch.bfloat16,
        )
    assert (
        str(err_context.value)
        == "`quantization_config` must be an instance of `PipelineQuantizationConfig`."
    )


def test_validation_for_mapping():
    with pytest.raises(ValueError) as err_context:
        PipelineQuantizationConfig(quant_mapping={"transformer": DiffusionPipeline()})
    assert "Provided config for module_name=transformer could not be found" in str(
        err_context.value
    )


def test_saving_loading(model_name, tmp_path):
    quant_config = PipelineQuantizationConfig(
        quant_mapping={"transformer": QCompileConfig("int8-wo")}
    )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    ).to(torch_device)
    output_1 = _run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded_pipe = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded_pipe.to(torch_device)
    assert loaded_pipe.transformer.config.quantization_config.quant_method == "qcompile"
    output_2 = _run(loaded_pipe)
    assert torch.allclose(output_1, output_2)


def _capture_loading_warnings(caplog, model_name, quant_config):
    logger = logging.getLogger("diffusers.pipelines.pipeline_loading_utils")
    logger.addHandler(caplog.handler)  # diffusers' loggers do not propagate
    try:
        with caplog.at_level(logging.WARNING):
            return DiffusionPipeline.from_pretrained(
                model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
            )
    finally:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("method", ["quant_kwargs", "quant_mapping"])
def test_warn_invalid_component(method, model_name, caplog):
    invalid_component = "foo"
    if method == "quant_kwargs":
        quant_config = PipelineQuantizationConfig(
            quant_backend="qcompile",
            quant_kwargs={"recipe": "int8-wo"},
            components_to_quantize=["transformer", invalid_component],
        )
    else:
        quant_config = PipelineQuantizationConfig(
            quant_mapping={
                "transformer": QCompileConfig("int8-wo"),
                invalid_component: QCompileConfig("int8-wo"),
            }
        )
    _capture_loading_warnings(caplog, model_name, quant_config)
    assert invalid_component in caplog.text


@pytest.mark.parametrize("method", ["quant_kwargs", "quant_mapping"])
def test_no_quantization_for_all_invalid_components(method, model_name):
    invalid_component = "foo"
    if method == "quant_kwargs":
        quant_config = PipelineQuantizationConfig(
            quant_backend="qcompile",
            quant_kwargs={"recipe": "int8-wo"},
            components_to_quantize=[invalid_component],
        )
    else:
        quant_config = PipelineQuantizationConfig(
            quant_mapping={invalid_component: QCompileConfig("int8-wo")}
        )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not hasattr(component.config, "quantization_config")


@pytest.mark.parametrize("method", ["quant_kwargs", "quant_mapping"])
def test_quant_config_repr(method, model_name):
    if method == "quant_kwargs":
        quant_config = PipelineQuantizationConfig(
            quant_backend="qcompile",
            quant_kwargs={"recipe": "int8-wo"},
            components_to_quantize=["transformer"],
        )
    else:
        quant_config = PipelineQuantizationConfig(
            quant_mapping={"transformer": QCompileConfig("int8-wo")}
        )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    )
    retrieved = str(pipe.quantization_config)
    assert retrieved.startswith("transformer QCompileConfig {")
    data = _parse_config_string(retrieved)
    expected = QCompileConfig("int8-wo").to_dict()
    assert {k: data[k] for k in expected} == expected  # plus what loading recorded
    assert len(data["layers"]) == len(pipe.transformer.qcompile_state.schemes)


def test_single_component_to_quantize(model_name):
    quant_config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-wo"},
        components_to_quantize="transformer",
    )
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    )
    assert hasattr(pipe.transformer.config, "quantization_config")


def test_generate_quality_dequantize(model_name):  # upstream: TestSlowBnb8bit's
    reference = _run(DiffusionPipeline.from_pretrained(model_name))
    quant_config = PipelineQuantizationConfig(
        quant_mapping={"transformer": QCompileConfig("int8-wo")}
    )
    pipe = DiffusionPipeline.from_pretrained(model_name, quantization_config=quant_config)
    pipe.transformer.dequantize()
    assert not hasattr(pipe.transformer.config, "quantization_config")
    assert sqnr(reference, _run(pipe)) > MIN_DEQUANTIZED_LATENT_SQNR_DB
    _run(pipe)  # calling it again is no problem


def test_text_encoder_given_to_qcompile_is_a_clear_error(model_name):
    quant_config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-wo"},
        components_to_quantize=["transformer", "text_encoder_2"],
    )
    with pytest.raises(ValueError, match="not transformers models"):
        DiffusionPipeline.from_pretrained(model_name, quantization_config=quant_config)


@pytest.mark.gpu
def test_torch_compile_with_cpu_offload(model_name):  # upstream: QuantCompileTests
    quant_config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-wo"},
        components_to_quantize=["transformer"],
    )
    torch.compiler.reset()
    pipe = DiffusionPipeline.from_pretrained(
        model_name, quantization_config=quant_config, torch_dtype=torch.bfloat16
    )
    pipe.enable_model_cpu_offload()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    _run(pipe)
    torch.compiler.reset()
