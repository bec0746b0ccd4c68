"""The bit-exact helpers every kernel builds on, against torch's own conversions."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.kernels import numerics
from qcompile.kernels.reference import fp4


@triton.jit
def _helpers_kernel(
    x_ptr, e4m3_ptr, bf16_ptr, e2m1_ptr, decoded_ptr, rne_ptr, n, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(e4m3_ptr + offs, numerics.round_e4m3(x).to(tl.float8e4nv), mask=mask)
    tl.store(bf16_ptr + offs, numerics.cast_rne(x, tl.bfloat16), mask=mask)
    code = numerics.encode_e2m1(x)
    tl.store(e2m1_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(decoded_ptr + offs, numerics.decode_e2m1(code), mask=mask)
    tl.store(rne_ptr + offs, numerics.rne(x), mask=mask)


def _inputs(device: str) -> torch.Tensor:
    # every e4m3 value, the midpoints between neighbours (ties), every e2m1 midpoint, and
    # random floats over many binades, both signs
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    grid = e4m3.float()[~e4m3.float().isnan()].sort().values
    ties = (grid[1:] + grid[:-1]) / 2
    e2m1_ties = (fp4.E2M1_VALUES[1:] + fp4.E2M1_VALUES[:-1]) / 2
    wide = torch.randn(4096) * torch.exp2(torch.randint(-12, 10, (4096,)).float())
    halves = torch.arange(-40, 41, dtype=torch.float32) / 2  # integer ties for rne
    x = torch.cat(
        [grid, ties, -ties, e2m1_ties, -e2m1_ties, wide, halves, torch.tensor([500.0, -1e4])]
    )
    return x.to(device)


def test_helpers_match_torch_bitwise(device):
    x = _inputs(device)
    n = x.numel()
    e4m3 = numerics.alloc((n,), torch.float8_e4m3fn, x.device)
    bf16 = numerics.alloc((n,), torch.bfloat16, x.device)
    e2m1 = numerics.alloc((n,), torch.uint8, x.device)
    decoded = numerics.alloc((n,), torch.float32, x.device)
    rounded = numerics.alloc((n,), torch.float32, x.device)
    _helpers_kernel[(triton.cdiv(n, 1024),)](x, e4m3, bf16, e2m1, decoded, rounded, n, BLOCK=1024)
    cpu = x.cpu()
    expected_e4m3 = cpu.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(e4m3.cpu().view(torch.uint8), expected_e4m3.view(torch.uint8))
    assert torch.equal(bf16.cpu(), cpu.to(torch.bfloat16))
    assert torch.equal(e2m1.cpu(), fp4.encode_e2m1(cpu))
    assert torch.equal(decoded.cpu(), fp4.decode_e2m1(fp4.encode_e2m1(cpu)))
    assert torch.equal(rounded.cpu(), torch.round(cpu))
