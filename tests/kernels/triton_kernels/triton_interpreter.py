"""The one place the tests correct Triton's interpreter (test-only; the compiled kernels
are untouched).

Triton's interpreter decodes every ``tl.dot_scaled`` scale as e8m0: its private
``triton.runtime.interpreter._dot_scaled_scale_to_f32`` shifts the scale byte into a
float32 exponent whatever the scale's type. NVFP4's block scales are e4m3, which the
compiler hands to the block-scaled MMA as ``ue4m3`` (sm_100 ``kind::mxf4nvf4``, sm_120
``mma.sync … ue4m3``), so under ``TRITON_INTERPRET`` an NVFP4 ``dot_scaled`` comes out
wrong while the compiled kernel is right. `e4m3_scales` decodes e4m3 scales as e4m3 and
leaves every other scale to Triton.

Written for the interpreter of Triton 3.9 (the venv's; 3.6, the GPU machines', has the
same decoder). ``test_triton_interpreter.py`` fails loudly when the private name moves
or when Triton's own decoding becomes right (then this shim goes).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

WRITTEN_FOR = "3.9"
PRIVATE_NAME = "_dot_scaled_scale_to_f32"


@contextlib.contextmanager
def e4m3_scales():
    """Inside: the interpreter decodes float8e4nv ``dot_scaled`` scales as e4m3."""
    triton_decode = getattr(interpreter, PRIVATE_NAME, None)
    if triton_decode is None:
        raise RuntimeError(
            f"triton.runtime.interpreter.{PRIVATE_NAME} is gone (shim written for Triton "
            f"{WRITTEN_FOR}): see tests/kernels/triton_kernels/triton_interpreter.py"
        )

    def decode(scale_handle, compute_type):
        if scale_handle.dtype != tl.float8e4nv:
            return triton_decode(scale_handle, compute_type)
        codes = torch.from_numpy(np.ascontiguousarray(scale_handle.data).view(np.uint8))
        return codes.view(torch.float8_e4m3fn).float().numpy()

    setattr(interpreter, PRIVATE_NAME, decode)
    try:
        yield
    finally:
        setattr(interpreter, PRIVATE_NAME, triton_decode)
