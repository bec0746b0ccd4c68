"""Every ``qcompile::`` op has a CUDA implementation (the Triton kernels) next to its CPU
reference, and the launch-config tuner's rules."""

from __future__ import annotations

import torch
from torch._library.custom_ops import CustomOpDef

from qcompile.kernels import ops, tuning


def _ops() -> list[str]:
    return sorted(value._qualname for value in vars(ops).values() if isinstance(value, CustomOpDef))


def test_every_op_has_a_cuda_kernel():
    names = _ops()
    assert len(names) == 11  # 3 weight-only, 2 act-quant, 2 W8A8, 3 4-bit linears, smooth
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert missing == []


def test_cpu_calls_run_the_reference():
    x = torch.randn(3, 40)
    q, scale = torch.ops.qcompile.quantize_act_dynamic(x, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)


def test_tuner_uses_the_default_off_hopper():
    tuner = tuning.Tuner("probe", tuning.config(BLOCK=1), [tuning.config(BLOCK=2)])
    launched = []
    assert tuner.pick(("k",), torch.device("cpu"), launched.append) == tuner.default
    assert launched == [] and tuner.best == {}


def test_only_16_bit_aligned_launches_are_tuned():
    assert tuning.tunes(torch.bfloat16, 3072, 12288) and tuning.tunes(torch.float16, 16)
    assert not tuning.tunes(torch.float32, 3072, 3072)  # float32: precision, not speed
    assert not tuning.tunes(torch.bfloat16, 200, 3072)  # unaligned K: the wide tiles spill
    tuner = tuning.Tuner("probe", tuning.config(BLOCK=1), [tuning.config(BLOCK=2)])
    launched = []
    device = torch.device("cpu")
    assert tuner.pick(("k",), device, launched.append, tune=False) == tuner.default
    assert launched == []


def test_m_buckets_and_config_floors():
    assert [tuning.m_bucket(m) for m in (1, 2, 3, 512, 4097, 10**6)] == [1, 2, 4, 512, 8192, 16384]
    c = tuning.config(num_warps=8, BLOCK_K=64, BLOCK_M=16)
    assert c.at_least(BLOCK_K=128).meta == {"BLOCK_K": 128, "BLOCK_M": 16}
    assert c.at_least(BLOCK_K=32) == c
    assert c.kwargs() == {"BLOCK_K": 64, "BLOCK_M": 16, "num_warps": 8, "num_stages": 3}


def test_row_passes_split_k_only_where_row_blocks_leave_the_gpu_idle():
    from qcompile.kernels.gemm_parts import act_splits

    c = tuning.config(BLOCK_M=32, BLOCK_K=64)
    assert act_splits(4608, 3072, c, 132) == (1, 3072)  # 144 row blocks fill 132 SMs
    assert act_splits(1, 3072, c, 132) == (48, 64)  # one row block: every 64-wide step
    assert act_splits(256, 3072, c, 132) == (24, 128)  # 8 row blocks × 24 ranges
    ranges, k_range = act_splits(1, 200, c, 132)  # a ragged K: the ranges cover it
    assert ranges * k_range >= 200 > (ranges - 1) * k_range
