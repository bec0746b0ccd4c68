"""What a kernel needs to load and store through Hopper's Tensor Memory Accelerator.

TMA copies a whole tile between global and shared memory from a descriptor (base, sizes,
strides, tile shape) without the warps computing addresses; reads past the tensor's
edge come back as zeros and writes past it are dropped, so a TMA kernel needs no masks.
The descriptors are made on the host (``triton.tools.tensor_descriptor``) per launch.
Hardware rules: sm_90 or later, a 16-byte aligned base, every stride but the last a
multiple of 16 bytes, the last dimension contiguous.
"""

from __future__ import annotations

import functools

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

TMA_CAPABILITY = (9, 0)
# Programs of a persistent kernel where there is no GPU to ask (the interpreter, which
# runs programs one after another): a handful, so each walks several tiles.
INTERPRETER_PROGRAMS = 3


def tma_capable(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device.index) >= TMA_CAPABILITY


def tma_aligned(t: torch.Tensor) -> bool:
    """Whether TMA can address `t` (2-D, last dim contiguous, 16-byte base and rows)."""
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and t.data_ptr() % 16 == 0
        and (t.stride(0) * t.element_size()) % 16 == 0
    )


def descriptor(t: torch.Tensor, *block: int) -> TensorDescriptor:
    """A host-side TMA descriptor of `t` with tile shape `block`."""
    return TensorDescriptor.from_tensor(t, list(block))


def program_count(device: torch.device) -> int:
    """A persistent kernel's grid: one program per SM."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
