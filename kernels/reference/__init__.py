"""Plain-PyTorch references for every qcompile format and op (no Triton import).

Notation used across the references and kernels:
    M  rows of the activation (tokens × batch), K  input features, N  output features,
    G  group size along K (per-group formats), Kp  K rounded up to a multiple of G.

The references are the CPU implementations of the ``qcompile::`` ops and the ground
truth the Triton kernels are tested against: packing bitwise, GEMMs by SQNR.
"""

from qcompile.kernels.reference.fp8 import (
    FP8_E4M3_MAX,
    dequantize_fp8_per_channel,
    linear_fp8_wo,
    quantize_fp8_per_channel,
)
from qcompile.kernels.reference.int4 import (
    dequantize_int4_per_group,
    linear_int4_wo,
    pack_int4,
    quantize_int4_per_group,
    unpack_int4,
)
from qcompile.kernels.reference.int8 import (
    dequantize_int8_per_channel,
    linear_int8_wo,
    quantize_int8_per_channel,
)

__all__ = [
    "FP8_E4M3_MAX",
    "dequantize_fp8_per_channel",
    "dequantize_int4_per_group",
    "dequantize_int8_per_channel",
    "linear_fp8_wo",
    "linear_int4_wo",
    "linear_int8_wo",
    "pack_int4",
    "quantize_fp8_per_channel",
    "quantize_int4_per_group",
    "quantize_int8_per_channel",
    "unpack_int4",
]
