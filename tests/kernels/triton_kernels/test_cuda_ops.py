"""GPU only: the ``qcompile::`` ops on CUDA tensors dispatch to the Triton kernels, agree
with the CPU references, tune outside CUDA-graph capture and replay inside a graph."""

from __future__ import annotations

import pytest
import torch

from qcompile.kernels import reference, tuning
from qcompile.kernels.reference import w4
from qcompile.kernels.tolerances import INT4_DEQUANT_DB, LORA_BRANCH_DB, SUM_ORDER_DB
from qcompile.metrics import sqnr

from .helpers import on

pytestmark = pytest.mark.gpu
ops = torch.ops.qcompile
CUDA = "cuda"


def _svdquant_args(fmt: str, group: int, m: int = 4096, k: int = 3072, n: int = 3072):
    x = torch.randn(m, k, dtype=torch.bfloat16)
    packed, scale, global_scale = w4.quantize_4bit(torch.randn(n, k), fmt, group)
    branch = (
        (torch.randn(32, k) * 0.05).to(torch.bfloat16),
        (torch.randn(n, 32) * 0.05).to(torch.bfloat16),
    )
    return (x, packed, scale, global_scale, torch.randn(n).bfloat16(), torch.rand(k) + 0.5, *branch)


@pytest.mark.parametrize(("fmt", "group"), [("int4", 64), ("mxfp4", 32), ("nvfp4", 16)])
def test_w4a4_op_at_flux_shape_matches_cpu_reference(fmt, group):
    args = _svdquant_args(fmt, group)
    y = ops.linear_w4a4(*on(CUDA, *args), fmt, group)
    assert sqnr(w4.linear_w4a4(*args, fmt, group), y.cpu()) >= LORA_BRANCH_DB[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 4096])
def test_weight_only_and_w8a8_ops_match_cpu_reference(m):
    x, w = torch.randn(m, 3072, dtype=torch.bfloat16), torch.randn(3072, 3072)
    packed, scale, _ = w4.quantize_4bit(w, "int4", 64)
    y = ops.linear_int4_wo(*on(CUDA, x, packed, scale, None), 64)
    expected = reference.linear_int4_wo(x, packed, scale, None, 64)
    assert sqnr(expected, y.cpu()) >= INT4_DEQUANT_DB[torch.bfloat16]
    q, s = reference.quantize_fp8_per_channel(w)
    x_q, x_scale = ops.quantize_act_dynamic(x.to(CUDA), torch.float8_e4m3fn)
    ref_q, ref_scale = reference.quantize_act_dynamic(x, torch.float8_e4m3fn)
    assert torch.equal(x_q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    y = ops.linear_fp8_w8a8(x_q, x_scale, *on(CUDA, q, s, None), torch.bfloat16)
    expected = reference.linear_w8a8(ref_q, ref_scale, q, s, None, torch.bfloat16)
    assert sqnr(expected, y.cpu()) >= SUM_ORDER_DB[torch.bfloat16]


def test_cuda_graph_replays_after_warmup():
    args = on(CUDA, *_svdquant_args("int4", 64, m=512))
    static_x = args[0]
    y = ops.linear_w4a4(*args, "int4", 64)  # warm: compiles and tunes outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.linear_w4a4(static_x, *args[1:], "int4", 64)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.linear_w4a4(static_x, *args[1:], "int4", 64))
    assert not torch.equal(captured, y)


def test_tuning_skipped_during_capture():
    tuner = tuning.Tuner("probe", tuning.config(BLOCK=1), [tuning.config(BLOCK=2)])
    launched = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chosen = tuner.pick(("shape",), torch.device(CUDA), launched.append)
    assert chosen == tuner.default and not launched and not tuner.best
