"""scripts/aot_check.py, the AOT compile gate: it must see every kernel and compile.

CI runs the whole gate (scripts/aot.sh, both Tritons, every config); these tests keep
its collection honest in the plain tier: a new @triton.jit kernel that no launcher case
reaches, or a format collected where the CUDA dispatch would not launch it, fails here.
The gate runs in a subprocess because it needs the compiled (not interpreted) kernels.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
GATE = REPO / "scripts" / "aot_check.py"


def gate(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(GATE), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def defined_kernels() -> set[str]:
    found = set()
    decorated = re.compile(r"@triton\.jit(?:\([^)]*\))?\ndef (_\w+_kernel)\(")
    for path in (REPO / "kernels").glob("*.py"):
        found |= set(decorated.findall(path.read_text()))
    return found


def collected() -> list[tuple[str, str, str]]:
    """(target, kernel, case) per collected launch."""
    rows = []
    for line in gate("--collect-only").splitlines():
        if line.startswith("sm_"):
            target, kernel, rest = line.split(maxsplit=2)
            rows.append((target, kernel, rest))
    return rows


def test_every_kernel_is_collected_on_every_target():
    rows = collected()
    assert defined_kernels(), "no @triton.jit kernels found: the pattern is stale"
    for target in ("sm_90", "sm_89", "sm_80"):
        seen = {kernel for t, kernel, _ in rows if t == target}
        # _amax_kernel serves NVFP4 only, which runs its reference below sm_89; the TMA
        # kernels need sm_90
        expected = defined_kernels() - ({"_amax_kernel"} if target == "sm_80" else set())
        if target != "sm_90":
            expected -= {kernel for kernel in expected if kernel.endswith("_tma_kernel")}
        assert seen == expected - {"_w4a4_scaled_kernel"}, target
    # Blackwell: MXFP4/NVFP4 W4A4 with 16-bit x, the block-scaled GEMM
    for target in ("sm_100", "sm_120"):
        seen = {kernel for t, kernel, _ in rows if t == target}
        assert seen == {"_w4a4_scaled_kernel", "_act_4bit_kernel", "_amax_kernel"}, target
        assert not [case for t, _, case in rows if t == target and " fp32 " in case]
    fp8_on_ampere = [case for t, _, case in rows if t == "sm_80" and re.search(r"fp8|fp4", case)]
    assert fp8_on_ampere == []
    # Small M (decode-like calls, classifier-free guidance) compiles nothing the Flux-sized
    # M does not (no kernel specializes on M: tuning.ROWS) but what it dispatches
    # differently: the two launches of the W4A8 activation pass that splits K for a
    # dynamic scale, and the fused 4-bit weight-only kernel's default config (the Flux
    # shape dequantizes once instead, untuned). A launch is named after the first case
    # that makes it, and the Flux shape is collected first.
    small = [(kernel, case) for _, kernel, case in rows if re.search(r" m(1|2|4|8|16) ", case)]
    assert {kernel for kernel, _ in small} == {"_act_w4a8_kernel", "_weight_only_kernel"}
    assert not [case for _, case in small if " static" in case]  # a static scale: one walk
    assert all(re.search(r"int4|fp4", case) for k, case in small if k == "_weight_only_kernel")
    assert any(" odd " in case for _, _, case in rows)  # unaligned launches are their own


def test_a_kernel_compiles_and_reports_its_resources():
    out = gate("--cc", "80", "--only", "smooth", "--verbose", "--jobs", "1", "--no-cache")
    line = next(row for row in out.splitlines() if row.startswith("sm_80 _smooth_kernel"))
    registers = int(re.search(r"regs +(\d+)", line).group(1))
    assert registers > 0  # read from ptxas' log: the compile really reached ptxas
    assert "0 problems" in out
