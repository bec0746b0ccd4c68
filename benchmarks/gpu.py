"""The one GPU command: every qcompile kernel checked on the GPU against its CPU reference,
then timed at Flux's linear shapes against cuBLAS bf16 and torch._scaled_mm, then (when
the budget allows and diffusers imports) one end-to-end Flux step. Run it through
``scripts/gpu.sh``, which sets the paths; see docs/kernels.md#one-gpu-command.

It runs on a GPU image that has torch and Triton and nothing else: it imports qcompile's
kernels without qcompile's package ``__init__`` (which imports diffusers). Every result is
appended to a JSONL as it is made, so a run cut at its time limit keeps what it measured;
one failing launch is recorded with its error and the run goes on.

Plan (each step's device-time estimate is printed first; a step that does not fit the
remaining budget is recorded as skipped, with the reason):
    env        device, driver, torch, Triton, Python
    warm       every launch config the timings will meet, compiled by parallel worker
               processes into the shared Triton cache (compiles, no timing)
    numerics   each kernel against its reference at the odd shape of the test suite
               (M=69, K=200, N=70) and at a Flux-like shape (M=512, K=3072, N=512): codes
               and scales bit for bit, GEMMs by SQNR against kernels/tolerances.py
    gemm M=…   per M (4608, 1, 4096, 16, 1024, 256, 8, 4, 2: the goals first), every K×N of
               Flux (3072×3072, 3072×9216, 3072×12288, 12288×3072, 15360×3072): bf16
               torch.mm and torch._scaled_mm FP8 per-row with fast accumulation (the
               baselines), each qcompile GEMM and activation pass, and torchao's when it
               imports; median and min of CUDA-graph replays (triton.testing)
    e2e        benchmarks/e2e.py on a FLUX.1-dev-size transformer (a subset of its blocks
               when the budget is short), in a subprocess; needs diffusers

    scripts/gpu.sh [--budget SECONDS] [--out DIR]   # on the GPU
    scripts/gpu.sh --dry-run                         # CPU: the same plan, tiny shapes,
                                                      # Triton's interpreter, a stand-in clock
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_kernels_only() -> None:
    """Make ``qcompile.kernels`` importable without running qcompile's ``__init__``."""
    if "qcompile" in sys.modules:
        return
    spec = importlib.machinery.ModuleSpec("qcompile", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(ROOT / "qcompile")]
    sys.modules["qcompile"] = package
    importlib.import_module("qcompile._checkout")  # maps qcompile.kernels to kernels/


import_kernels_only()

import torch  # noqa: E402

from benchmarks.gpu_report import load, report, write_report  # noqa: E402 - re-exported
from qcompile.kernels import cuda as _cuda  # noqa: E402, F401 - the ops' CUDA kernels
from qcompile.kernels import (  # noqa: E402
    gemm_w4a4,
    gemm_w4a8,
    gemm_w8a8,
    gemm_wo,
    quantize_act,
    quantize_act_4bit,
    reference,
    tuning,
)
from qcompile.kernels.reference import w4, w4a8  # noqa: E402
from qcompile.kernels.tolerances import INT4_DEQUANT_DB, LORA_BRANCH_DB, SUM_ORDER_DB  # noqa: E402
from qcompile.metrics import sqnr  # noqa: E402

ops = torch.ops.qcompile
FP8 = torch.float8_e4m3fn
RANK = 32
# Flux's linears, K × N: attention projections, fused QKV, MLP up/down, the single
# blocks' output projection (attention and MLP concatenated).
FLUX_KN = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072))
# most telling first: the compute-bound Flux shape, decoding-like M = 1, then the rest
GEMM_M = (4608, 1, 4096, 16, 1024, 256, 8, 4, 2)
DRY_KN = ((64, 96), (96, 64))
DRY_M = (32, 1)
ODD = (69, 200, 70)
FLUX_CHECK = (512, 3072, 512)  # N kept small: the CPU references quantize the weight
# Device-seconds the plan assumes (H100, measured nowhere yet: refine from a real run's
# "step" records): one timed row (tuning once per shape key plus CUDA-graph replays) and
# one numerics check; the e2e step's fixed cost (build, quantize, compile per recipe).
ROW_S, CHECK_S, WARM_S, E2E_MIN_S = 0.45, 0.4, 45.0, 150.0


