"""A compiled kernel's main loop, read from its SASS (what the AOT gate and the
performance model in ``benchmarks/roofline.py`` steer by).

``nvdisasm -c`` prints one instruction per line (``/*0a30*/ QGMMA.64x256x32.F32.E4M3.E4M3
R24, gdesc[UR8], R24 ;``), labels (``.L_x_1:``) and branches (``BRA `(.L_x_1)``). A
backward branch closes a loop; the main loop is the innermost one that runs MMA.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?PT?\d*\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
SASS_BRANCH = re.compile(r"`\((\.L_x_\d+)\)")
# warpgroup MMA: one instruction per warpgroup is one m×n×k product
WGMMA_SHAPE = re.compile(r"^[HQI]GMMA\.(\d+)x(\d+)x(\d+)")
# warp MMA (mma.sync): m16n8k16 is HMMA.16816, m16n8k32 IMMA.16832, …
WARP_MMA_SHAPE = re.compile(r"^[HI]MMA\.(16)(8)(8|16|32)\b")
WGMMA_WAIT = re.compile(r"gsb0, 0x([0-9a-f]+)")


@dataclass
class MainLoop:
    """The innermost SASS loop that runs MMA (without MMA, the outermost loops together,
    each walking K once): one warp's instructions per iteration. `macs` sums m·n·k over
    that warp's MMA instructions: a CTA does that many per warpgroup (wgmma) or per warp
    (mma)."""

    found: bool = False
    instructions: int = 0
    macs: int = 0
    mma_kind: str = ""  # "wgmma" (HGMMA/QGMMA/IGMMA), "mma" (HMMA/IMMA) or ""
    mma_bits: int = 0  # operand width: 8 (QGMMA/IGMMA/IMMA) or 16
    mma: int = 0  # MMA instructions
    tma: int = 0  # UTMALDG: TMA loads
    cp_async: int = 0  # LDGSTS
    ld_global: int = 0  # LDG: loads through registers
    ld_shared: int = 0  # LDS / LDSM
    st_shared: int = 0  # STS: a tile staged through shared memory by the warps
    barriers: int = 0  # BAR.SYNC / BAR.ARV
    wgmma_wait: int = -1  # smallest WARPGROUP.DEPBAR depth in the loop; -1 without wgmma
    loops: int = 0  # backward branches in the kernel
    pass_instructions: int = 0  # the outermost loops together: a row pass's K walk(s)


def sass(cubin: bytes) -> str:
    """The cubin's SASS, from the nvdisasm that ships in the Triton wheel."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        done = subprocess.run([str(nvdisasm), "-c", file.name], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvdisasm failed: {done.stderr.strip()}")
    return done.stdout


def main_loop(text: str) -> MainLoop:
    """Reads `text` (nvdisasm output) for the kernel's main loop; see `MainLoop`."""
    opcodes: list[tuple[str, str]] = []
    labels: dict[str, int] = {}
    loops: list[tuple[int, int]] = []  # [first, last] instruction index
    for line in text.splitlines():
        if label := SASS_LABEL.match(line):
            labels[label.group(1)] = len(opcodes)
        elif instruction := SASS_LINE.match(line):
            opcode, operands = instruction.groups()
            target = SASS_BRANCH.search(operands)
            if opcode == "BRA" and target and labels.get(target.group(1), 1 << 30) < len(opcodes):
                loops.append((labels[target.group(1)], len(opcodes)))
            opcodes.append((opcode, operands))
    bodies = [opcodes[first : last + 1] for first, last in loops]
    with_mma = [b for b in bodies if any(_macs(op) for op, _ in b)]
    # a row pass walks K once per outermost loop (dynamic scales walk it twice)
    outer = [(f, la) for f, la in loops if not any(g < f and la < h for g, h in loops)]
    passes = [instruction for f, la in outer for instruction in opcodes[f : la + 1]]
    body = min(with_mma, key=len) if with_mma else passes  # innermost that multiplies
    if not body:
        return MainLoop(loops=0)
    loop = MainLoop(found=True, instructions=len(body), loops=len(loops))
    loop.pass_instructions = len(passes)
    waits = []
    for opcode, operands in body:
        macs = _macs(opcode)
        if macs:
            loop.mma += 1
            loop.macs += macs
            loop.mma_kind = "wgmma" if "GMMA" in opcode else "mma"
            loop.mma_bits = 16 if opcode.startswith("H") else 8
        loop.tma += opcode.startswith("UTMALDG")
        loop.cp_async += opcode.startswith("LDGSTS")
        loop.ld_global += opcode.startswith("LDG.")
        loop.ld_shared += opcode.startswith(("LDS.", "LDS ", "LDSM"))
        loop.st_shared += opcode.startswith("STS")
        loop.barriers += opcode.startswith("BAR.")
        if opcode.startswith("WARPGROUP.DEPBAR") and (wait := WGMMA_WAIT.search(operands)):
            waits.append(int(wait.group(1), 16))
    loop.wgmma_wait = min(waits, default=-1)
    return loop


def _macs(opcode: str) -> int:
    """Multiply-adds of one MMA instruction for the whole warp (or warpgroup)."""
    if shape := WGMMA_SHAPE.match(opcode):
        m, n, k = map(int, shape.groups())
        return m * n * k
    if shape := WARP_MMA_SHAPE.match(opcode):
        m, n, k = map(int, shape.groups())
        return m * n * k
    return 0
