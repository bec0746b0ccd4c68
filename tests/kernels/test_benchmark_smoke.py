"""benchmarks/kernels.py runs end to end (``--smoke``: CPU references, tiny shapes) and
writes the table's JSON with every row, ratio and the run's metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
ROWS = {"bf16", "scaled_mm", "scaled_mm_row", "fp8_gemm", "fp8_w8a8", "int8_w8a8",
        "int4_w4a16", "mxfp4_w4a16", "svdq_w4a4", "svdq_nvfp4"}  # fmt: skip


def test_kernel_benchmark_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "kernels.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smoke run" in done.stdout
    payload = json.loads(out.read_text())
    assert payload["mode"].startswith("smoke") and payload["targets"] is None
    assert {"torch", "device", "date", "command"} <= set(payload["meta"])
    for result in payload["results"]:
        measured = {name for name, row in result["rows"].items() if row is not None}
        # _scaled_mm may be missing on a CPU build; every qcompile op must run
        assert ROWS - {"scaled_mm", "scaled_mm_row"} <= measured <= ROWS
        for name in measured:
            row = result["rows"][name]
            assert row["ms"] > 0 and row["tflops"] > 0
            assert abs(row["vs_bf16"] - result["rows"]["bf16"]["ms"] / row["ms"]) < 1e-9


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU it runs the benchmark")
def test_kernel_benchmark_refuses_to_run_without_a_gpu_unless_smoke():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
