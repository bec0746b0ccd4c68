"""AOT compile gate: every Triton kernel the CUDA launchers launch, compiled for real
GPU targets on this machine's Triton, with no GPU.

Triton's interpreter (what the CPU test suite runs) never lowers a kernel to PTX, so a
kernel that fails to compile, or needs more shared memory than a GPU has, passes there.
This gate compiles each launch for sm_90, sm_89 and sm_80 with ``triton.compile`` and a
``GPUTarget`` and fails on a compile error or shared memory over the target's limit;
Blackwell's block-scaled FP4 GEMM (MXFP4/NVFP4 W4A4, what only sm_100/sm_120 launch) is
compiled for sm_100 and sm_120 as well.

What is compiled is what the launchers launch, collected by running them: each launcher
in ``qcompile.kernels`` is called on CPU tensors of every shape in ``SHAPES`` (a Flux
linear, M from 1 to 16, an odd shape) in bfloat16, float16 and float32 while a stand-in
driver reports the target and Triton's ``jit_cache_hook`` records each launch
(signature, specialization, constexprs, num_warps/stages) instead of compiling it;
launches that compile alike are compiled once. The tuner is asked for every config it
may launch on the target (the default everywhere, the candidates on sm_90 where the
launch is tuned), and ops that run their reference below sm_89 (FP8, MXFP4, NVFP4: see
``qcompile.kernels.cuda``) are not collected there.

Each compiled kernel reports shared memory (from the compiler), registers and spills
(ptxas' log) and the MMA instructions in its PTX; the gate also fails when a kernel that
must use Hopper's ``wgmma`` (FP8 W8A8, W4A4's 8-bit MMA, for tiles of 64+ rows) does not,
and when the block-scaled GEMM does not issue Blackwell's native FP4 MMA.
On sm_90 it also reads the main loop from the SASS (``nvdisasm`` from the Triton wheel):
instructions per warp per iteration, MMA work, TMA / cp.async / plain loads, and the
wgmma wait depth: what ``benchmarks/roofline.py`` turns into a predicted time.

    python scripts/aot_check.py [--cc 90 89 80 100 120] [--only NAME ...] [--json OUT]
        [--jobs N]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

# Compiling needs the real @triton.jit functions, not the interpreter's, and a cache of
# our own so every kernel is compiled (and ptxas' log printed) in this run.
os.environ.pop("TRITON_INTERPRET", None)
if "QCOMPILE_AOT_TRITON_CACHE" not in os.environ:  # the main process: workers inherit it
    os.environ["QCOMPILE_AOT_TRITON_CACHE"] = tempfile.mkdtemp(prefix="qcompile-aot-")
    atexit.register(shutil.rmtree, os.environ["QCOMPILE_AOT_TRITON_CACHE"], ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = os.environ["QCOMPILE_AOT_TRITON_CACHE"]
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from benchmarks.sass import main_loop, sass
from qcompile.kernels import cuda as cuda_ops
from qcompile.kernels import gemm_w4a4, gemm_w4a8, gemm_w8a8, gemm_wo, quantize_act
from qcompile.kernels.tma import TMA_CAPABILITY, tma_aligned
from qcompile.kernels.tuning import HOPPER, Tuner

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_LIMIT = {90: 232_448, 89: 101_376, 80: 166_912, 100: 232_448, 120: 101_376}
# The shapes each launcher is collected at, M tokens × K → N: a Flux-sized linear (the
# tuner's candidates), the small M of batched decode-like calls and classifier-free
# guidance, and the odd shape of the test suite (no dim a multiple of 16). Launches
# that compile the same (M is not specialized, see gemm_parts.py) are compiled once.
SHAPES = {
    "flux": (4096, 3072, 3072),
    "m1": (1, 3072, 3072),
    "m2": (2, 3072, 3072),
    "m4": (4, 3072, 3072),
    "m8": (8, 3072, 3072),
    "m16": (16, 3072, 3072),
    "odd": (69, 200, 70),
}
RANK = 32  # the SVDQuant rank
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# The MMA each GEMM must run on sm_90 for tiles of 64+ rows (Hopper's warpgroup MMA;
# the 4-bit formats unpack to 8-bit operands, NVFP4 to bfloat16: see gemm_w4a4.py).
WGMMA_REQUIRED = {
    ("_w8a8_kernel", "int8"): "wgmma s8",
    ("_w8a8_kernel", "fp8"): "wgmma e4m3",
    ("_w8a8_tma_kernel", "int8"): "wgmma s8",
    ("_w8a8_tma_kernel", "fp8"): "wgmma e4m3",
    ("_w4a4_kernel", "int4"): "wgmma s8",
    ("_w4a8_kernel", "int4"): "wgmma s8",
    ("_w4a4_kernel", "mxfp4"): "wgmma e4m3",
    ("_w4a4_kernel", "nvfp4"): "wgmma bf16",
}
# (format, group, low-rank branch) of each weight-only linear the presets produce; the
# branch (svdq-w4a16) also runs the activation pass.
WEIGHT_ONLY = (
    ("int8", 1, False),
    ("fp8", 1, False),
    ("int4", 64, False),
    ("int4", 128, False),
    ("int4", 64, True),
    ("mxfp4", 32, False),
    ("nvfp4", 16, False),
)
W4A4 = (("int4", 64), ("mxfp4", 32), ("nvfp4", 16))  # smoothed, with the branch
# The native MMA the block-scaled GEMM must issue, per format and Blackwell target.
BLOCK_SCALED_REQUIRED = {
    ("mxfp4", 100): "tcgen05 mxf4",
    ("nvfp4", 100): "tcgen05 mxf4nvf4",
    ("mxfp4", 120): "mma mxf4nvf4",
    ("nvfp4", 120): "mma mxf4nvf4",
}
# (group, smoothing and low-rank branch, static activation scale) of the W4A8 linears
W4A8 = ((64, True, False), (128, False, False), (64, True, True))


@dataclass
class Launch:
    """One launch the launchers made: enough to compile it for a target."""

    case: str  # which launcher call produced it, e.g. "w4a4 int4 bf16"
    module: str
    kernel: str
    signature: dict[str, str]
    constants: dict
    attrs: dict
    num_warps: int
    num_stages: int
    cc: int

    def config(self) -> str:
        meta = {
            name.split("_", 1)[1]: value
            for name, value in self.named_constants().items()
            if name.startswith("BLOCK_")
        }
        blocks = "×".join(str(meta[k]) for k in ("M", "N", "K") if k in meta)
        return f"{blocks} w{self.num_warps} s{self.num_stages}"

    def named_constants(self) -> dict[str, object]:
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constants.items()}

    def identity(self) -> tuple:
        return (self.kernel, self.cc, repr(self.signature), repr(self.constants), repr(self.attrs),
                self.num_warps, self.num_stages)  # fmt: skip


@dataclass
class Result:
    launch: Launch
    ok: bool
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    mma: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    loop: dict = field(default_factory=dict)  # benchmarks.sass.MainLoop, sm_90 only
    cached: bool = False  # read from RESULT_CACHE, not compiled in this run

    def problems(self) -> list[str]:
        found = [self.error] if self.error else []
        limit = SHARED_LIMIT[self.launch.cc]
        if self.ok and self.shared > limit:
            found.append(f"shared memory {self.shared} B > sm_{self.launch.cc} limit {limit} B")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B ({self.registers} registers)")
        wanted = WGMMA_REQUIRED.get((self.launch.kernel, self.launch.case.split()[1]))
        wide = self.launch.named_constants().get("BLOCK_M", 0) >= 64
        if self.ok and self.launch.cc == 90 and wanted and wide and wanted not in self.mma:
            found.append(f"no {wanted} on sm_90 (MMA: {self.mma or 'none'})")
        if self.ok and self.launch.kernel == "_w4a4_scaled_kernel":
            native = BLOCK_SCALED_REQUIRED[self.launch.case.split()[1], self.launch.cc]
            if native not in self.mma:
                found.append(f"no {native} on sm_{self.launch.cc} (MMA: {self.mma or 'none'})")
        return found


# ---------------------------------------------------------------- collection


class StandInDriver:
    """What JITFunction.run asks the active driver before its compile hook runs."""

    def __init__(self, cc: int):
        self.target = GPUTarget("cuda", cc, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


def collect(cc: int, only: set[str], shapes: Sequence[str] = tuple(SHAPES)) -> list[Launch]:
    """Run every launcher as the CUDA dispatch would on `cc`; record each launch."""
    launches: list[Launch] = []
    case = ""

    def record(*, fn, compile, **_):
        launches.append(
            Launch(
                case=case,
                module=fn.module if isinstance(fn.module, str) else fn.module.__name__,
                kernel=fn.name,
                signature=dict(compile["signature"]),
                constants=dict(compile["constants"]),
                attrs=dict(compile["configs"][0]),
                num_warps=compile["num_warps"],
                num_stages=compile["num_stages"],
                cc=cc,
            )
        )
        return True  # skip compiling and launching

    def every_config(tuner, key, device, launch, valid=lambda c: True, tune=True):
        if capability(cc) == HOPPER and tune:
            for candidate in tuner.hopper:
                if valid(candidate):
                    launch(candidate)
        return tuner.default  # the launcher launches it

    driver.set_active(StandInDriver(cc))
    previous_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = record
    try:
        with (
            mock.patch.object(Tuner, "pick", every_config),
            mock.patch.object(gemm_wo, "_cublas_linear", lambda *_: None),  # no Triton
            torch.no_grad(),
        ):
            for name, run in launcher_cases(cc, shapes):
                if only and not any(word in name for word in only):
                    continue
                case = name
                run()
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook  # (no driver to go back to)
    unique: dict[tuple, Launch] = {}
    for launch in launches:  # named after the first case that launches it
        unique.setdefault(launch.identity(), launch)
    return list(unique.values())


def capability(cc: int) -> tuple[int, int]:
    return cc // 10, cc % 10


def launcher_cases(cc: int, shapes: Sequence[str] = tuple(SHAPES)):
    """(name, call) for every launcher × format × dtype the CUDA dispatch runs on `cc`,
    at each of `shapes`."""
    fp8 = capability(cc) >= cuda_ops.FP8_CAPABILITY

    def runs(fmt: str) -> bool:
        return fp8 or fmt not in cuda_ops.FP8_FORMATS

    tma = capability(cc) >= TMA_CAPABILITY
    for shape in shapes:
        for dtype in DTYPES:
            if capability(cc) >= cuda_ops.BLOCK_SCALED_CAPABILITY:
                yield from _block_scaled_cases(shape, *SHAPES[shape], dtype)
            else:
                yield from _cases(shape, *SHAPES[shape], dtype, runs, tma)


def _block_scaled_cases(shape: str, M: int, K: int, N: int, dtype: torch.dtype):
    """What Blackwell launches for MXFP4/NVFP4 W4A4 and no other target does: the
    activation pass and the block-scaled GEMM (float32 x runs the reference there)."""
    if dtype is torch.float32:
        return
    x = torch.zeros(M, K, dtype=dtype)
    down, up = torch.zeros(RANK, K, dtype=dtype), torch.zeros(N, RANK, dtype=dtype)
    for fmt, group in W4A4[1:]:
        weight, scale, global_scale = weight_operands(fmt, group, N, K)
        yield f"w4a4 {fmt} {DTYPE_NAMES[dtype]} {shape} g{group} scaled", partial(
            gemm_w4a4.linear_w4a4,
            x, weight, scale, global_scale, torch.zeros(N, dtype=dtype), torch.ones(K), down, up,
            fmt, group, scaled=True,
        )  # fmt: skip


def _cases(shape: str, M: int, K: int, N: int, dtype: torch.dtype, runs, tma: bool):
    """The launcher calls at one shape and activation dtype (`tma`: the target runs the
    TMA kernels where the operands allow, as the CUDA dispatch does)."""
    dt = f"{DTYPE_NAMES[dtype]} {shape}"
    x = torch.zeros(M, K, dtype=dtype)
    bias = torch.zeros(N, dtype=dtype)
    down, up = torch.zeros(RANK, K, dtype=dtype), torch.zeros(N, RANK, dtype=dtype)
    smooth = torch.ones(K, dtype=torch.float32)
    for fmt, qdtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        if not runs(fmt):
            continue
        one = torch.ones(())
        yield (
            f"quantize_act {fmt} {dt} static",
            partial(quantize_act.quantize_act_static, x, one, qdtype),
        )
        yield (
            f"quantize_act {fmt} {dt} dynamic",
            partial(quantize_act.quantize_act_dynamic, x, qdtype),
        )
        x_q, w_q = torch.zeros(M, K, dtype=qdtype), torch.zeros(N, K, dtype=qdtype)
        # the presets' scale layouts: static per-tensor × per-channel, dynamic per-row
        y = torch.empty(M, N, dtype=dtype)
        w8a8_tma = tma and all(tma_aligned(t) for t in (x_q, w_q, y))
        for scales, x_scale in (("static", one), ("dynamic", torch.ones(M, 1))):
            yield (
                f"w8a8 {fmt} {dt} {scales}{' tma' if w8a8_tma else ''}",
                partial(gemm_w8a8.linear_w8a8, x_q, x_scale, w_q, torch.ones(N), bias, dtype,
                        tma=w8a8_tma),
            )  # fmt: skip
    yield f"smooth - {dt}", partial(quantize_act.smooth, x, smooth)
    for fmt, group, lora in WEIGHT_ONLY:
        if runs(fmt):
            weight, scale, global_scale = weight_operands(fmt, group, N, K)
            branch = (down, up) if lora else (None, None)
            yield f"weight_only {fmt} {dt} g{group}{' lora' if lora else ''}", partial(
                gemm_wo.linear_weight_only,
                x, weight, scale, global_scale, bias, *branch, fmt, group,
            )  # fmt: skip
    for group, branch, static in W4A8:
        packed, group_scale, channel_scale = weight_operands("w4a8", group, N, K)
        extras = (smooth, down, up) if branch else (None, None, None)
        yield f"w4a8 int4 {dt} g{group}{' lora' if branch else ''}{' static' if static else ''}", \
            partial(gemm_w4a8.linear_w4a8, x, packed, group_scale, channel_scale, bias, *extras,
                    torch.ones(()) if static else None)  # fmt: skip
    for fmt, group in W4A4:
        if runs(fmt):
            weight, scale, global_scale = weight_operands(fmt, group, N, K)
            yield f"w4a4 {fmt} {dt} g{group}", partial(
                gemm_w4a4.linear_w4a4,
                x, weight, scale, global_scale, bias, smooth, down, up, fmt, group,
            )  # fmt: skip


def weight_operands(fmt: str, group: int, N: int, K: int):
    """Packed weight, scale and global scale of `fmt` in the checkpoint's dtypes."""
    if fmt in ("int8", "fp8"):
        dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
        return torch.zeros(N, K, dtype=dtype), torch.ones(N), None
    if fmt == "w4a8":  # packed, integer group scales, float32 channel scales
        groups = -(-K // group)
        packed = torch.zeros(N, groups * group // 2, dtype=torch.uint8)
        return packed, torch.ones(N, groups, dtype=torch.uint8), torch.ones(N)
    scale_dtype = {"int4": torch.float32, "mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}
    groups = -(-K // group)  # K padded to the group, as the checkpoint packs it
    scale = torch.ones(N, groups).to(scale_dtype[fmt])
    global_scale = torch.ones(()) if fmt == "nvfp4" else None
    return torch.zeros(N, groups * group // 2, dtype=torch.uint8), scale, global_scale


# ---------------------------------------------------------------- compilation

PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTX_MMA = re.compile(r"\b(wgmma\.mma_async\S*|mma\.sync\S*|tcgen05\.mma\S*)")


# Results are kept by the key Triton files its own compile under (its version and
# sources, the kernel's source and dependencies, signature, specialization, constexprs,
# options, target, ptxas' version, cache-relevant environment) plus this gate's own
# version: an unchanged launch is not compiled again on the same machine.
RESULT_CACHE = Path(os.environ.get("QCOMPILE_AOT_CACHE", "~/.cache/qcompile/aot")).expanduser()
GATE_VERSION = "4"


def result_key(source: ASTSource, target: GPUTarget, options: dict) -> str:
    from triton.compiler import compiler

    backend = compiler.make_backend(target)
    parsed = backend.parse_options(dict(options, **source.parse_options()))
    env = compiler.get_cache_invalidating_env_vars()
    key = compiler.get_cache_key(source, backend, parsed, env_vars=env)
    return hashlib.sha256(f"gate-{GATE_VERSION}-{key}".encode()).hexdigest()


def compile_launch(launch: Launch, cache: Path | None = None) -> Result:
    module = sys.modules.get(launch.module) or __import__(launch.module, fromlist=["_"])
    kernel = getattr(module, launch.kernel)
    source = ASTSource(kernel, launch.signature, launch.constants, launch.attrs)
    target = GPUTarget("cuda", launch.cc, 32)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    stored = None
    if cache is not None:
        stored = cache / f"{result_key(source, target, options)}.json"
        if stored.is_file():
            fields = json.loads(stored.read_text())
            return Result(launch, **fields, cached=True)
    result = _compile(launch, source, target, options)
    if stored is not None:
        fields = {k: v for k, v in asdict(result).items() if k not in ("launch", "cached")}
        stored.parent.mkdir(parents=True, exist_ok=True)
        partial_file = stored.with_suffix(f".{os.getpid()}.tmp")
        partial_file.write_text(json.dumps(fields))
        partial_file.replace(stored)  # atomic: a concurrent gate reads all or nothing
    return result


def _compile(launch: Launch, source: ASTSource, target: GPUTarget, options: dict) -> Result:
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # the gate reports every failure, then fails
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        message = f"{type(error).__name__}: " + " | ".join(lines[-4:])  # the cause is last
        return Result(launch, ok=False, error=message,
                      seconds=time.perf_counter() - start)  # fmt: skip
    text = log.getvalue()
    registers = [int(r) for r in PTXAS_REGISTERS.findall(text)]
    spills = [int(s) + int(lo) for s, lo in PTXAS_SPILLS.findall(text)]
    mma = sorted({kind_of(m) for m in PTX_MMA.findall(compiled.asm["ptx"])})
    loop = asdict(main_loop(sass(compiled.asm["cubin"]))) if launch.cc == 90 else {}
    return Result(
        launch,
        ok=True,
        shared=int(compiled.metadata.shared),
        registers=max(registers, default=0),
        spill_bytes=max(spills, default=0),
        mma=mma,
        seconds=time.perf_counter() - start,
        loop=loop,
    )


def kind_of(instruction: str) -> str:
    """'wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3' → 'wgmma e4m3';
    block-scaled ones by their kind: 'tcgen05.mma.cta_group::1.kind::mxf4…' →
    'tcgen05 mxf4'."""
    parts = instruction.split(".")
    kind = next((p.removeprefix("kind::") for p in parts if p.startswith("kind::")), None)
    if kind is not None:
        return f"{parts[0]} {kind}"
    operand = next((p for p in parts if p in ("e4m3", "e5m2", "s8", "u8", "bf16", "f16", "tf32")),
                   "f32")  # fmt: skip
    return f"{'wgmma' if parts[0] == 'wgmma' else 'mma'} {operand}"


# ---------------------------------------------------------------- report


def summarize(results: list[Result]) -> list[dict]:
    """One row per kernel × CC: launches, ok, max smem/regs/spills, MMA kinds."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[r.launch.kernel, r.launch.cc].append(r)
    rows = []
    for (kernel, cc), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        compiled = [r for r in rs if r.ok]
        rows.append(
            {
                "kernel": kernel,
                "cc": cc,
                "launches": len(rs),
                "ok": sum(not r.problems() for r in rs),
                "max_shared": max((r.shared for r in compiled), default=0),
                "max_registers": max((r.registers for r in compiled), default=0),
                "max_spill_bytes": max((r.spill_bytes for r in compiled), default=0),
                "mma": sorted({m for r in compiled for m in r.mma}),
            }
        )
    return rows


def print_table(rows: list[dict], version: str) -> None:
    print(f"\nTriton {version}: kernel × target")
    print(f"{'kernel':22} {'cc':>5} {'ok':>7} {'smem max':>9} {'regs':>5} {'spill':>6}  mma")
    for r in rows:
        print(
            f"{r['kernel']:22} sm_{r['cc']:<2} {r['ok']:>3}/{r['launches']:<3} "
            f"{r['max_shared']:>9} {r['max_registers']:>5} {r['max_spill_bytes']:>6}  "
            f"{', '.join(r['mma']) or '-'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cc", type=int, nargs="+", default=[90, 89, 80, 100, 120])
    parser.add_argument("--only", nargs="*", default=[], help="cases whose name has a word")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--json", type=Path, help="write every launch's result here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="one line per launch")
    parser.add_argument("--triton", help="fail unless this is the Triton imported")
    parser.add_argument("--no-cache", action="store_true", help=f"ignore {RESULT_CACHE}")
    args = parser.parse_args(argv)
    if args.triton and triton.__version__ != args.triton:
        parser.error(f"imported triton {triton.__version__} from {triton.__file__}, "
                     f"expected {args.triton}")  # fmt: skip

    start = time.perf_counter()
    launches = [launch for cc in args.cc for launch in collect(cc, set(args.only), args.shapes)]
    print(f"collected {len(launches)} launches in {time.perf_counter() - start:.1f} s")
    if args.collect_only:
        for launch in launches:
            print(f"sm_{launch.cc} {launch.kernel:22} {launch.case:34} {launch.config()}")
        return 0
    cache = None if args.no_cache else RESULT_CACHE
    with ProcessPoolExecutor(max(args.jobs, 1)) as pool:
        results = list(pool.map(partial(compile_launch, cache=cache), launches, chunksize=1))
    failures = [(r, p) for r in results for p in r.problems()]
    rows = summarize(results)
    print_table(rows, triton.__version__)
    for r, problem in failures:
        print(
            f"FAIL {r.launch.kernel} sm_{r.launch.cc} [{r.launch.case}] "
            f"{r.launch.config()}: {problem}"
        )
    for r in results if args.verbose else ():
        print(
            f"sm_{r.launch.cc} {r.launch.kernel:22} {r.launch.case:30} {r.launch.config():18} "
            f"smem {r.shared:>6} regs {r.registers:>3} spill {r.spill_bytes:>4} {r.seconds:5.1f} s"
        )
    if args.json:
        report = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "shapes": {name: dict(zip("MKN", mkn, strict=True)) for name, mkn in SHAPES.items()},
            "rank": RANK,
            "shared_limit": SHARED_LIMIT,
            "summary": rows,
            "launches": [
                {**asdict(r), "launch": {**asdict(r.launch), "config": r.launch.config(),
                                         "constants": str(r.launch.constants),
                                         "attrs": str(r.launch.attrs)},
                 "problems": r.problems()}
                for r in results
            ],
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    seconds = time.perf_counter() - start
    cached = sum(r.cached for r in results)
    print(f"\n{len(results)} launches ({len(results) - cached} compiled, {cached} results "
          f"from {RESULT_CACHE}), {len(failures)} problems, {seconds:.0f} s "
          f"(triton {triton.__version__})")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
