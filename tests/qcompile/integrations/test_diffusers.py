"""diffusers integration: quantize-on-load, PipelineQuantizationConfig, pipeline round trip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.quantizers import PipelineQuantizationConfig

import qcompile
from qcompile import QCompileConfig, runtime_of
from qcompile.modules import QuantizedLinear
from qcompile.tiny import HELD_OUT, tiny_flux_pipeline

from ..models import flux_images

MIB = 1 << 20


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", sorted(HELD_OUT))
def test_quantize_on_load_matches_in_memory_quantization(family, tmp_path):
    build, held_out = HELD_OUT[family]
    build().save_pretrained(tmp_path / "float")
    in_memory = qcompile.quantize(build(), "int4-wo")
    inputs = held_out(in_memory)
    model = type(in_memory).from_pretrained(
        tmp_path / "float", quantization_config=QCompileConfig("int4-wo")
    )
    assert model.qcompile_state.schemes == in_memory.qcompile_state.schemes
    out = _call(model, inputs)
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason
    # Same weights, same packing, same program: bitwise what qcompile.quantize gives.
    assert torch.equal(out, _call(in_memory, inputs))
    # ... and it saves like any qcompile model.
    model.save_pretrained(tmp_path / "quantized")
    again = type(model).from_pretrained(tmp_path / "quantized")
    assert torch.equal(_call(again, inputs), out)


def _tiny_pipeline_folder(tmp_path: Path) -> Path:
    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def _images(pipe):
    return flux_images(pipe)


def test_pipeline_quantization_config_and_pipeline_round_trip(tmp_path):
    folder = _tiny_pipeline_folder(tmp_path)
    config = PipelineQuantizationConfig(quant_mapping={"transformer": QCompileConfig("int8-wo")})
    pipe = FluxPipeline.from_pretrained(folder, quantization_config=config)
    assert isinstance(
        pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q"), QuantizedLinear
    )
    images = _images(pipe)
    assert runtime_of(pipe.transformer).calls == {"graph": 2}
    pipe.save_pretrained(tmp_path / "quantized-pipe")
    reloaded = FluxPipeline.from_pretrained(tmp_path / "quantized-pipe")
    assert reloaded.transformer.qcompile_state.recipe.name == "int8-wo"
    assert torch.equal(_images(reloaded), images)
    assert runtime_of(reloaded.transformer).calls == {"graph": 2}


def _memory_benchmark():
    path = Path(__file__).parents[3] / "benchmarks" / "quantize_on_load_memory.py"
    spec = importlib.util.spec_from_file_location("quantize_on_load_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quantize_on_load_streams_weights():
    info = _memory_benchmark().measure(layers=4)
    quantized = info["int8-wo"]["model_bytes"]
    streaming = info["int8-wo"]["weights_phase_peak_growth_bytes"]
    # Measured 61.7 MiB for a 38.9 MiB int8 model from a 137.7 MiB float checkpoint whose
    # largest tensor is 6 MiB: the quantized size, one float weight and its temporaries,
    # and allocator slack. A load that materialized the float weights would exceed 137.
    assert streaming < quantized + 2 * info["largest_tensor_bytes"] + 16 * MIB
    assert streaming < 0.5 * info["float_bytes"]


def _linear_kinds(model):
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, QuantizedLinear))
    }


def test_modules_to_not_convert_keeps_those_linears_16_bit(tmp_path):
    # diffusers' standard kwarg (bitsandbytes, torchao, quanto take it): a name, or a
    # module whose linears all stay 16-bit. Upstream: QuantizationTesterMixin
    # test_modules_to_not_convert.
    build, held_out = HELD_OUT["flux"]
    build().save_pretrained(tmp_path / "float")
    config = QCompileConfig("int8-wo", modules_to_not_convert=["transformer_blocks.0.attn"])
    model = type(build()).from_pretrained(tmp_path / "float", quantization_config=config)
    kinds = _linear_kinds(model)
    kept = {n for n in kinds if n.startswith("transformer_blocks.0.attn.")}
    assert kept and all(kinds[n] == "Linear" for n in kept)
    assert kinds["transformer_blocks.0.ff.net.0.proj"] == "QuantizedLinear"
    out = _call(model, held_out(model))
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason
    # the checkpoint records it: the reload quantizes the same layers, same output
    model.save_pretrained(tmp_path / "quantized")
    again = type(model).from_pretrained(tmp_path / "quantized")
    assert _linear_kinds(again) == kinds
    assert torch.equal(_call(again, held_out(again)), out)
    assert again.hf_quantizer.quantization_config.modules_to_not_convert == [
        "transformer_blocks.0.attn"
    ]


def test_keep_in_fp32_modules_are_not_quantized(tmp_path, monkeypatch):
    build, held_out = HELD_OUT["flux"]
    cls = type(build())
    build().save_pretrained(tmp_path / "float")
    monkeypatch.setattr(cls, "_keep_in_fp32_modules", ["ff_context"])
    model = cls.from_pretrained(tmp_path / "float", quantization_config=QCompileConfig("int8-wo"))
    kinds = _linear_kinds(model)
    kept = [n for n in kinds if ".ff_context." in n]
    assert kept and all(kinds[n] == "Linear" for n in kept)
    assert kinds["transformer_blocks.0.ff.net.0.proj"] == "QuantizedLinear"
    _call(model, held_out(model))
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason


def test_modules_to_not_convert_must_be_a_list_of_names():
    with pytest.raises(qcompile.QCompileError, match="list of module names"):
        QCompileConfig("int8-wo", modules_to_not_convert="proj_out")


def test_pipeline_quantization_config_quant_backend(tmp_path):
    """diffusers' global form: quant_backend + quant_kwargs (+ components_to_quantize)."""
    folder = _tiny_pipeline_folder(tmp_path)
    config = PipelineQuantizationConfig(
        quant_backend="qcompile",
        quant_kwargs={"recipe": "int8-wo"},
        components_to_quantize=["transformer"],
    )
    pipe = FluxPipeline.from_pretrained(folder, quantization_config=config)
    assert pipe.transformer.qcompile_state.recipe.name == "int8-wo"
    assert pipe.transformer.config["_pre_quantization_dtype"] == torch.float32
    assert "qcompile" in repr(config) and "int8-wo" in repr(config)
    _images(pipe)
    assert runtime_of(pipe.transformer).calls == {"graph": 2}
    # without components_to_quantize diffusers would hand it to the text encoders too
    everything = PipelineQuantizationConfig(
        quant_backend="qcompile", quant_kwargs={"recipe": "int8-wo"}
    )
    with pytest.raises(ValueError, match="components_to_quantize"):
        FluxPipeline.from_pretrained(folder, quantization_config=everything)


