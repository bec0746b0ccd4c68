"""Quantizing a model whose weights accelerate offloads: captured on the meta device,
each weight read from accelerate's weights map when a pass needs it, and the result
equal, bit for bit, to quantizing the same model in memory."""

from __future__ import annotations

import weakref

import pytest
import torch
from accelerate import cpu_offload_with_hook, disk_offload
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

import qcompile
from qcompile.api import select_linears
from qcompile.errors import CheckpointError, NoLinearSelectedError, QCompileError
from qcompile.offload import Offloaded, ShardWeights, streamed_model
from qcompile.recipes import resolve_recipe
from qcompile.runtime import runtime_of
from qcompile.tiny import tiny_flux_pipeline

from .models import FAMILIES

# static activation scales (observed), smoothing + low-rank (rewrite the weights), and a
# weight-only recipe
RECIPES = ["int8-w8a8", "svdq-w4a4", "int4-wo"]
STREAMED = {"int8-w8a8", "int4-wo"}  # never more than one linear's weights alive at once


@pytest.fixture
def live_loads(monkeypatch):
    """Watch the tensors `Offloaded.load` hands out: every load, and the most bytes of
    the watched names (`seen["names"]`) alive at once."""
    seen = {"names": set(), "live": 0, "peak": 0, "loads": 0}
    load = Offloaded.load

    def release(nbytes):
        seen["live"] -= nbytes

    def watched(self, fqn, like=None):
        value = load(self, fqn, like)
        seen["loads"] += 1
        if fqn in seen["names"]:
            seen["live"] += value.nbytes
            seen["peak"] = max(seen["peak"], seen["live"])
            weakref.finalize(value, release, value.nbytes)
        return value

    monkeypatch.setattr(Offloaded, "load", watched)
    return seen


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_disk_offloaded_model_quantizes_to_the_in_memory_result(recipe, tmp_path, live_loads):
    build, held_out = FAMILIES["flux"]
    reference, model = build(), build()
    needs = qcompile.get_recipe(recipe).needs_calibration
    calibration = [held_out(reference, batch=2, seed=s) for s in (3, 4)] if needs else None
    selected = {f"{fqn}.weight" for fqn in select_linears(reference, resolve_recipe(recipe))}
    live_loads["names"] = selected  # packed, then dropped: never part of the result
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert all(p.is_meta for p in model.parameters())
    qcompile.quantize(reference, recipe, calibration=calibration)
    qcompile.quantize(model, recipe, calibration=calibration)

    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    want, got = reference.state_dict(), model.state_dict()
    assert set(got) == set(want)
    assert all(not t.is_meta and t.device.type == "cpu" for t in got.values())
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    inputs = held_out(model)
    assert torch.equal(_call(model, inputs), _call(reference, inputs))
    assert runtime_of(model).last_path == "graph", runtime_of(model).last_reason

    float_weights = build().state_dict()
    sizes = [float_weights[name].nbytes for name in selected]
    # observation reads each weight once per sample, packing once more
    assert live_loads["loads"] > len(selected) * (1 + len(calibration or ()))
    if recipe in STREAMED:
        assert live_loads["peak"] == max(sizes)
    else:  # smoothing rewrites every quantized linear's float weight: all are loaded
        assert live_loads["peak"] == sum(sizes)


def test_a_failed_quantize_puts_the_offloaded_model_back(tmp_path):
    build, held_out = FAMILIES["flux"]
    reference, model = build(), build()
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    recipe = resolve_recipe("int8-wo").replace(include=("no_such_layer",))
    with pytest.raises(NoLinearSelectedError):  # raised after the capture on meta
        qcompile.quantize(model, recipe)
    assert all(p.is_meta for p in model.parameters())  # still offloaded, hooks back
    inputs = held_out(model)
    assert torch.equal(_call(model, inputs), _call(reference, inputs))
    qcompile.quantize(model, "int8-wo")  # and it quantizes after all
    assert runtime_of(model) is not None


def test_model_cpu_offload_hooks_are_refused_with_the_fix():
    model, _ = cpu_offload_with_hook(FAMILIES["flux"][0](), execution_device="cpu")
    with pytest.raises(QCompileError, match="quantize it before enabling offload"):
        qcompile.quantize(model, "int8-wo")