# ---------------------------------------------------------------- recording


class Log:
    """Appends one JSON object per line to `path`, flushed and synced as it goes."""

    def __init__(self, path: Path, dry_run: bool):
        self.path = path
        self.dry_run = dry_run
        self.start = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write(self, kind: str, **record) -> dict:
        record = {"kind": kind, "t": round(self.elapsed(), 3), **record}
        with open(self.path, "a") as out:
            out.write(json.dumps(record, default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())
        return record


def error_text(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: " + " | ".join(lines[-3:])[:500]


def environment(dry_run: bool) -> dict:
    import triton

    info = {
        "dry_run": dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(),
        }
    else:
        info |= {"device": "CPU (dry run)", "capability": None}
    return info


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ---------------------------------------------------------------- timing


def cuda_graph_clock(fn: Callable[[], object]) -> dict:
    """Median and min of CUDA-graph replays of `fn` (compiled and tuned before capture)."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    times = do_bench_cudagraph(fn, rep=20, return_mode="all")
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def stand_in_clock(fn: Callable[[], object]) -> dict:
    """The dry run's clock: one call on the CPU (checks the row runs; not a timing)."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return {"ms": ms, "min_ms": ms, "reps": 1}


# ---------------------------------------------------------------- operands


@dataclass
class Operands:
    """One K×N linear's operands for every row, quantized on the device."""

    x: torch.Tensor  # [max M, K] bf16
    w: torch.Tensor  # [N, K] bf16
    bias: torch.Tensor
    fp8: tuple  # (codes, per-channel scale)
    int8: tuple
    int4: tuple  # (packed, scale, None)
    int4_g128: tuple
    mxfp4: tuple
    nvfp4: tuple
    w4a8: tuple  # packed, integer group scales (g64), channel scales
    w4a8_g128: tuple
    smooth: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    prep_ms: float = 0.0
    extra: dict = field(default_factory=dict)


def quantize_weight(w32: torch.Tensor, fmt: str, group: int = 0) -> tuple:
    """`w32` [N, K] float32 quantized as a checkpoint holds it, by the kernels themselves
    on the device: a weight's per-channel scale is an activation's per-row one, and its
    4-bit packing is the activation pass's (the references are the same functions)."""
    if fmt in ("int8", "fp8"):
        qdtype = torch.int8 if fmt == "int8" else FP8
        codes, scale = quantize_act.quantize_act_dynamic(w32, qdtype)
        return codes, scale.reshape(-1)
    packed, scale, global_scale, _ = quantize_act_4bit.quantize_act_4bit(
        w32, None, None, fmt, group
    )
    return packed, scale, global_scale


def operands(m: int, k: int, n: int, device: str) -> Operands:
    start = time.perf_counter()
    g = torch.Generator(device).manual_seed(k * 7 + n)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    w32 = randn(n, k, scale=k**-0.5)
    result = Operands(
        x=randn(m, k).to(torch.bfloat16),
        w=w32.to(torch.bfloat16),
        bias=randn(n).to(torch.bfloat16),
        fp8=quantize_weight(w32, "fp8"),
        int8=quantize_weight(w32, "int8"),
        int4=quantize_weight(w32, "int4", 64),
        int4_g128=quantize_weight(w32, "int4", 128),
        mxfp4=quantize_weight(w32, "mxfp4", 32),
        nvfp4=quantize_weight(w32, "nvfp4", 16),
        w4a8=w4a8.quantize_w4a8_weight(w32, 64),  # plain torch, on the device
        w4a8_g128=w4a8.quantize_w4a8_weight(w32, 128),
        smooth=torch.rand(k, generator=g, device=device) + 0.5,
        down=randn(RANK, k, scale=0.02).to(torch.bfloat16),
        up=randn(n, RANK, scale=0.02).to(torch.bfloat16),
    )
    if device == "cuda":
        torch.cuda.synchronize()
    result.prep_ms = (time.perf_counter() - start) * 1e3
    return result


def rows_for(o: Operands, m: int) -> dict[str, Callable[[], object]]:
    """Each row's zero-argument call at M = `m` (operands prepared outside)."""
    x = o.x[:m]
    xq8, xs8 = ops.quantize_act_dynamic(x, FP8)
    b = o.bias
    rows: dict[str, Callable[[], object]] = {
        "bf16": lambda: torch.nn.functional.linear(x, o.w, b),
        "scaled_mm_fast": lambda: torch._scaled_mm(
            xq8,
            o.fp8[0].t(),
            scale_a=xs8,
            scale_b=o.fp8[1].reshape(1, -1),
            bias=b,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        ),
        "fp8_gemm": lambda: ops.linear_fp8_w8a8(xq8, xs8, *o.fp8, b, torch.bfloat16),
        "fp8_w8a8": lambda: ops.linear_fp8_w8a8(
            *ops.quantize_act_dynamic(x, FP8), *o.fp8, b, torch.bfloat16
        ),
        "int8_w8a8": lambda: ops.linear_int8_w8a8(
            *ops.quantize_act_dynamic(x, torch.int8), *o.int8, b, torch.bfloat16
        ),
        "int8_wo": lambda: ops.linear_int8_wo(x, *o.int8, b),
        "fp8_wo": lambda: ops.linear_fp8_wo(x, *o.fp8, b),
        "int4_wo": lambda: ops.linear_int4_wo(x, *o.int4[:2], b, 64),
        "int4_wo_g128": lambda: ops.linear_int4_wo(x, *o.int4_g128[:2], b, 128),
        "mxfp4_wo": lambda: ops.linear_w4a16(x, *o.mxfp4, b, None, None, "mxfp4", 32),
        "nvfp4_wo": lambda: ops.linear_w4a16(x, *o.nvfp4, b, None, None, "nvfp4", 16),
        "svdq_w4a16": lambda: ops.linear_w4a16(x, *o.int4, b, o.down, o.up, "int4", 64),
        "svdq_w4a4": lambda: ops.linear_w4a4(x, *o.int4, b, o.smooth, o.down, o.up, "int4", 64),
        "svdq_mxfp4": lambda: ops.linear_w4a4(x, *o.mxfp4, b, o.smooth, o.down, o.up, "mxfp4", 32),
        "svdq_nvfp4": lambda: ops.linear_w4a4(x, *o.nvfp4, b, o.smooth, o.down, o.up, "nvfp4", 16),
        "svdq_w4a8": lambda: ops.linear_w4a8(x, *o.w4a8, b, o.smooth, o.down, o.up, None, 64),
        "w4a8_g128": lambda: ops.linear_w4a8(x, *o.w4a8_g128, b, None, None, None, None, 128),
        "act_int8": lambda: ops.quantize_act_dynamic(x, torch.int8),
        "act_fp8": lambda: ops.quantize_act_dynamic(x, FP8),
        "act_int4_svdq": lambda: act4(x, o.smooth, o.down, "int4", 64),
        "act_nvfp4_svdq": lambda: act4(x, o.smooth, o.down, "nvfp4", 16),
        "act_w4a8_svdq": lambda: gemm_w4a8.quantize_act_w4a8(x, o.smooth, o.down, None),
    }
    rows.update(torchao_rows(o, x))
    return rows


act4 = quantize_act_4bit.quantize_act_4bit  # the 4-bit activation pass (no op of its own)
GEMM_ROWS = (
    "bf16",
    "scaled_mm_fast",
    "fp8_gemm",
    "fp8_w8a8",
    "int8_w8a8",
    "int8_wo",
    "fp8_wo",
    "int4_wo",
    "int4_wo_g128",
    "mxfp4_wo",
    "nvfp4_wo",
    "svdq_w4a16",
    "svdq_w4a4",
    "svdq_mxfp4",
    "svdq_nvfp4",
    "svdq_w4a8",
    "w4a8_g128",
)
ACT_ROWS = ("act_int8", "act_fp8", "act_int4_svdq", "act_nvfp4_svdq", "act_w4a8_svdq")
BASELINES = ("bf16", "scaled_mm_fast")


def torchao_rows(o: Operands, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """torchao's FP8 per-row and INT8 weight-only linears, when its wheel imports."""
    if "torchao" not in o.extra:
        o.extra["torchao"] = _torchao_linears(o)
    linears = o.extra["torchao"]
    return {name: (lambda lin=lin: lin(x)) for name, lin in linears.items()}


def _torchao_linears(o: Operands) -> dict:
    if importlib.util.find_spec("torchao") is None or not torch.cuda.is_available():
        return {}
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except Exception:  # torchao built for another torch: the rows are left out
        return {}
    made = {}
    for name, cfg in (
        (
            "torchao_fp8_row",
            lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        ),
        ("torchao_int8_wo", Int8WeightOnlyConfig),
    ):
        linear = torch.nn.Linear(o.w.shape[1], o.w.shape[0], device=o.w.device, dtype=o.w.dtype)
        with torch.no_grad():
            linear.weight.copy_(o.w)
            linear.bias.copy_(o.bias)
        try:
            quantize_(linear, cfg())
            made[name] = linear
        except Exception:
            continue
    return made


# ---------------------------------------------------------------- numerics


def numerics_checks(device: str, dry_run: bool) -> list[tuple[str, Callable[[], dict]]]:
    """(name, check) for every kernel: each check returns its measurement and verdict."""
    shapes = {"odd": ODD} if dry_run else {"odd": ODD, "flux": FLUX_CHECK}
    checks = []
    for label, (m, k, n) in shapes.items():
        # the dry run: bf16 only (the interpreter tier checks every dtype already)
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        if label == "flux" or dry_run:
            dtypes = (torch.bfloat16,)
        for dtype in dtypes:
            checks += _checks_at(label, m, k, n, dtype, device)
    return checks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype is FP8 else t


def _bitwise(got: tuple, expected: tuple) -> dict:
    equal = all(
        (a is None and b is None)
        or (a is not None and b is not None and torch.equal(_bits(a.cpu()), _bits(b)))
        for a, b in zip(got, expected, strict=True)
    )
    return {"compare": "bitwise", "ok": equal}


def _close(expected: torch.Tensor, got: torch.Tensor, threshold: float) -> dict:
    db = sqnr(expected.float(), got.cpu().float())
    return {
        "compare": "sqnr",
        "sqnr_db": round(db, 2),
        "threshold_db": threshold,
        "ok": db >= threshold,
    }


def _checks_at(label: str, m: int, k: int, n: int, dtype: torch.dtype, device: str) -> list:
    gen = torch.Generator().manual_seed(m * 31 + k)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen).to(dtype)
    smooth = torch.rand(k, generator=gen) + 0.5
    down = (torch.randn(RANK, k, generator=gen) * 0.05).to(dtype)
    up = (torch.randn(n, RANK, generator=gen) * 0.05).to(dtype)
    dt = str(dtype).removeprefix("torch.")
    tag = f"{label} {m}x{k}->{n} {dt}"

    def on(*ts):
        return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]

    checks = []
    for qdtype in (torch.int8, FP8):
        q = "int8" if qdtype is torch.int8 else "fp8"
        checks.append(
            (
                f"quantize_act_dynamic {q} {tag}",
                lambda qdtype=qdtype: _bitwise(
                    quantize_act.quantize_act_dynamic(*on(x), qdtype),
                    reference.quantize_act_dynamic(x, qdtype),
                ),
            )
        )
        scale = torch.tensor(0.013)
        checks.append(
            (
                f"quantize_act_static {q} {tag}",
                lambda qdtype=qdtype, s=scale: _bitwise(
                    (quantize_act.quantize_act_static(*on(x, s), qdtype),),
                    (reference.quantize_act_static(x, s, qdtype),),
                ),
            )
        )
        xq, xs = reference.quantize_act_dynamic(x, qdtype)
        wq, ws = reference.quantize_act_dynamic(w, qdtype)
        ws = ws.reshape(-1)
        checks.append(
            (
                f"linear_w8a8 {q} dynamic {tag}",
                lambda a=(xq, xs, wq, ws): _close(
                    reference.linear_w8a8(*a, bias, dtype),
                    gemm_w8a8.linear_w8a8(*on(*a, bias), dtype),
                    SUM_ORDER_DB[dtype],
                ),
            )
        )
        wo = reference.linear_int8_wo if q == "int8" else reference.linear_fp8_wo
        checks.append(
            (
                f"weight_only {q} {tag}",
                lambda a=(wq, ws), q=q, wo=wo: _close(
                    wo(x, *a, bias),
                    gemm_wo.linear_weight_only(*on(x, *a, None, bias, None, None), q),
                    SUM_ORDER_DB[dtype],
                ),
            )
        )
    checks.append(
        (
            f"smooth {tag}",
            lambda: _bitwise((quantize_act.smooth(*on(x, smooth)),), (ops.smooth(x, smooth),)),
        )
    )
    for fmt, group in (("int4", 64), ("int4", 128), ("mxfp4", 32), ("nvfp4", 16)):
        packed = w4.quantize_4bit(w, fmt, group)
        checks.append(
            (
                f"quantize_act_4bit {fmt} g{group} {tag}",
                lambda f=fmt, gr=group: _act4_check(x, smooth, down, f, gr, on),
            )
        )
        threshold = INT4_DEQUANT_DB[dtype] if fmt == "int4" else LORA_BRANCH_DB[dtype]
        args = (x, *packed, bias, down, up)
        checks.append(
            (
                f"weight_only {fmt} g{group} lora {tag}",
                lambda a=args, f=fmt, gr=group, t=threshold: _close(
                    w4.linear_w4a16(*a, f, gr), gemm_wo.linear_weight_only(*on(*a), f, gr), t
                ),
            )
        )
        if (fmt, group) != ("int4", 128):
            args = (x, *packed, bias, smooth, down, up)
            checks.append(
                (
                    f"w4a4 {fmt} g{group} {tag}",
                    lambda a=args, f=fmt, gr=group: _close(
                        w4.linear_w4a4(*a, f, gr),
                        gemm_w4a4.linear_w4a4(*on(*a), f, gr),
                        LORA_BRANCH_DB[dtype],
                    ),
                )
            )
    for group in (64, 128):
        packed = w4a8.quantize_w4a8_weight(w, group)
        # static: the scale min-max calibration would store for this activation
        calibrated = (x.float() / smooth).abs().amax() / 127
        for static in (None, calibrated):
            mode = "dynamic" if static is None else "static"
            checks.append(
                (
                    f"quantize_act_w4a8 {mode} {tag}",
                    lambda s=static: _act_w4a8_check(x, smooth, down, s, on),
                )
            )
            args = (x, *packed, bias, smooth, down, up, static)
            checks.append(
                (
                    f"w4a8 g{group} {mode} {tag}",
                    lambda a=args: _close(
                        w4a8.linear_w4a8(*a), gemm_w4a8.linear_w4a8(*on(*a)), LORA_BRANCH_DB[dtype]
                    ),
                )
            )
    return checks


def _act_w4a8_check(x, smooth, down, static, on) -> dict:
    """Codes and scales bit for bit; the branch's lora_act by SQNR."""
    q, scale, lora_act = gemm_w4a8.quantize_act_w4a8(*on(x, smooth, down, static))
    ref_q, ref_scale, ref_lora = w4a8.quantize_act_w4a8(x, smooth, down, static)
    result = _bitwise((q, scale.reshape(-1)), (ref_q, ref_scale.reshape(-1)))
    lora = _close(ref_lora, lora_act, LORA_BRANCH_DB[torch.float32])
    return {**result, "lora_sqnr_db": lora.get("sqnr_db"), "ok": result["ok"] and lora["ok"]}


def _act4_check(x, smooth, down, fmt, group, on) -> dict:
    """Codes, scales and global scale bit for bit; the branch's lora_act by SQNR."""
    got = quantize_act_4bit.quantize_act_4bit(*on(x, smooth, down), fmt, group)
    expected = w4.quantize_act_4bit(x, smooth, down, fmt, group)
    result = _bitwise(tuple(got[:3]), tuple(expected[:3]))
    # float32 sums in another order: the interpreter tier's threshold for lora_act
    branch = _close(expected[3], got.lora_act, SUM_ORDER_DB[torch.float32])
    return {**result, "lora_sqnr_db": branch["sqnr_db"], "ok": result["ok"] and branch["ok"]}


# ---------------------------------------------------------------- the plan


@dataclass
class Step:
    name: str
    estimate_s: float
    run: Callable[[], None]


def plan(args, log: Log, device: str) -> list[Step]:
    dry = args.dry_run
    clock = stand_in_clock if dry else cuda_graph_clock
    kn = DRY_KN if dry else FLUX_KN
    ms = DRY_M if dry else GEMM_M
    checks = numerics_checks(device, dry)
    steps = []
    if not dry:
        steps.append(Step("warm", WARM_S, lambda: warm(args, log, kn)))
    steps.append(Step("numerics", CHECK_S * len(checks), lambda: run_checks(checks, log)))
    per_m = ROW_S * len(kn) * (len(GEMM_ROWS) + len(ACT_ROWS))
    cache: dict[tuple, Operands] = {}
    for m in ms:
        steps.append(
            Step(f"gemm M={m}", per_m, lambda m=m: time_rows(m, kn, ms, cache, clock, device, log))
        )
    steps.append(Step("e2e", 10.0 if dry else E2E_MIN_S, lambda: e2e(args, log)))
    return steps


def run_checks(checks: list, log: Log) -> None:
    for name, check in checks:
        try:
            result = check()
        except Exception as error:
            result = {"ok": False, "error": error_text(error)}
        log.write("check", name=name, **result)
        if not result["ok"]:
            print(f"  FAIL {name}: {result}", flush=True)


def time_rows(m, kn, ms, cache, clock, device, log: Log) -> None:
    for k, n in kn:
        key = (k, n)
        if key not in cache:
            try:
                cache[key] = operands(max(ms), k, n, device)
            except Exception as error:
                log.write("timing", m=m, k=k, n=n, row="operands", error=error_text(error))
                continue
        o = cache[key]
        times: dict[str, dict] = {}
        for row, fn in rows_for(o, m).items():
            try:
                times[row] = clock(fn)
            except Exception as error:
                times[row] = {"error": error_text(error)}
            record = {"m": m, "k": k, "n": n, "row": row, **times[row]}
            for base in BASELINES:
                if "ms" in times[row] and "ms" in times.get(base, {}):
                    record[f"vs_{base}"] = times[base]["ms"] / times[row]["ms"]
            if "ms" in times[row]:
                record["tflops"] = round(2 * m * k * n / (times[row]["ms"] * 1e-3) / 1e12, 3)
            if row in ACT_ROWS:
                record.pop("tflops", None)
            log.write("timing", **record, prep_ms=round(o.prep_ms, 1))


def warm(args, log: Log, kn) -> None:
    """Compile every config the timings will launch, in parallel worker processes."""
    workers = max(1, min(args.jobs, 16))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu", "--warm-part", f"{i}/{workers}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(workers)
    ]
    failures = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(out[-400:])
    log.write("warm", workers=workers, failed=len(failures), errors=failures[:2])


