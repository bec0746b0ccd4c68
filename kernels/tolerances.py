"""How close a GEMM kernel must come to its reference, in dB of SQNR, and why.

The references dequantize in float32 and multiply with one float32 matmul; the kernels
use the same codes and scales (bitwise, see the activation tests), so what remains is:

- float32 summation order (tensor-core tiles vs one matmul): ~1e-7 relative, measured
  ≥ 130 dB on float32 outputs;
- the final rounding to the output dtype, which a different float32 sum flips for a few
  elements: one ulp, 2⁻⁸ relative in bfloat16 and 2⁻¹¹ in float16 (measured ≥ 95 dB
  bfloat16, ≥ 93 dB float16 for the 8-bit GEMMs);
- the low-rank branch: lora_act is rounded to the branch's 16-bit dtype for the epilogue's
  tensor-core MMA (relative 2⁻⁹ bfloat16 / 2⁻¹² float16 on the branch term; measured
  ≥ 63 dB bfloat16, ≥ 81 dB float16 on outputs where the branch is ~10 % of the signal);
- W4A16 INT4: code × float32 group scale rounds to x's dtype in registers (2⁻⁹ in
  bfloat16; measured ≥ 51 dB bfloat16, ≥ 69 dB float16).
Measured: the interpreter, 3 seeds of the kernel tests' shapes (2026-11-22).
The thresholds sit below the smallest measured values by 5–8 dB: inputs are random.
"""

from __future__ import annotations

import torch

SUM_ORDER_DB = {torch.float32: 120.0, torch.float16: 85.0, torch.bfloat16: 80.0}
LORA_BRANCH_DB = {torch.float32: 120.0, torch.float16: 75.0, torch.bfloat16: 57.0}
INT4_DEQUANT_DB = {torch.float32: 120.0, torch.float16: 62.0, torch.bfloat16: 45.0}
