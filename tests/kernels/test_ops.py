"""The qcompile:: ops survive torch.export save/load (fresh process) and torch.compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import qcompile
from qcompile.modules import QuantizedLinear
from qcompile.schemes import weight_format_impl

RECIPES = ["int8-wo", "fp8-wo", "int4-wo"]


def _quantized_mlp(recipe: str) -> nn.Sequential:
    scheme = qcompile.get_recipe(recipe).scheme
    layers = []
    for k, n in ((48, 72), (72, 40)):
        linear = nn.Linear(k, n)
        tensors = weight_format_impl(scheme.weight).quantize(linear.weight, scheme.weight)
        layers += [QuantizedLinear(k, n, scheme, tensors, linear.bias), nn.GELU()]
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("recipe", RECIPES)
def test_exported_program_reloads_in_a_fresh_process(recipe, tmp_path):
    model = _quantized_mlp(recipe)
    x = torch.randn(3, 5, 48)
    program = torch.export.export(model, (x,), strict=False)
    torch.export.save(program, tmp_path / "mlp.pt2")
    torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, qcompile
        program = torch.export.load({str(tmp_path / "mlp.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        assert torch.equal(program.module()(io["x"]), io["y"])
        ops = {{str(n.target) for n in program.graph.nodes if "qcompile" in str(n.target)}}
        print(sorted(ops))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "qcompile.linear_" in done.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_compile_matches_eager(recipe):
    model = _quantized_mlp(recipe)
    x = torch.randn(2, 7, 48)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
        assert compiled(torch.randn(1, 3, 48)).shape == (1, 3, 40)


def test_fake_impl_reports_mismatched_weight():
    x = torch.randn(2, 48, device="meta")
    weight = torch.empty(40, 47, dtype=torch.int8, device="meta")
    scale = torch.empty(40, device="meta")
    with pytest.raises(RuntimeError, match=r"weight \(40, 47\) does not fit x \[\.\.\., 48\]"):
        torch.ops.qcompile.linear_int8_wo(x, weight, scale, None)


def _permuted(batch=2, tokens=6, k=16):
    """A dense but non-contiguous activation, as UNet blocks hand their linears after
    (B, C, H, W) → (B, HW, C)."""
    return torch.randn(batch, k, tokens).permute(0, 2, 1)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_opcheck_activation_quantize_on_permuted_inputs(dtype):
    x = _permuted()
    assert not x.is_contiguous()
    ops = torch.ops.qcompile
    # opcheck compares the real outputs' strides with the fake's (contiguous)
    torch.library.opcheck(ops.quantize_act_dynamic.default, (x, dtype))
    torch.library.opcheck(ops.quantize_act_static.default, (x, torch.tensor(0.05), dtype))


@pytest.mark.parametrize("recipe", ["int8-wo", "int4-wo", "int8-dynamic"])
def test_opcheck_linears_on_permuted_inputs(recipe):
    scheme = qcompile.get_recipe(recipe).scheme_for(8, 16)
    impl = weight_format_impl(scheme.weight)
    tensors = impl.quantize(torch.randn(8, 16), scheme.weight)
    x = _permuted()
    if scheme.activation.quantized:
        x_q, x_scale = torch.ops.qcompile.quantize_act_dynamic(x, torch.int8)
        args = (x_q, x_scale, tensors["weight"], tensors["weight_scale"], None, torch.float32)
        torch.library.opcheck(torch.ops.qcompile.linear_int8_w8a8.default, args)
    else:
        args = (x, tensors["weight"], tensors["weight_scale"], None)
        torch.library.opcheck(impl.op, (*args, *impl.static_args(scheme.weight)))
