"""A paper model of each qcompile linear's time on an H100 SXM, read from the kernels'
compiled sm_90 code, with no GPU. A prediction, never a measurement.

The AOT gate (``scripts/aot_check.py``) compiles every launch and reads each sm_90
kernel's main loop from its SASS: one warp's instructions per iteration, the MMA work
per iteration, TMA / cp.async / plain loads and the wgmma wait depth; plus shared memory
and registers. This module turns that into a time for a linear of M tokens × K → N:

    occupancy c   CTAs per SM from shared memory (228 KiB per SM, 1 KiB reserved per
                  CTA), registers (64 Ki per SM) and warps (64 per SM)
    per iteration tensor = MACs / rate (bf16/fp16 2048, 8-bit 4096 MAC/clk/SM for
                  wgmma; mma.sync at 2/3 of that, an assumption), divided by the
                  sustained fraction of peak a pipelined loop reaches (below);
                  issue = instructions × warps / 4 (four schedulers, one warp
                  instruction per clock each); latency = instructions (one warp issues
                  at most one per clock, so a CTA never steps faster);
                  a loop whose wgmma waits to depth 0 serializes MMA and issue
    one SM        runs ⌈tiles / 132⌉ tiles, c at a time: each round costs
                  iterations × max(c·tensor, c·issue, c·L2, latency, tensor + issue
                  if depth 0)
                  L2 = the operand tiles an iteration loads / the SM's share of
                  5120 B/clk of L2 bandwidth (A100's whitepaper figure, assumed for
                  H100): what makes small tiles slow
    memory        unique HBM bytes (activation, packed weight and scales, output)
                  / 3.35 TB/s: perfect L2 reuse
    time          max(compute at 1.83 GHz, memory); launch cost, prologue and
                  epilogue are not counted (the row of a CUDA graph)

The two baselines are public marks from the project's FACTS, not modeled kernels:
cuBLAS bf16 at 790 TFLOP/s (or its weight read from HBM, whichever is slower), and
``torch._scaled_mm`` FP8 rowwise at 1190 / 0.98 = 1214 TFLOP/s. The sustained fractions
a tensor-bound loop is granted come from the same marks: 16-bit 790 / 989 = 0.80, 8-bit
1214 / 1979 = 0.61 (FP8 at full rate lowers the clock): the model cannot predict a
kernel faster than cuBLAS's own efficiency, and every gap it shows is wave
quantization, instruction issue, a serialized wgmma, or HBM.

    python -m benchmarks.roofline [--shape 4608x3072x12288 ...] [--check] [--json OUT]

``--check`` (run by scripts/aot.sh on each Triton) fails when a row's predicted ratio
vs bf16 falls below its floor in FLOORS or its main loop loses what LOOP_NEEDS asks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from qcompile.kernels.gemm_parts import act_splits

REPO = Path(__file__).resolve().parents[1]
RANK = 32  # the SVDQuant rank (the gate's)


@dataclass(frozen=True)
class Machine:
    sms: int = 132
    clock_hz: float = 1.83e9
    schedulers: int = 4  # warp instructions issued per clock per SM
    macs_per_clock: tuple[tuple[int, int], ...] = ((16, 2048), (8, 4096))  # per SM, wgmma
    warp_mma_fraction: float = 2 / 3  # mma.sync's rate against wgmma's (assumed)
    sustained: tuple[tuple[int, float], ...] = ((16, 790 / 989), (8, 1214 / 1979))
    hbm_bytes_per_s: float = 3.35e12
    l2_bytes_per_clock: float = 5120  # to all SMs (A100's figure; assumed no lower)
    shared_per_sm: int = 233_472
    shared_reserved_per_cta: int = 1024
    registers_per_sm: int = 65_536
    warps_per_sm: int = 64
    ctas_per_sm: int = 32


H100 = Machine()
CUBLAS_BF16_FLOPS = 790e12
SCALED_MM_FP8_FLOPS = 1190e12 / 0.98
GEMMS = {"_w8a8_kernel", "_w8a8_tma_kernel", "_weight_only_kernel", "_w4a4_kernel",
         "_w4a8_kernel"}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One linear as a recipe runs it: the gate cases whose launches it makes (the
    activation pass first), and its HBM traffic per element."""

    name: str
    cases: tuple[str, ...]  # gate case names without the dtype and shape words
    act_bits: float  # the GEMM's activation operand, scales included
    weight_bits: float  # packed weight per element, scales included
    baseline: str = "bf16"  # also compared with torch._scaled_mm when "scaled_mm"


