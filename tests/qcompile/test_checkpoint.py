"""Checkpoints: save → from_pretrained / qcompile.load round trips, bitwise on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import qcompile
from qcompile import runtime_of
from qcompile.checkpoint import WEIGHTS_NAME
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.modules import QuantizedLinear

from .models import FAMILIES, pixart_inputs, tiny_pixart

RECIPES = ["int8-wo", "fp8-wo", "int4-wo", "int4-wo-g128"]


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# Every recipe on Flux; SD3 and the UNet with grouped int4 (their int8-wo round trips
# are the ported harness's serialization tests, and the packed kinds are Flux's).
ROUND_TRIPS = [("flux", r) for r in RECIPES] + [("sd3", "int4-wo-g128"), ("unet", "int4-wo-g128")]


@pytest.mark.parametrize(("family", "recipe"), ROUND_TRIPS)
def test_round_trip_is_bitwise(family, recipe, tmp_path):
    build, held_out = FAMILIES[family]
    model = qcompile.quantize(build(), recipe)
    inputs = held_out(model)
    expected = _call(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert type(reloaded) is type(model) and reloaded.dtype == model.dtype
    assert torch.equal(_call(reloaded, inputs), expected)
    assert runtime_of(reloaded).last_path == "graph", runtime_of(reloaded).last_reason
    assert reloaded.qcompile_state.schemes == model.qcompile_state.schemes
    assert torch.equal(_call(qcompile.load(tmp_path).module(), inputs), expected)


def test_checkpoint_layout_and_config(tmp_path):
    build, _ = FAMILIES["flux"]
    model = qcompile.quantize(build(), "int4-wo")
    qcompile.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "config.json",
        WEIGHTS_NAME,
        PROGRAM_NAME,
    ]
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "qcompile" and quant["format_version"] == 1
    assert quant["recipe"]["name"] == "int4-wo" and quant["family"] == "flux"
    assert len(quant["layers"]) == 40 and set(quant["layers"].values()) == {"s0"}
    assert quant["schemes"]["s0"]["weight"] == {
        "format": "int4",
        "granularity": "per_group",
        "group_size": 64,
    }
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        packed = f.get_tensor("transformer_blocks.0.attn.to_q.weight")
        assert packed.dtype == torch.uint8  # never a float copy
        assert f.get_tensor("transformer_blocks.0.attn.to_q.weight_scale").dtype == torch.float32
        assert f.get_tensor("x_embedder.weight").dtype == torch.float32  # excluded: 16-bit


def test_bf16_round_trip_keeps_packed_dtypes(tmp_path):
    build, held_out = FAMILIES["flux"]
    model = qcompile.quantize(build(dtype=torch.bfloat16), "fp8-wo")
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() and k != "guidance" else v
        for k, v in held_out(model).items()
    }
    expected = _call(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)  # dtype comes from the config
    layer = reloaded.get_submodule("transformer_blocks.0.ff.net.2")
    assert isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32 and reloaded.dtype == torch.bfloat16
    assert torch.equal(_call(reloaded, inputs), expected)
    assert runtime_of(reloaded).last_path == "graph"
    explicit = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert torch.equal(_call(explicit, inputs), expected)


def test_model_given_only_example_inputs_round_trips(tmp_path):
    model = qcompile.quantize(tiny_pixart(), "int8-wo", example_inputs=pixart_inputs())
    inputs = pixart_inputs(batch=1, text=5)
    expected = _call(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(_call(reloaded, inputs), expected)
    assert runtime_of(reloaded).last_path == "graph"


def test_fresh_process_reload_and_pt2_load(tmp_path):
    build, held_out = FAMILIES["sd3"]
    model = qcompile.quantize(build(), "int8-wo")
    inputs = held_out(model)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"inputs": inputs, "out": _call(model, inputs)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, qcompile
        from diffusers import SD3Transformer2DModel
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = SD3Transformer2DModel.from_pretrained({str(tmp_path / "ckpt")!r})
        with torch.no_grad():
            out = model(**io["inputs"], return_dict=False)[0]
        assert torch.equal(out, io["out"]), "fresh-process reload differs"
        assert qcompile.runtime_of(model).last_path == "graph"
        # The weightless .pt2 is a standard archive: torch.export.load reads it once the
        # qcompile ops are registered (import qcompile).
        program = torch.export.load({str(tmp_path / "ckpt" / PROGRAM_NAME)!r})
        ops = sum("qcompile" in str(n.target) for n in program.graph.nodes)
        print("ok", ops)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "25"]


def test_dequantize_returns_plain_linears():
    build, held_out = FAMILIES["unet"]
    model = qcompile.quantize(build(), "int8-wo")
    inputs = held_out(model)
    quantized = _call(model, inputs)
    model.dequantize()
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert model.get_submodule("mid_block.attentions.0.proj_in").weight.dtype == torch.float32
    assert not hasattr(model, "hf_quantizer") and "quantization_config" not in model.config
    assert runtime_of(model) is None and not qcompile.is_quantized(model)
    # The float weights are the dequantized ones: same math, now through aten.linear.
    assert qcompile.sqnr(quantized, _call(model, inputs)) > 100


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_max_shard_size_writes_diffusers_shards_that_reload(variant, tmp_path):
    """Upstream: ModelTesterMixin.test_sharded_checkpoints (max_shard_size + index json)."""
    from qcompile.checkpoint import index_name, weights_name

    build, held_out = FAMILIES["flux"]
    model = qcompile.quantize(build(), "int4-wo")
    inputs = held_out(model)
    expected = _call(model, inputs)
    model.save_pretrained(tmp_path, max_shard_size="40KB", variant=variant)
    index = json.loads((tmp_path / index_name(variant)).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / weights_name(variant)).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    stem = weights_name(variant).removesuffix(".safetensors")
    assert all(s.startswith(stem + "-") for s in shards), shards
    for shard in shards:  # each shard carries the CRC32s of exactly its own tensors
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            crcs = json.loads(f.metadata()["qcompile_crc32"])
            assert set(crcs) == set(f.keys())
    reloaded = type(model).from_pretrained(tmp_path, variant=variant)
    assert torch.equal(_call(reloaded, inputs), expected)
    assert torch.equal(_call(qcompile.load(tmp_path, variant).module(), inputs), expected)
    # a smaller save into the same folder replaces the shards and the index
    model.save_pretrained(tmp_path, variant=variant)
    assert not (tmp_path / index_name(variant)).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(stem + "-")]
    assert torch.equal(
        _call(type(model).from_pretrained(tmp_path, variant=variant), inputs), expected
    )


def test_shard_index_naming_a_missing_shard_is_a_clear_error(tmp_path):
    from qcompile.checkpoint import INDEX_NAME

    build, _ = FAMILIES["flux"]
    model = qcompile.quantize(build(), "int8-wo")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(qcompile.CheckpointError, match="missing"):
        qcompile.load(tmp_path)
