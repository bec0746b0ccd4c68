"""The `qcompile` torch.compile backend: found by name, runs qcompile's passes, compiles once."""

from __future__ import annotations

import collections
import logging
import subprocess
import sys

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import qcompile
from qcompile import runtime_of
from qcompile.backend import QCompilePasses
from qcompile.tiny import HELD_OUT

# Inductor's fused CPU code against the eager ops it replaces: float32 reordering only.
MIN_SQNR_COMPILED_VS_EAGER_DB = 60.0
# With dynamic activation quantization that reordering flips roundings, which the UNet
# amplifies (compiled vs eager measured 42.8 dB, while the float UNet compiles to
# 119 dB of eager): compiled output is held to eager's quality against float instead.
MAX_COMPILED_QUALITY_LOSS_DB = 1.0


class OpCounter(CustomGraphPass):
    """A post-grad pass that counts the qcompile ops inductor compiles."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", "") == "qcompile":
                self.counts[node.target._opname] += 1

    def uuid(self):
        return None  # never cached: it must see every compile


def test_backend_is_found_by_name_without_importing_qcompile():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert 'qcompile' not in sys.modules\n"
        "assert 'qcompile' in torch._dynamo.list_backends()\n"
        "fn = lookup_backend('qcompile')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["qcompile.backend", "backend"]


def test_passes_uuid_follows_the_pass_sources_and_chains_the_users_pass():
    seen = []

    class UsersPass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            seen.append(graph)

        def uuid(self):
            return "users-pass-v1"

    passes = QCompilePasses(then=UsersPass())
    assert passes.uuid() == QCompilePasses(then=UsersPass()).uuid()  # stable: cacheable
    source_hash, users = passes.uuid()
    assert isinstance(source_hash, bytes) and users == "users-pass-v1"
    assert QCompilePasses(then=lambda graph: None).uuid() is None  # uncacheable: no uuid
    graph = fx.symbolic_trace(lambda x: x + 1).graph
    passes(graph)
    assert seen == [graph]


# Two input sizes per family, batch 2 (torch specializes size-1 dims even when dynamic).
# SD3, the other MMDiT transformer, compiles in the ported harness
# (TestSD3QCompile::test_qcompile_torch_compile); here Flux stands for both (CI time).
SIZES = {
    "flux": ({"rows": 6, "cols": 6}, {"rows": 8, "cols": 4}),
    # the UNet compiles 3x slower with dynamic shapes on the CPU: one size, two calls
    # (a traced forward must not recompile per call), static
    "unet": ({"height": 24, "width": 20}, {"height": 24, "width": 20, "seed": 3}),
}
# W8A8 linears and the distinct tensors they read (as in the lowered program), so
# share_quantize removes the difference.
SHARED = {"flux": (40, 26), "unet": (96, 65)}


@pytest.mark.parametrize("family", sorted(SIZES))
def test_fullgraph_compile_shares_quantization_and_compiles_once_over_sizes(family, caplog):
    build, held_out = HELD_OUT[family]
    float_model, model = build(), qcompile.quantize(build(), "int8-dynamic")
    torch._dynamo.reset()
    counters.clear()
    dynamic = family != "unet"
    compiled = torch.compile(model, backend="qcompile", fullgraph=True, dynamic=dynamic)
    post_grad = OpCounter()  # the user's pass: the backend runs it after its own
    with (
        torch.no_grad(),
        torch._dynamo.config.patch(error_on_recompile=True),
        # a cached compile skips the passes (correctly); this test watches them run
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        torch._inductor.config.patch(post_grad_custom_post_pass=post_grad),
        caplog.at_level(logging.INFO, logger="qcompile.passes"),
    ):
        for size in SIZES[family]:
            inputs = held_out(model, batch=2, **size)
            reference = float_model(**inputs, return_dict=False)[0]
            eager = model(**inputs, return_dict=False)[0]
            got = compiled(**inputs, return_dict=False)[0]
            eager_db = qcompile.sqnr(reference, eager)
            assert qcompile.sqnr(reference, got) > eager_db - MAX_COMPILED_QUALITY_LOSS_DB
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    gemms, tensors = SHARED[family]
    assert f"{gemms - tensors} duplicate activation quantizations removed" in caplog.text
    assert f"{tensors} activation quantizations handed to inductor" in caplog.text
    # inductor's graph: every W8A8 GEMM, and no quantize op (fused into its producer)
    assert post_grad.counts["linear_int8_w8a8"] == gemms
    assert not any(name.startswith("quantize_act") for name in post_grad.counts)


def test_reload_compiles_the_lowered_graph_on_first_call_when_asked(tmp_path, caplog):
    from diffusers import FluxTransformer2DModel

    build, held_out = HELD_OUT["flux"]
    build().save_pretrained(tmp_path / "float")
    config = qcompile.QCompileConfig("int8-dynamic", compile=True)
    quantized = FluxTransformer2DModel.from_pretrained(
        tmp_path / "float", quantization_config=config
    )
    quantized.save_pretrained(tmp_path / "int8")
    compiled = FluxTransformer2DModel.from_pretrained(tmp_path / "int8")
    uncompiled = FluxTransformer2DModel.from_pretrained(tmp_path / "int8")
    assert runtime_of(compiled).compile is True  # saved with the checkpoint
    runtime_of(uncompiled).compile = False
    inputs = held_out(compiled)
    torch._dynamo.reset()
    patch = torch._dynamo.config.patch(error_on_recompile=True)
    with torch.no_grad(), patch, caplog.at_level("INFO", logger="qcompile.runtime"):
        want = uncompiled(**inputs, return_dict=False)[0]
        got = compiled(**inputs, return_dict=False)[0]
        again = compiled(**inputs, return_dict=False)[0]  # the same graph: no recompile
    # the first call's minutes of compiling are announced, once, and timed
    messages = [r.getMessage() for r in caplog.records if r.name == "qcompile.runtime"]
    assert sum("compiling FluxTransformer2DModel's lowered graph" in m for m in messages) == 1
    assert sum(m.startswith("compiled in ") for m in messages) == 1
    assert runtime_of(compiled).last_path == "graph"
    assert len(runtime_of(compiled)._compiled) == 1 and not runtime_of(uncompiled)._compiled
    assert qcompile.sqnr(want, got) > MIN_SQNR_COMPILED_VS_EAGER_DB
    assert torch.equal(got, again)


def test_compile_defaults_to_cuda_only():
    model = qcompile.quantize(HELD_OUT["flux"][0](), "int8-wo")
    assert runtime_of(model).compile is None
    with torch.no_grad():
        model(**HELD_OUT["flux"][1](model), return_dict=False)
    assert not runtime_of(model)._compiled  # CPU inputs: the graph runs uncompiled
    with pytest.raises(qcompile.QCompileError, match="compile must be"):
        qcompile.QCompileConfig("int8-wo", compile="yes")


def test_compile_modes_reach_inductor_through_the_backend():
    build, held_out = HELD_OUT["sd3"]
    model = qcompile.quantize(build(), "int8-dynamic")
    inputs = held_out(model)
    torch._dynamo.reset()
    mode = "max-autotune-no-cudagraphs"
    compiled = torch.compile(model, backend="qcompile", fullgraph=True, mode=mode)
    with torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
        got = compiled(**inputs, return_dict=False)[0]
    assert qcompile.sqnr(want, got) > MIN_SQNR_COMPILED_VS_EAGER_DB
    with pytest.raises(Exception, match="no_such_option"):  # options are inductor's config
        torch._dynamo.reset()
        bad = torch.compile(model, backend="qcompile", options={"no_such_option": 1})
        with torch.no_grad():
            bad(**inputs, return_dict=False)