ROWS = (
    Row("fp8 W8A8 dynamic", ("quantize_act fp8 {} dynamic", "w8a8 fp8 {} dynamic tma"), 8, 8,
        "scaled_mm"),
    Row("int8 W8A8 dynamic", ("quantize_act int8 {} dynamic", "w8a8 int8 {} dynamic tma"), 8,
        8, "scaled_mm"),
    Row("fp8 W8A8 static", ("quantize_act fp8 {} static", "w8a8 fp8 {} static tma"), 8, 8),
    Row("int8 weight-only", ("weight_only int8 {} g1",), 16, 8),
    Row("fp8 weight-only", ("weight_only fp8 {} g1",), 16, 8),
    Row("int4 weight-only g64", ("weight_only int4 {} g64",), 16, 4 + 32 / 64),
    Row("int4 weight-only g128", ("weight_only int4 {} g128",), 16, 4 + 32 / 128),
    Row("svdq-w4a16 int4 g64 r32", ("weight_only int4 {} g64 lora",), 16, 4 + 32 / 64),
    Row("mxfp4 weight-only", ("weight_only mxfp4 {} g32",), 16, 4 + 8 / 32),
    Row("nvfp4 weight-only", ("weight_only nvfp4 {} g16",), 16, 4 + 8 / 16),
    Row("svdq-w4a8 int4 g64 r32", ("w4a8 int4 {} g64 lora",), 8, 4 + 8 / 64, "scaled_mm"),
    Row("w4a8 int4 g128", ("w4a8 int4 {} g128",), 8, 4 + 8 / 128, "scaled_mm"),
    Row("svdq-w4a4 int4 g64 r32", ("w4a4 int4 {} g64",), 4 + 32 / 64, 4 + 32 / 64),
    Row("svdq-w4a4 mxfp4 r32", ("w4a4 mxfp4 {} g32",), 4 + 8 / 32, 4 + 8 / 32),
    Row("svdq-w4a4 nvfp4 r32", ("w4a4 nvfp4 {} g16",), 4 + 8 / 16, 4 + 8 / 16),
)  # fmt: skip

# Floors: the predicted speed-up vs bf16 cuBLAS each row keeps, per shape (M, K, N).
# Set 10 % under the model's prediction of the kernels as they are, on the lower of the
# two Tritons the gate runs; raised as kernels improve (docs/kernels.md has the table).
FLUX_MLP = (4608, 3072, 12288)
DECODE = (1, 3072, 12288)
SHAPES = (FLUX_MLP, DECODE)
FLOORS: dict[str, dict[tuple[int, int, int], float]] = {
    "fp8 W8A8 dynamic": {FLUX_MLP: 1.26, DECODE: 1.79},
    "int8 W8A8 dynamic": {FLUX_MLP: 1.26, DECODE: 1.79},
    "fp8 W8A8 static": {FLUX_MLP: 1.26, DECODE: 1.79},
    "int8 weight-only": {FLUX_MLP: 0.84, DECODE: 1.49},
    "fp8 weight-only": {FLUX_MLP: 0.84, DECODE: 1.56},
    "int4 weight-only g64": {FLUX_MLP: 0.84, DECODE: 0.85},
    "int4 weight-only g128": {FLUX_MLP: 0.84, DECODE: 0.86},
    "svdq-w4a16 int4 g64 r32": {FLUX_MLP: 0.79, DECODE: 0.85},
    "mxfp4 weight-only": {FLUX_MLP: 0.84, DECODE: 0.53},
    "nvfp4 weight-only": {FLUX_MLP: 0.84, DECODE: 0.53},
    "svdq-w4a8 int4 g64 r32": {FLUX_MLP: 1.25, DECODE: 2.28},
    "w4a8 int4 g128": {FLUX_MLP: 1.29, DECODE: 2.38},
    "svdq-w4a4 int4 g64 r32": {FLUX_MLP: 0.29, DECODE: 0.66},
    "svdq-w4a4 mxfp4 r32": {FLUX_MLP: 0.12, DECODE: 0.28},
    "svdq-w4a4 nvfp4 r32": {FLUX_MLP: 0.12, DECODE: 0.29},
}
# What a row's GEMM main loop must keep on sm_90 (MainLoop fields, each at least this).
LOOP_NEEDS: dict[str, dict[str, int]] = {
    # operands by TMA; FP8's wgmma pipelined one group deep (INT8's cannot be: Triton
    # keeps int32-accumulator wgmma synchronous, see kernels/gemm_w8a8.py)
    "fp8 W8A8 dynamic": {"tma": 1, "wgmma_wait": 1},
    "int8 W8A8 dynamic": {"tma": 1},
    "fp8 W8A8 static": {"tma": 1, "wgmma_wait": 1},
    # 4-bit weights widened to int8 for the 8-bit MMA (not the 16-bit one)
    "svdq-w4a8 int4 g64 r32": {"mma_bits": 8},
    "w4a8 int4 g128": {"mma_bits": 8},
}