def test_config_repr_is_diffusers_json_form():
    config = QCompileConfig("int4-wo", modules_to_not_convert=["proj_out"])
    text = repr(config)
    assert text.startswith("QCompileConfig {") and text.endswith("}\n")
    assert json.loads(text.removeprefix("QCompileConfig ")) == config.to_dict()
    diff = config.to_diff_dict()
    assert diff["quant_method"] == "qcompile" and "format_version" not in diff
    assert diff["modules_to_not_convert"] == ["proj_out"]


def test_modules_to_not_convert_matches_inside_names_as_diffusers_does(tmp_path):
    """diffusers' quantizer tests keep every linear whose name contains an entry: with
    "proj_out", each `single_transformer_blocks.N.proj_out` too, not only the
    top-level one (qcompile kept those quantized)."""
    build, held_out = HELD_OUT["flux"]
    build().save_pretrained(tmp_path / "float")
    config = QCompileConfig("int8-wo", modules_to_not_convert=["proj_out"])
    model = type(build()).from_pretrained(tmp_path / "float", quantization_config=config)
    kinds = _linear_kinds(model)
    kept = [n for n in kinds if "proj_out" in n]
    assert "single_transformer_blocks.0.proj_out" in kept
    assert all(kinds[n] == "Linear" for n in kept)
    assert sum(kind == "QuantizedLinear" for kind in kinds.values()) > len(kept)
    _call(model, held_out(model))
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason


def test_modules_to_not_convert_naming_nothing_is_refused(tmp_path):
    build, _ = HELD_OUT["flux"]
    build().save_pretrained(tmp_path / "float")
    config = QCompileConfig("int8-wo", modules_to_not_convert=["proj_outt"])
    with pytest.raises(
        qcompile.QCompileError, match=r"modules_to_not_convert names \['proj_outt'\]"
    ):
        type(build()).from_pretrained(tmp_path / "float", quantization_config=config)
