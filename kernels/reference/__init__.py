"""Plain-PyTorch references for every qcompile format and op (no Triton import).

Notation used across the references and kernels:
    M  rows of the activation (tokens × batch), K  input features, N  output features,
    G  group size along K (per-group formats), Kp  K rounded up to a multiple of G.

The references are the CPU implementations of the ``qcompile::`` ops and the ground
truth the Triton kernels are tested against: packing bitwise, GEMMs by SQNR.
"""

from qcompile.kernels.reference import fp4, w4, w4a8
from qcompile.kernels.reference.act import (
    linear_w8a8,
    quantize_act_dynamic,
    quantize_act_static,
)
from qcompile.kernels.reference.fp8 import (
    FP8_E4M3_MAX,
    dequantize_fp8_per_channel,
    linear_fp8_wo,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
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
    quantize_int8_per_tensor,
)

__all__ = [
    "FP8_E4M3_MAX",
    "dequantize_fp8_per_channel",
    "dequantize_int4_per_group",
    "dequantize_int8_per_channel",
    "fp4",
    "linear_fp8_wo",
    "linear_int4_wo",
    "linear_int8_wo",
    "linear_w8a8",
    "pack_int4",
    "quantize_act_dynamic",
    "quantize_act_static",
    "quantize_fp8_per_channel",
    "quantize_fp8_per_tensor",
    "quantize_int4_per_group",
    "quantize_int8_per_channel",
    "quantize_int8_per_tensor",
    "unpack_int4",
    "w4",
    "w4a8",
]