@dataclass(frozen=True)
class Compiled:
    """What the model reads of one compiled sm_90 launch (the gate's Result)."""

    kernel: str
    config: str
    meta: dict  # constexprs: BLOCK_M, BLOCK_N, BLOCK_K, G, …
    num_warps: int
    shared: int
    registers: int
    loop: dict  # benchmarks.sass.MainLoop fields

    @classmethod
    def of(cls, result) -> Compiled:
        launch = result.launch
        return cls(launch.kernel, launch.config(), launch.named_constants(), launch.num_warps,
                   result.shared, result.registers, result.loop)  # fmt: skip


@dataclass
class Part:
    """One kernel launch of a row, modeled at one shape with its best config."""

    kernel: str
    config: str
    seconds: float
    bound: str
    ctas_per_sm: int
    loop: dict


def occupancy(compiled: Compiled, machine: Machine = H100) -> int:
    warps = compiled.num_warps
    by_shared = machine.shared_per_sm // (compiled.shared + machine.shared_reserved_per_cta)
    registers = math.ceil(max(compiled.registers, 1) / 8) * 8 * 32 * warps
    by_registers = machine.registers_per_sm // registers
    return max(0, min(by_shared, by_registers, machine.warps_per_sm // warps, machine.ctas_per_sm))


def launched(compiled: Compiled, m: int, k: int, machine: Machine = H100) -> bool:
    """Whether the launcher makes this launch at M × K: the W4A8 activation pass's
    dynamic scale takes one launch (PASS 0) where K is walked by one range, two (PASS 1
    and 2) where small M splits it (kernels/gemm_w4a8.py)."""
    if compiled.kernel != "_act_w4a8_kernel" or not compiled.meta.get("DYNAMIC"):
        return True
    splits, _ = act_splits(m, k, SimpleNamespace(meta=compiled.meta), machine.sms)
    return (compiled.meta["PASS"] == 0) == (splits == 1)


def model(
    compiled: Compiled,
    m: int,
    k: int,
    n: int,
    act_bits: float = 16,
    weight_bits: float = 16,
    machine: Machine = H100,
) -> Part:
    """The predicted seconds of one compiled launch at M × K → N (compute only), its
    GEMM operands `act_bits` / `weight_bits` wide in memory (scales included)."""
    loop, meta, warps = compiled.loop, compiled.meta, compiled.num_warps
    c = occupancy(compiled, machine)
    if not loop.get("found") or c == 0:
        why = "did not compile" if not compiled.registers else "no main loop or no CTA fits"
        return Part(compiled.kernel, compiled.config, math.inf, why, c, loop)
    # MMA work per CTA and iteration: one warp's stream × warpgroups (wgmma) or warps
    per_cta = loop["macs"] * (warps // 4 if loop["mma_kind"] == "wgmma" else warps)
    if compiled.kernel in GEMMS:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        group = max(meta.get("G", 1), 1)
        padded_k = math.ceil(k / group) * group
        iterations = math.ceil(padded_k * bm * bn / per_cta)
    else:  # a row pass: BLOCK_M rows and a K range per program, K in BLOCK_K steps
        splits, k_range = act_splits(m, k, SimpleNamespace(meta=meta), machine.sms)
        tiles = math.ceil(m / meta["BLOCK_M"]) * splits
        iterations = math.ceil(k_range / meta["BLOCK_K"])
    tensor = 0.0
    if per_cta:
        rate = dict(machine.macs_per_clock)[loop["mma_bits"]]
        if loop["mma_kind"] == "mma":
            rate *= machine.warp_mma_fraction
        tensor = per_cta / rate / dict(machine.sustained)[loop["mma_bits"]]
    # a row pass costs all its K walks per BLOCK_K step (older gate results lack the field)
    instructions = loop["instructions"]
    if compiled.kernel not in GEMMS:
        instructions = max(instructions, loop.get("pass_instructions", 0))
    issue = instructions * warps / machine.schedulers
    latency = float(instructions)
    serial = tensor + issue if loop["wgmma_wait"] == 0 else 0.0
    l2 = 0.0
    if compiled.kernel in GEMMS:  # the operand tiles each iteration brings from L2
        tile_bytes = (bm * act_bits + bn * weight_bits) * per_cta / (bm * bn) / 8
        l2 = tile_bytes / (machine.l2_bytes_per_clock / machine.sms)

    def round_cycles(together: int) -> tuple[float, str]:
        terms = {"tensor": together * tensor, "issue": together * issue,
                 "L2": together * l2, "latency": latency, "wgmma wait 0": serial}  # fmt: skip
        bound = max(terms, key=terms.__getitem__)
        return iterations * terms[bound], bound

    per_sm = math.ceil(tiles / machine.sms)
    full, rest = divmod(per_sm, c)
    cycles, bound = 0.0, ""
    if full:
        cycles, bound = round_cycles(c)
        cycles *= full
    if rest:
        extra, rest_bound = round_cycles(rest)
        cycles, bound = cycles + extra, bound or rest_bound
    return Part(compiled.kernel, compiled.config, cycles / machine.clock_hz, bound, c, loop)


def hbm_seconds(row: Row, m: int, k: int, n: int, machine: Machine = H100) -> float:
    """Unique bytes over HBM: x in 16 bits, the GEMM's activation operand written and
    read when an activation pass makes it, the packed weight, a rank-32 branch, y."""
    passes = len(row.cases) > 1 or row.act_bits < 16
    bytes_ = m * k * 2 + n * k * row.weight_bits / 8 + m * n * 2
    if passes:
        bytes_ += 2 * m * k * row.act_bits / 8
    if "r32" in row.name:
        bytes_ += (k + n) * RANK * 2 + m * RANK * 4 * 2
    return bytes_ / machine.hbm_bytes_per_s


def bf16_seconds(m: int, k: int, n: int, machine: Machine = H100) -> float:
    return max(2 * m * k * n / CUBLAS_BF16_FLOPS,
               (m * k + n * k + m * n) * 2 / machine.hbm_bytes_per_s)  # fmt: skip


def scaled_mm_seconds(m: int, k: int, n: int, machine: Machine = H100) -> float:
    return max(
        2 * m * k * n / SCALED_MM_FP8_FLOPS,
        (m * k + n * k) / machine.hbm_bytes_per_s + m * n * 2 / machine.hbm_bytes_per_s,
    )


@dataclass
class Prediction:
    row: str
    shape: tuple[int, int, int]
    parts: list[Part]
    compute_seconds: float
    memory_seconds: float
    seconds: float
    vs_bf16: float
    vs_scaled_mm: float | None


def predict(row: Row, compiled: list[Compiled], m: int, k: int, n: int) -> Prediction:
    """The row at M × K → N: each kernel at its best config (a perfect tuner), summed; a
    config that takes two launches here (the split W4A8 activation pass) costs both."""
    parts = []
    dequantize = [c for c in compiled if c.kernel == "_dequantize_kernel"]
    compiled = [c for c in compiled if c.kernel != "_dequantize_kernel"]
    for kernel in dict.fromkeys(c.kernel for c in compiled):
        configs: dict[tuple, list[Part]] = {}  # one launch, or a config's two passes
        for c in compiled:
            if c.kernel == kernel and launched(c, m, k):
                same = (c.config, *sorted((key, repr(value)) for key, value in c.meta.items()
                                          if key != "PASS"))  # fmt: skip
                configs.setdefault(same, []).append(
                    model(c, m, k, n, row.act_bits, row.weight_bits)
                )
        parts.append(min((_together(launches) for launches in configs.values()),
                         key=lambda part: part.seconds))  # fmt: skip
    if dequantize:  # the tuner's other choice: dequantize once, then cuBLAS
        other = [part for part in parts if part.kernel != "_weight_only_kernel"]
        other += dequantize_then_gemm(dequantize[0], row, m, k, n)
        if sum(part.seconds for part in other) < sum(part.seconds for part in parts):
            parts = other
    compute = sum(part.seconds for part in parts)
    memory = hbm_seconds(row, m, k, n)
    seconds = max(compute, memory)
    scaled = scaled_mm_seconds(m, k, n) / seconds if row.baseline == "scaled_mm" else None
    return Prediction(row.name, (m, k, n), parts, compute, memory, seconds,
                      bf16_seconds(m, k, n) / seconds, scaled)  # fmt: skip


def dequantize_then_gemm(
    compiled: Compiled, row: Row, m: int, k: int, n: int, machine: Machine = H100
) -> list[Part]:
    """The weight-only linear's large-M path (kernels/gemm_wo.py): the weight
    dequantized once (HBM: the packed weight read, a 16-bit one written), [x | lora_act]
    copied when there is a branch, then cuBLAS bf16 at its public mark."""
    rank = RANK if "r32" in row.name else 0
    weight_bytes = n * k * row.weight_bits / 8 + n * (k + rank) * 2
    parts = [Part(compiled.kernel, compiled.config, weight_bytes / machine.hbm_bytes_per_s,
                  "HBM", 0, {})]  # fmt: skip
    if rank:
        copy = m * (k + rank) * 2 * 2 / machine.hbm_bytes_per_s
        parts.append(Part("torch.cat", "[x | lora_act]", copy, "HBM", 0, {}))
    parts.append(Part("cuBLAS bf16", "790 TFLOP/s", bf16_seconds(m, k + rank, n), "mark", 0, {}))
    return parts


def _together(launches: list[Part]) -> Part:
    """One config's launches as one part (their seconds summed)."""
    if len(launches) == 1:
        return launches[0]
    slowest = max(launches, key=lambda part: part.seconds)
    return Part(slowest.kernel, f"{slowest.config} ×{len(launches)} launches",
                sum(part.seconds for part in launches), slowest.bound, slowest.ctas_per_sm,
                slowest.loop)  # fmt: skip


def case_names(row: Row) -> set[str]:
    """The row's gate cases at the Flux shape and at M = 1 (where launches that only
    small M makes are named: the split W4A8 activation pass)."""
    return {case.format(f"bf16 {shape}") for case in row.cases for shape in ("flux", "m1")}


def compile_rows(rows=ROWS, jobs: int = os.cpu_count() or 1) -> dict[str, list[Compiled]]:
    """Every sm_90 bf16 launch each row makes at the gate's Flux shape and M = 1,
    compiled (or read from the gate's result cache)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import aot_check  # the gate (sets Triton's environment up for compiling: CLI only)

    launches = {}
    for row in rows:  # (collect matches words: "… g64" would also take "… g64 lora")
        names = case_names(row)
        collected = aot_check.collect(90, names, ["flux", "m1"])
        launches[row.name] = [launch for launch in collected if launch.case in names]
    flat = [launch for row_launches in launches.values() for launch in row_launches]
    compile_one = partial(aot_check.compile_launch, cache=aot_check.RESULT_CACHE)
    if jobs <= 1:  # after the gate every result is cached: no worker processes to start
        results = [compile_one(launch) for launch in flat]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, flat, chunksize=1))
    by_identity = {x.identity(): Compiled.of(r) for x, r in zip(flat, results, strict=True)}
    return {name: [by_identity[launch.identity()] for launch in row_launches]
            for name, row_launches in launches.items()}  # fmt: skip


def loop_summary(loop: dict) -> str:
    if not loop.get("found"):
        return "no loop"
    loads = "TMA" if loop["tma"] else "cp.async" if loop["cp_async"] else "ld.global"
    mma = f"{loop['mma_kind']}{loop['mma_bits']}" if loop["mma_kind"] else "no MMA"
    wait = f" wait {loop['wgmma_wait']}" if loop["wgmma_wait"] >= 0 else ""
    return f"{loop['instructions']} SASS, {loads}, {mma}{wait}"


def table(predictions: list[Prediction]) -> str:
    lines = ["| linear | M×K→N | kernels (best config, CTAs/SM, bound) | main loop | "
             "µs | vs bf16 | vs _scaled_mm |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in predictions:
        kernels = "; ".join(f"{part.kernel} {part.config} ×{part.ctas_per_sm} "
                            f"{part.seconds * 1e6:.1f} µs {part.bound}"
                            for part in p.parts)  # fmt: skip
        gemm = next((part for part in p.parts if part.kernel in GEMMS), p.parts[-1])
        scaled = f"{p.vs_scaled_mm:.2f}×" if p.vs_scaled_mm is not None else ""
        bound = " (HBM)" if p.memory_seconds > p.compute_seconds else ""
        lines.append(
            f"| {p.row} | {'×'.join(map(str, p.shape))} | {kernels} | "
            f"{loop_summary(gemm.loop)} | {p.seconds * 1e6:.1f}{bound} | {p.vs_bf16:.2f}× | "
            f"{scaled} |"
        )
    return "\n".join(lines)


def problems(predictions: list[Prediction]) -> list[str]:
    found = []
    for p in predictions:
        for part in p.parts:
            if not part.seconds < math.inf:
                found.append(f"{p.row}: {part.kernel} {part.config} has no model ({part.bound})")
        floor = FLOORS.get(p.row, {}).get(p.shape)
        if floor is not None and p.vs_bf16 < floor:
            found.append(f"{p.row} at {p.shape}: predicted {p.vs_bf16:.2f}× bf16 < floor {floor}×")
        gemm = next((part for part in p.parts if part.kernel in GEMMS), None)
        for field_name, least in LOOP_NEEDS.get(p.row, {}).items():
            if gemm is None or gemm.loop.get(field_name, -1) < least:
                have = None if gemm is None else gemm.loop.get(field_name)
                found.append(f"{p.row}: main loop {field_name} = {have}, needs ≥ {least}")
    return found


def parse_shape(text: str) -> tuple[int, int, int]:
    m, k, n = (int(part) for part in text.lower().split("x"))
    return m, k, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, nargs="+", default=list(SHAPES),
                        help="M×K×N, e.g. 4608x3072x12288")  # fmt: skip
    parser.add_argument("--only", nargs="*", default=[], help="rows whose name has a word")
    parser.add_argument("--check", action="store_true", help="fail below FLOORS / LOOP_NEEDS")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    rows = [row for row in ROWS if not args.only or any(w in row.name for w in args.only)]
    results = compile_rows(rows, args.jobs)
    predictions = [predict(row, results[row.name], *shape) for shape in args.shape for row in rows]
    import triton

    print(f"Predicted on an H100 SXM from sm_90 code (Triton {triton.__version__}); "
          f"a model, not a measurement\n")  # fmt: skip
    print(table(predictions))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([p.__dict__ | {"parts": [q.__dict__ for q in p.parts]}
                                         for p in predictions], indent=1, default=str))  # fmt: skip
    found = problems(predictions) if args.check else []
    for problem in found:
        print(f"FAIL {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
