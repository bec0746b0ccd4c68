"""Test tiers: plain (CPU, always), `interpreter`, `gpu` (skipped without CUDA), `slow`."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. @triton.jit reads the
# variable when it decorates, so it is set here, before any test module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (one worker per core) each worker, and every process it starts,
# keeps to one intra-op thread, so the workers do not oversubscribe the cores and a
# fresh-process reload sums in the same order as the worker (bitwise comparisons).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Inductor compiles its C++ kernels in the calling process: starting its pool of
# compile workers costs more than it saves for the tiny graphs here (measured: the
# Flux fullgraph and compile-mode tests 60.8 s → 46.0 s on 2 cores). Subprocesses
# (the benchmark smoke runs) inherit it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
