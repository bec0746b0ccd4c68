"""Triton kernel tests, one body per kernel, run two ways:

- ``interpreter`` (CI): on CPU tensors under ``TRITON_INTERPRET=1``, which the root
  conftest sets when no GPU is present;
- ``gpu``: the same tests on CUDA tensors with compiled kernels (skipped without CUDA).

Every kernel output is poisoned (NaN / 0xA5) before launch, so an element a kernel does
not write fails the comparison.
"""

from __future__ import annotations

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            [
                pytest.param("cpu", marks=pytest.mark.interpreter, id="interpreter"),
                pytest.param("cuda", marks=pytest.mark.gpu, id="gpu"),
            ],
        )


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch, request):
    if (
        getattr(request.node, "callspec", None)
        and request.node.callspec.params.get("device") == "cpu"
        and not INTERPRETED
    ):
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set when no GPU is present)")
    from qcompile.kernels import numerics

    monkeypatch.setattr(numerics, "POISON", True)
