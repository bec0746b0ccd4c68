"""The performance model (benchmarks/roofline.py) and the SASS main-loop reader it steers
by (benchmarks/sass.py). CI runs the model on every compiled kernel with --check in
scripts/aot.sh; these tests pin what each part of the model must do on inputs small
enough to reason about by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not a package

from benchmarks import roofline  # noqa: E402
from benchmarks.sass import main_loop  # noqa: E402

# nvdisasm -c output, shortened: a pipelined FP8 wgmma loop, then the trap's spin loop
WGMMA_LOOP = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0200*/                   DEPBAR.LE SB0, 0x2 ;
        /*0210*/                   WARPGROUP.ARRIVE ;
        /*0220*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24 ;
        /*0230*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR12], R24, gsb0 ;
        /*0240*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0250*/                   UTMALDG.2D [UR16], [UR4] ;
        /*0260*/                   LDGSTS.E.BYPASS.128 [R5+0x1000], desc[UR14][R8.64], P0 ;
        /*0270*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0280*/              @!P0 BRA `(.L_x_1) ;
        /*0290*/                   EXIT ;
.L_x_2:
        /*02a0*/                   BRA `(.L_x_2);
"""

# a row pass: two loops over K (amax, then the codes), no MMA
ROW_PASS = """
.L_x_0:
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   FMNMX R8, |R4|, R8, !PT ;
        /*0120*/               @P0 BRA `(.L_x_0) ;
.L_x_3:
        /*0200*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0210*/                   FMUL R4, R4, R9 ;
        /*0220*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB R4, R4, R5 ;
        /*0230*/                   STG.E R4, desc[UR4][R6.64] ;
        /*0240*/               @P0 BRA `(.L_x_3) ;
"""


def test_main_loop_reads_a_wgmma_loop():
    loop = main_loop(WGMMA_LOOP)
    assert loop.found and loop.loops == 1  # the trap's spin (a branch to itself) is none
    assert loop.instructions == 9  # .L_x_1 up to and including its branch
    assert (loop.mma_kind, loop.mma_bits, loop.mma) == ("wgmma", 8, 2)
    assert loop.macs == 2 * 64 * 128 * 32
    assert (loop.tma, loop.cp_async, loop.ld_global) == (1, 1, 0)
    assert loop.wgmma_wait == 1


def test_main_loop_of_a_row_pass_is_both_loops():
    loop = main_loop(ROW_PASS)
    assert loop.found and loop.mma == 0 and loop.wgmma_wait == -1
    assert loop.instructions == loop.pass_instructions == 3 + 5
    assert loop.ld_global == 2


def gemm(wait: int = 1, instructions: int = 100, warps: int = 8, shared: int = 150_000):
    """A 128×256×128 FP8 wgmma GEMM that fits one CTA per SM."""
    loop = dict(main_loop(WGMMA_LOOP).__dict__)
    # two warpgroups; each warp's stream does its warpgroup's 64×256×128 per iteration
    loop.update(instructions=instructions, macs=64 * 256 * 128, wgmma_wait=wait)
    meta = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}
    return roofline.Compiled("_w8a8_kernel", "128×256×128", meta, warps, shared, 128, loop)


def test_a_wave_more_costs_a_round_more():
    one_wave = 132 * 128  # 132 tiles of 128 rows at N = 256
    at_one = roofline.model(gemm(), one_wave, 4096, 256, 8, 8)
    at_one_more = roofline.model(gemm(), one_wave + 1, 4096, 256, 8, 8)
    assert at_one.ctas_per_sm == 1 and at_one.bound == "tensor"
    assert at_one_more.seconds == pytest.approx(2 * at_one.seconds)


def test_tensor_bound_loop_runs_at_the_sustained_fraction_of_peak():
    part = roofline.model(gemm(), 132 * 128, 4096, 256, 8, 8)
    flops = 2 * 132 * 128 * 4096 * 256 / part.seconds
    sustained = dict(roofline.H100.sustained)[8]
    peak = 4096 * 2 * roofline.H100.sms * roofline.H100.clock_hz
    assert flops == pytest.approx(peak * sustained)


def test_a_wait_zero_loop_serializes_and_an_issue_bound_loop_is_slower():
    pipelined = roofline.model(gemm(wait=1), 4608, 3072, 12288, 8, 8)
    serialized = roofline.model(gemm(wait=0), 4608, 3072, 12288, 8, 8)
    assert serialized.bound == "wgmma wait 0" and serialized.seconds > pipelined.seconds
    busy = roofline.model(gemm(instructions=2000), 4608, 3072, 12288, 8, 8)
    assert busy.bound == "issue" and busy.seconds > pipelined.seconds


def test_occupancy_counts_shared_memory_registers_and_warps():
    assert roofline.occupancy(gemm(shared=150_000)) == 1
    assert roofline.occupancy(gemm(shared=50_000)) == 2  # registers: 128 × 256 threads
    small = roofline.Compiled("_x", "", {}, 4, 0, 32, {})
    assert roofline.occupancy(small) == 16  # 64 warps per SM


def test_decode_is_bound_by_the_weight_read():
    row = next(r for r in roofline.ROWS if r.name == "int4 weight-only g64")
    seconds = roofline.hbm_seconds(row, 1, 3072, 12288)
    weight = 12288 * 3072 * (4 + 32 / 64) / 8
    assert seconds == pytest.approx(weight / 3.35e12, rel=0.01)
    # bf16's baseline at M = 1 is its own weight read, 16 bits per element
    assert roofline.bf16_seconds(1, 3072, 12288) == pytest.approx(
        12288 * 3072 * 2 / 3.35e12, rel=0.01
    )


def test_check_reports_a_ratio_under_its_floor_and_a_lost_loop_property(monkeypatch):
    row = roofline.ROWS[0]
    part = roofline.Part("_w8a8_kernel", "", 1e-3, "tensor", 1, {"tma": 0, "wgmma_wait": 1})
    slow = roofline.Prediction(row.name, roofline.FLUX_MLP, [part], 1e-3, 0, 1e-3, 0.5, None)
    monkeypatch.setitem(roofline.LOOP_NEEDS, row.name, {"tma": 1})
    found = roofline.problems([slow])
    assert any("floor" in problem for problem in found)
    assert any("tma" in problem for problem in found)


def test_every_floor_names_a_row_and_a_modeled_shape():
    names = {row.name for row in roofline.ROWS}
    assert set(roofline.FLOORS) <= names and set(roofline.LOOP_NEEDS) <= names
    for shapes in roofline.FLOORS.values():
        assert set(shapes) <= set(roofline.SHAPES)
        assert all(0 < floor < math.inf for floor in shapes.values())