def warm_part(part: str) -> int:
    """One warm worker: launch each candidate config of its share of the rows once."""
    index, count = (int(v) for v in part.split("/"))

    def every_config(self, key, device, launch, valid=lambda c: True, tune=True):
        if tune and tuning.autotune_enabled():
            for candidate in self.candidates(device):
                if valid(candidate):
                    with contextlib.suppress(Exception):  # the tuner skips it too
                        launch(candidate)
        return self.default

    tuning.Tuner.pick = every_config
    jobs = [(k, n, row) for k, n in FLUX_KN for row in (*GEMM_ROWS, *ACT_ROWS)]
    for k, n, row in jobs[index::count]:
        o = operands(16, k, n, "cuda")  # M is not specialized: 16 compiles for every M
        fn = rows_for(o, 16).get(row)
        if fn is not None and row not in BASELINES:
            try:
                fn()
            except Exception as error:
                print(f"{row} {k}x{n}: {error_text(error)}", flush=True)
    torch.cuda.synchronize()
    return 0


def e2e(args, log: Log) -> None:
    remaining = args.budget - log.elapsed()
    if importlib.util.find_spec("diffusers") is None:
        log.write("e2e", skipped="diffusers does not import (scripts/gpu.sh --prepare)")
        return
    blocks = None if args.dry_run else "19,38" if remaining > 420 else "4,8"
    command = [
        sys.executable,
        "-m",
        "benchmarks.e2e",
        "--recipes",
        args.recipes,
        "--blocks",
        blocks,
        "--iters",
        "5",
        "--out",
        str(args.out / "e2e.json"),
    ]
    if args.dry_run:
        command = [
            sys.executable,
            "-m",
            "benchmarks.e2e",
            "--smoke",
            "--no-compile",
            "--ablations",
            "--recipes",
            "int8-dynamic",
            "--out",
            str(args.out / "e2e.json"),
        ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(remaining - 5, 10),
        )
    except subprocess.TimeoutExpired:
        log.write("e2e", error=f"timed out after {remaining - 5:.0f} s", command=command)
        return
    result_path = args.out / "e2e.json"
    payload = json.loads(result_path.read_text()) if result_path.exists() else None
    log.write(
        "e2e",
        returncode=done.returncode,
        blocks=blocks,
        command=" ".join(command[1:]),
        rows=payload["rows"] if payload else None,
        tail=done.stdout[-1500:] + done.stderr[-1500:],
    )