def test_device_map_offloaded_pipeline_calibrates_quantizes_saves_and_reloads(tmp_path):
    pipe = tiny_flux_pipeline()
    pipe.transformer.save_pretrained(tmp_path / "float")
    reference = FluxTransformer2DModel.from_pretrained(tmp_path / "float")
    transformer = FluxTransformer2DModel.from_pretrained(
        tmp_path / "float",
        device_map="auto",
        max_memory={"cpu": 10_000},  # nothing fits: every weight goes to the offload folder
        offload_folder=tmp_path / "offload",
    )
    assert set(transformer.hf_device_map.values()) == {"disk"}
    pipe.transformer = transformer
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64}
    calibration = qcompile.capture_calibration(pipe, transformer, ["a red cube", "fog"], **kwargs)
    qcompile.quantize(transformer, "int8-w8a8", calibration=calibration)
    qcompile.quantize(reference, "int8-w8a8", calibration=calibration)

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe("a red cube", output_type="pt", generator=generator, **kwargs).images

    offloaded = image()
    pipe.transformer = reference
    assert torch.equal(image(), offloaded)
    transformer.save_pretrained(tmp_path / "quantized")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "quantized")
    inputs = FAMILIES["flux"][1](reloaded)
    assert torch.equal(_call(reloaded, inputs), _call(reference, inputs))


def test_shard_weights_reads_diffusers_shards_lazily_and_refuses_ambiguous_folders(tmp_path):
    model = FAMILIES["flux"][0]()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    weights = ShardWeights(tmp_path / "sharded")
    state = model.state_dict()
    assert set(weights) == set(state) and "not.a.tensor" not in weights
    assert all(name in weights for name in state)
    assert not weights._handles  # membership and listing read no tensor
    name = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(weights[name], state[name])
    state["step"] = torch.zeros(3, dtype=torch.int64)  # not floating: keeps its size
    (tmp_path / "one").mkdir()
    save_file(state, tmp_path / "one" / "diffusion_pytorch_model.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        want = sum((t.to(dtype) if t.is_floating_point() else t).nbytes for t in state.values())
        assert ShardWeights(tmp_path / "one").loaded_bytes(dtype) == want
        assert ShardWeights(tmp_path / "sharded").loaded_bytes(dtype) == want - 3 * 8
    next((tmp_path / "sharded").glob("*-00001-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"names shard .*, which is missing"):
        ShardWeights(tmp_path / "sharded")
    (tmp_path / "two").mkdir()
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"):
        (tmp_path / "two" / f"{stem}.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"expected one \.safetensors file or an index"):
        ShardWeights(tmp_path / "two")


def test_streamed_model_names_the_tensors_its_shards_lack(tmp_path):
    model = FAMILIES["flux"][0]()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("proj_out")}
    model.save_config(tmp_path)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"the shards lack .*proj_out"):
        streamed_model(type(model), tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize(
    ("recipe", "level"),
    [("int8-wo", "leaf_level"), ("int4-wo", "leaf_level"), ("int4-wo", "block_level")],
)
def test_diffusers_group_offload_to_disk_runs_through_its_hooks(recipe, level, tmp_path):
    """diffusers' group offloading moves weights in and out in hooks on the submodules'
    forwards, which the lowered graph never calls: with weights offloaded to disk it
    read empty tensors and every output was NaN. Calls now run the model's own forward
    (the same quantized ops) while any submodule is hooked, and say why."""
    build, held_out = FAMILIES["flux"]
    model = qcompile.quantize(build(), recipe)
    inputs = held_out(model)
    runtime = runtime_of(model)
    with torch.no_grad():
        expected = runtime.eager(**inputs, return_dict=False)[0]
    extra = {"num_blocks_per_group": 1} if level == "block_level" else {}
    model.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_type=level,
        offload_to_disk_path=str(tmp_path / "offload"),
        **extra,
    )
    assert runtime_of(model) is runtime  # found under diffusers' hooks too
    for _ in range(2):  # the second call onloads from the files the first wrote
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        assert torch.isfinite(out).all()
        assert torch.allclose(out, expected, rtol=0, atol=1e-5)
    assert runtime.calls == {"eager": 2}
    assert "has forward hooks" in runtime.last_reason and "group offloading" in runtime.last_reason
