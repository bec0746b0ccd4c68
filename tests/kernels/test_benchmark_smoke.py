"""benchmarks/kernels.py runs end to end (``--smoke``: CPU references, tiny shapes) and
writes the table's JSON with every row, ratio and the run's metadata; benchmarks/e2e.py
builds FLUX.1-dev's shape from meta (its smoke run is the GPU plan's e2e step, checked
in test_gpu_plan.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
ROWS = {"bf16", "scaled_mm", "scaled_mm_row", "fp8_gemm", "fp8_w8a8", "int8_w8a8",
        "int4_w4a16", "mxfp4_w4a16", "svdq_w4a4", "svdq_nvfp4"}  # fmt: skip


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _smoke_payload(module: str, out: Path, *args: str) -> dict:
    """Run `module --smoke`; its JSON, checked for what every smoke run writes."""
    done = _run(module, "--smoke", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smoke run" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["mode"].startswith("smoke") and payload["targets"] is None
    assert {"torch", "device", "date", "command"} <= set(payload["meta"])
    return payload


def test_kernel_benchmark_smoke_run_writes_every_row(tmp_path):
    payload = _smoke_payload("kernels", tmp_path / "kernels.json")
    for result in payload["results"]:
        measured = {name for name, row in result["rows"].items() if row is not None}
        # _scaled_mm may be missing on a CPU build; every qcompile op must run
        assert ROWS - {"scaled_mm", "scaled_mm_row"} <= measured <= ROWS
        for name in measured:
            row = result["rows"][name]
            assert row["ms"] > 0 and row["tflops"] > 0
            assert abs(row["vs_bf16"] - result["rows"]["bf16"]["ms"] / row["ms"]) < 1e-9


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU it runs the benchmark")
@pytest.mark.parametrize("module", ["kernels", "e2e"])
def test_benchmarks_refuse_to_run_without_a_gpu_unless_smoke(module):
    done = _run(module)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


def test_e2e_flux_builder_materialises_meta_weights_and_runs():
    # in a subprocess from the repository root, where `benchmarks` is importable
    code = textwrap.dedent("""
        import torch
        from benchmarks.e2e import flux_dev, flux_inputs

        small = dict(in_channels=16, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                     pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        model = flux_dev("cpu", torch.float32, config=small)
        assert not any(t.is_meta for t in model.state_dict().values())
        linear = model.transformer_blocks[0].attn.to_q
        assert 0.01 < linear.weight.std() < 0.03 and not linear.bias.any()
        norm_q = model.transformer_blocks[0].attn.norm_q.weight
        assert torch.equal(norm_q, torch.ones_like(norm_q))
        inputs = flux_inputs(model, image_tokens=16, text_tokens=8, device="cpu",
                             dtype=torch.float32)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        assert out.shape == (1, 16, 16) and torch.isfinite(out).all()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
