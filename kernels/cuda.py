"""CUDA implementations of the ``qcompile::`` ops: the Triton kernels.

Importing this module registers, for the CUDA dispatch key of every op, a function that
imports its kernel module on first use (Triton loads only on a machine that launches a
kernel) and calls the launcher. CPU tensors keep running the references registered in
``ops.py``.

FP8 (and the FP4 formats, whose scales or MMA operands are e4m3) needs sm_89 or newer;
on older GPUs those ops run their reference on the GPU instead, with a one-time warning.
On Blackwell, MXFP4/NVFP4 W4A4 with 16-bit activations runs the block-scaled MMA
(``gemm_w4a4._w4a4_scaled_kernel``); with float32 activations, its reference (no W4A4
kernel compiles spill-free for float32 there).
"""

from __future__ import annotations

import logging
from functools import cache

import torch

from qcompile.kernels import ops, reference

log = logging.getLogger(__name__)

FP8_CAPABILITY = (8, 9)
BLOCK_SCALED_CAPABILITY = (10, 0)  # the FP4 block-scaled MMA: sm_100, sm_120
# Weight formats whose kernels need FP8 (e4m3 operands or scales): sm_89 and newer.
FP8_FORMATS = frozenset({"fp8", "mxfp4", "nvfp4"})


@cache
def _has_fp8(index: int) -> bool:
    ok = torch.cuda.get_device_capability(index) >= FP8_CAPABILITY
    if not ok:
        log.warning(
            "qcompile: %s has no FP8 support (sm_89+ needed); FP8/FP4 ops run their "
            "PyTorch reference on it",
            torch.cuda.get_device_name(index),
        )
    return ok


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _fp8_ok(device: torch.device) -> bool:
    return _has_fp8(_index(device))


_capability = cache(torch.cuda.get_device_capability)


def block_scaled(device: torch.device) -> bool:
    """Whether `device` has the FP4 block-scaled MMA (Blackwell: sm_100, sm_120)."""
    return device.type == "cuda" and _capability(_index(device)) >= BLOCK_SCALED_CAPABILITY


@ops.linear_int8_wo.register_kernel("cuda")
def _(x, weight, weight_scale, bias):
    from qcompile.kernels.gemm_wo import linear_weight_only

    return linear_weight_only(x, weight, weight_scale, None, bias, None, None, "int8")


@ops.linear_fp8_wo.register_kernel("cuda")
def _(x, weight, weight_scale, bias):
    if not _fp8_ok(x.device):
        return reference.linear_fp8_wo(x, weight, weight_scale, bias)
    from qcompile.kernels.gemm_wo import linear_weight_only

    return linear_weight_only(x, weight, weight_scale, None, bias, None, None, "fp8")


@ops.linear_int4_wo.register_kernel("cuda")
def _(x, weight, weight_scale, bias, group_size):
    from qcompile.kernels.gemm_wo import linear_weight_only

    return linear_weight_only(x, weight, weight_scale, None, bias, None, None, "int4", group_size)


@ops.quantize_act_static.register_kernel("cuda")
def _(x, scale, dtype):
    if dtype is torch.float8_e4m3fn and not _fp8_ok(x.device):
        return reference.quantize_act_static(x, scale, dtype)
    from qcompile.kernels.quantize_act import quantize_act_static

    return quantize_act_static(x, scale, dtype)


@ops.quantize_act_dynamic.register_kernel("cuda")
def _(x, dtype):
    if dtype is torch.float8_e4m3fn and not _fp8_ok(x.device):
        return reference.quantize_act_dynamic(x, dtype)
    from qcompile.kernels.quantize_act import quantize_act_dynamic

    return quantize_act_dynamic(x, dtype)


@ops.linear_int8_w8a8.register_kernel("cuda")
def _(x_q, x_scale, weight, weight_scale, bias, out_dtype):
    from qcompile.kernels.gemm_w8a8 import linear_w8a8

    return linear_w8a8(x_q, x_scale, weight, weight_scale, bias, out_dtype)


@ops.linear_fp8_w8a8.register_kernel("cuda")
def _(x_q, x_scale, weight, weight_scale, bias, out_dtype):
    if not _fp8_ok(x_q.device):
        return reference.linear_w8a8(x_q, x_scale, weight, weight_scale, bias, out_dtype)
    from qcompile.kernels.gemm_w8a8 import linear_w8a8

    return linear_w8a8(x_q, x_scale, weight, weight_scale, bias, out_dtype)


@ops.linear_w4a16.register_kernel("cuda")
def _(x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size):
    args = (x, weight, weight_scale, weight_global_scale, bias, lora_down, lora_up, fmt, group_size)
    if fmt in FP8_FORMATS and not _fp8_ok(x.device):
        return reference.w4.linear_w4a16(*args)
    from qcompile.kernels.gemm_wo import linear_weight_only

    return linear_weight_only(*args)


@ops.linear_w4a4.register_kernel("cuda")
def _(
    x, weight, weight_scale, weight_global_scale, bias, smooth, lora_down, lora_up, fmt, group_size
):
    args = (
        x, weight, weight_scale, weight_global_scale, bias, smooth, lora_down, lora_up, fmt,
        group_size,
    )  # fmt: skip
    if fmt in FP8_FORMATS and not _fp8_ok(x.device):
        return reference.w4.linear_w4a4(*args)
    if fmt in FP8_FORMATS and x.dtype is torch.float32 and block_scaled(x.device):
        return reference.w4.linear_w4a4(*args)  # no spill-free kernel there: gemm_w4a4.py
    from qcompile.kernels.gemm_w4a4 import linear_w4a4

    return linear_w4a4(*args)


@ops.linear_w4a8.register_kernel("cuda")
def _(
    x, weight, weight_group_scale, weight_scale, bias, smooth, lora_down, lora_up, input_scale,
    group_size,
):  # fmt: skip
    from qcompile.kernels.gemm_w4a8 import linear_w4a8

    return linear_w4a8(
        x, weight, weight_group_scale, weight_scale, bias, smooth, lora_down, lora_up, input_scale
    )


@ops.smooth.register_kernel("cuda")
def _(x, factors):
    from qcompile.kernels.quantize_act import smooth

    return smooth(x, factors)