def execute(steps: list[Step], budget: float, log: Log) -> None:
    """Run `steps` in order; skip (and record) each that no longer fits the budget."""
    for s in steps:
        left = budget - log.elapsed()
        if s.estimate_s > left:
            log.write("step", name=s.name, skipped=f"~{s.estimate_s:.0f} s > {left:.0f} s left")
            print(f"skip {s.name}: ~{s.estimate_s:.0f} s > {left:.0f} s left", flush=True)
            continue
        start = time.monotonic()
        print(f"{s.name} ...", flush=True)
        try:
            s.run()
            log.write("step", name=s.name, seconds=round(time.monotonic() - start, 2),
                      estimate_s=round(s.estimate_s, 1))  # fmt: skip
        except Exception as error:  # a step's own failure; the next step still runs
            log.write("step", name=s.name, error=error_text(error),
                      trace=traceback.format_exc()[-1500:])  # fmt: skip


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="device seconds")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/gpu")))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--recipes", default="fp8-dynamic,int4-wo", help="e2e recipes")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report", type=Path, help="render this JSONL's tables and exit")
    parser.add_argument(
        "--write",
        metavar="NAME",
        help="with --report: save benchmarks/results/NAME.{md,jsonl} and put the tables "
        "in docs/kernels.md",
    )
    parser.add_argument("--warm-part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_part:
        return warm_part(args.warm_part)
    if args.report:
        text = report(load(args.report))
        print(text, end="")
        if args.write:
            write_report(args.report, text, args.write)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU, or --dry-run to rehearse on the CPU")
    device = "cpu" if args.dry_run else "cuda"
    log = Log(args.out / "gpu.jsonl", args.dry_run)
    log.write("env", **environment(args.dry_run))
    steps = plan(args, log, device)
    total = sum(s.estimate_s for s in steps)
    print(f"plan ({args.budget:.0f} s budget, {total:.0f} s estimated):", flush=True)
    for s in steps:
        print(f"  {s.name:12} ~{s.estimate_s:6.0f} s", flush=True)
    log.write(
        "plan",
        budget_s=args.budget,
        steps=[{"name": s.name, "estimate_s": round(s.estimate_s, 1)} for s in steps],
    )
    execute(steps, args.budget, log)
    print(report(load(log.path)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
