"""Checkpoints: save → from_pretrained / qcompile.load round trips, bitwise on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from torch.utils import _pytree as pytree

import qcompile
from qcompile import runtime_of
from qcompile.checkpoint import WEIGHTS_NAME
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.modules import QuantizedLinear

from .models import FAMILIES, pixart_inputs, tiny_pixart


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# FP8 and INT4 g128 on Flux; SD3 and the UNet with grouped int4. The int8-wo round trips
# of every family and Flux's int4-wo are the ported harness's serialization tests (also
# bitwise); the packed kinds are Flux's.
ROUND_TRIPS = [("flux", "fp8-wo"), ("flux", "int4-wo-g128"), ("sd3", "int4-wo-g128"),
               ("unet", "int4-wo-g128")]  # fmt: skip


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


def test_from_pretrained_float_model_quantizes_bitwise_as_its_reload(tmp_path):
    """A float model from diffusers' from_pretrained keeps its tensors mmap'd at file
    offsets (misaligned), which CPU kernels sum in another order: quantizing it in
    memory gave 2.4e-7 against its own reload. `quantize` re-homes them as the loader
    does, so the two are bitwise equal."""
    build, held_out = FAMILIES["flux"]
    build().save_pretrained(tmp_path / "float")
    model = type(build()).from_pretrained(tmp_path / "float")
    misaligned = [t for t in model.state_dict().values() if t.data_ptr() % 64]
    assert misaligned  # the premise: diffusers leaves them where the file put them
    qcompile.quantize(model, "int8-wo")
    assert not [t for t in model.state_dict().values() if t.data_ptr() % 64]
    inputs = held_out(model)
    model.save_pretrained(tmp_path / "quantized")
    again = type(model).from_pretrained(tmp_path / "quantized")
    assert torch.equal(_call(again, inputs), _call(model, inputs))


@pytest.mark.parametrize(
    ("family", "float32_inputs"),
    # As the pipelines pass them: FluxPipeline builds guidance in float32 and the
    # timestep in the latents' dtype; SDXL's scheduler yields float32 timesteps.
    [("flux", ("guidance",)), ("unet", ("timestep",))],
)
def test_loading_in_another_dtype_captures_the_graph_again(family, float32_inputs, tmp_path):
    """A float32 checkpoint loaded with torch_dtype=bfloat16 ran every call eagerly
    (the saved graph's inputs are float32). The load captures the graph again in the
    dtype it loads in, and calls stay on it; what is saved then is that graph."""
    build, held_out = FAMILIES[family]
    qcompile.quantize(build(), "int8-wo").save_pretrained(tmp_path / "fp32")
    cls = type(build())
    model = cls.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    inputs = _in_bfloat16(held_out(model), keep=float32_inputs)
    out = _call(model, inputs)
    runtime = runtime_of(model)
    assert runtime.calls == {"graph": 1}, runtime.last_reason
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, runtime.eager(**inputs, return_dict=False)[0])
    model.save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["quantization_config"]["dtype"] == "bfloat16"
    again = cls.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    assert torch.equal(_call(again, inputs), out)
    assert runtime_of(again).calls == {"graph": 1}


def test_a_model_outside_the_families_is_captured_again_from_its_saved_program(tmp_path):
    """No family to synthesize inputs from: the saved program's own input shapes and
    dynamic dims are the recipe for the new capture."""
    model = qcompile.quantize(tiny_pixart(), "int8-wo", example_inputs=pixart_inputs())
    model.save_pretrained(tmp_path / "fp32")
    again = type(model).from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    # Other batch sizes and text lengths than the capture's (PixArt's patch embedding
    # pins the spatial size the graph was captured at, in either dtype).
    for batch, text in ((1, 7), (3, 5)):
        inputs = _in_bfloat16(pixart_inputs(batch=batch, text=text))
        out = _call(again, inputs)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert runtime_of(again).calls == {"graph": 2}, runtime_of(again).last_reason


def test_the_saved_program_names_no_path_of_this_machine(tmp_path):
    """Stack traces in the node metadata named site-packages: checkpoints of the same
    model differed between machines. They stay on the live program only."""
    build, _ = FAMILIES["flux"]
    model = qcompile.quantize(build(), "int8-wo")
    model.save_pretrained(tmp_path / "q")
    raw = (tmp_path / "q" / PROGRAM_NAME).read_bytes()
    for path in {sys.prefix, sys.base_prefix, str(tmp_path), "site-packages"}:
        assert path.encode() not in raw
    nodes = runtime_of(model).program.graph.nodes
    assert any("stack_trace" in node.meta for node in nodes)  # kept for error messages


def _in_bfloat16(inputs: dict, keep: tuple[str, ...] = ()) -> dict:
    """Floating tensors (nested ones too) in bfloat16, but the arguments in `keep`."""

    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        return value.bfloat16() if floating else value

    return {k: v if k in keep else pytree.tree_map(cast, v) for k, v in inputs.items()}
