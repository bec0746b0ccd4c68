"""qcompile's Triton kernels against cuBLAS bf16 and torch._scaled_mm, same run, real shapes.

Shapes (M × K → N) are the linears of FLUX.1-dev, SD3-medium and the SDXL UNet at 1024²
(see the project's FACTS): Flux's image stream at M = 4096 and text stream at M = 512,
its single blocks at M = 4608, and decoding-like M = 1; SD3 at 4096 + 333 tokens and
SDXL at 4096 / 1024 tokens, each with classifier-free guidance's batch of 2.

Rows per shape (every time is the median of ``triton.testing.do_bench``, or of
``do_bench_cudagraph`` with --cuda-graph, which hides the ~10 µs per-op launch cost):
    bf16            F.linear, bf16 × bf16 (cuBLAS)                      baseline
    scaled_mm       torch._scaled_mm FP8, per-tensor scales             baseline
    scaled_mm_row   torch._scaled_mm FP8, rowwise scales                baseline
    fp8_gemm        qcompile::linear_fp8_w8a8, rowwise scales (GEMM only)
    fp8_w8a8        quantize_act_dynamic + linear_fp8_w8a8 (the fp8-dynamic linear)
    int8_w8a8       the same in INT8
    int4_w4a16      linear_int4_wo, group 64
    mxfp4_w4a16     linear_w4a16 MXFP4
    svdq_w4a4       linear_w4a4 INT4 g64, smoothing, rank 32 (SVDQuant, whole linear)
    svdq_nvfp4      linear_w4a4 NVFP4, smoothing, rank 32
TFLOP/s counts 2·M·N·K (the branch's extra 2·M·R·(N + K) is not counted). Ratios are
speed-ups (baseline time / op time) against bf16 and scaled_mm_row of the same shape.

Targets (H100): fp8_gemm ≥ 1.00× scaled_mm_row at Flux shapes with M ≥ 4096; fp8_w8a8
≥ 1.7× bf16 at M ≥ 4096; int4_w4a16 ≥ 1.0× bf16 at M = 4096 and ≥ 3× at M = 1;
svdq_w4a4 ≥ 1.4× bf16 at M ≥ 4096. They are evaluated in the JSON's "targets".

    python -m benchmarks.kernels [--cuda-graph] [--quick] [--out PATH]
    python -m benchmarks.kernels --smoke     # no GPU: CPU references on tiny shapes,
                                             # checks the script end to end; not a result
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers the ops)
from benchmarks.results import write_results
from qcompile.kernels import reference
from qcompile.kernels.reference import w4

ops = torch.ops.qcompile
RANK = 32


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    m: int
    k: int
    n: int


def shapes(quick: bool = False) -> list[Shape]:
    flux = [("qkv", 3072, 9216), ("proj", 3072, 3072), ("mlp_up", 3072, 12288),
            ("mlp_down", 12288, 3072)]  # fmt: skip
    out = [Shape("flux", f"img.{name}", m, k, n) for m in (1, 4096) for name, k, n in flux]
    out += [Shape("flux", f"txt.{name}", 512, k, n) for name, k, n in flux]
    single = [("qkv", 3072, 9216), ("mlp_up", 3072, 12288), ("proj_out", 15360, 3072)]
    out += [Shape("flux", f"single.{name}", 4608, k, n) for name, k, n in single]
    sd3 = [("qkv", 1536, 4608), ("mlp_up", 1536, 6144), ("mlp_down", 6144, 1536)]
    out += [Shape("sd3", f"cfg2.{name}", 2 * (4096 + 333), k, n) for name, k, n in sd3]
    sdxl = [("s1.ff_up", 4096 * 2, 640, 5120), ("s1.ff_down", 4096 * 2, 2560, 640),
            ("s2.ff_up", 1024 * 2, 1280, 10240), ("s2.ff_down", 1024 * 2, 5120, 1280),
            ("s2.attn_kv", 77 * 2, 2048, 1280)]  # fmt: skip
    out += [Shape("sdxl", f"cfg2.{name}", m, k, n) for name, m, k, n in sdxl]
    if quick:
        out = [s for s in out if s.layer in ("img.qkv", "img.mlp_down", "cfg2.mlp_up")]
    return out


def smoke_shapes() -> list[Shape]:
    return [Shape("flux", "img.qkv/16", m, 192, 576) for m in (1, 64)] + [
        Shape("sdxl", "cfg2.ff_up/16", 128, 40, 320)
    ]


def _operands(s: Shape, device: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Each row's zero-argument callable, operands prepared outside the timed region."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.m, s.k, generator=g).to(torch.bfloat16)
    w = torch.randn(s.n, s.k, generator=g) / s.k**0.5
    bias = torch.randn(s.n, generator=g).to(torch.bfloat16)
    fp8 = torch.float8_e4m3fn

    def on(*ts):
        return [None if t is None else t.to(device) for t in ts]

    xd, wd, bd = on(x, w.to(torch.bfloat16), bias)
    w8, ws8 = on(*reference.quantize_fp8_per_channel(w))
    wi8, wsi8 = on(*reference.quantize_int8_per_channel(w))
    wt8, wst8 = on(*reference.quantize_fp8_per_tensor(w))
    xq, xs = ops.quantize_act_dynamic(xd, fp8)
    x_tensor_q = (xd.float() / xs.amax()).to(fp8)
    x_tensor_scale = xs.amax().reshape(())
    i4, i4s, _ = on(*w4.quantize_4bit(w, "int4", 64))
    mx, mxs, _ = on(*w4.quantize_4bit(w, "mxfp4", 32))
    nv, nvs, nvg = on(*w4.quantize_4bit(w, "nvfp4", 16))
    smooth, down, up = on(
        torch.rand(s.k, generator=g) + 0.5,
        (torch.randn(RANK, s.k, generator=g) * 0.02).to(torch.bfloat16),
        (torch.randn(s.n, RANK, generator=g) * 0.02).to(torch.bfloat16),
    )
    rows = {
        "bf16": lambda: F.linear(xd, wd, bd),
        "scaled_mm": lambda: torch._scaled_mm(
            x_tensor_q, wt8.t(), scale_a=x_tensor_scale, scale_b=wst8.reshape(()),
            bias=bd, out_dtype=torch.bfloat16,
        ),
        "scaled_mm_row": lambda: torch._scaled_mm(
            xq, w8.t(), scale_a=xs, scale_b=ws8.reshape(1, -1), bias=bd,
            out_dtype=torch.bfloat16,
        ),
        "fp8_gemm": lambda: ops.linear_fp8_w8a8(xq, xs, w8, ws8, bd, torch.bfloat16),
        "fp8_w8a8": lambda: ops.linear_fp8_w8a8(
            *ops.quantize_act_dynamic(xd, fp8), w8, ws8, bd, torch.bfloat16
        ),
        "int8_w8a8": lambda: ops.linear_int8_w8a8(
            *ops.quantize_act_dynamic(xd, torch.int8), wi8, wsi8, bd, torch.bfloat16
        ),
        "int4_w4a16": lambda: ops.linear_int4_wo(xd, i4, i4s, bd, 64),
        "mxfp4_w4a16": lambda: ops.linear_w4a16(xd, mx, mxs, None, bd, None, None, "mxfp4", 32),
        "svdq_w4a4": lambda: ops.linear_w4a4(
            xd, i4, i4s, None, bd, smooth, down, up, "int4", 64
        ),
        "svdq_nvfp4": lambda: ops.linear_w4a4(
            xd, nv, nvs, nvg, bd, smooth, down, up, "nvfp4", 16
        ),
    }  # fmt: skip
    return rows


def _timer(device: str, cuda_graph: bool) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        def bench(fn):
            fn()  # compile and autotune outside the timed (and captured) region
            torch.cuda.synchronize()
            if cuda_graph:
                return do_bench_cudagraph(fn, return_mode="median")
            return do_bench(fn, return_mode="median")

        return bench

    def cpu_bench(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_bench


def measure(shape_list: list[Shape], device: str, cuda_graph: bool) -> list[dict]:
    bench = _timer(device, cuda_graph)
    results = []
    for s in shape_list:
        times = {}
        with torch.inference_mode():
            for name, fn in _operands(s, device).items():
                try:
                    times[name] = bench(fn)
                except (RuntimeError, NotImplementedError) as error:  # e.g. no FP8 here
                    times[name] = None
                    print(f"  {s.model} {s.layer} M={s.m}: {name} unavailable ({error})"[:160])
        flops = 2 * s.m * s.n * s.k
        rows = {}
        for name, ms in times.items():
            if ms is None:
                rows[name] = None
                continue
            rows[name] = {
                "ms": ms,
                "tflops": flops / (ms * 1e-3) / 1e12,
                "vs_bf16": times["bf16"] / ms if times.get("bf16") else None,
                "vs_scaled_mm_row": (
                    times["scaled_mm_row"] / ms if times.get("scaled_mm_row") else None
                ),
            }
        results.append({**vars(s), "rows": rows})
    return results


def _speedups(results, row, baseline, keep) -> list[float]:
    key = f"vs_{baseline}"
    return [
        r["rows"][row][key]
        for r in results
        if keep(r) and r["rows"].get(row) and r["rows"][row][key] is not None
    ]


def targets(results: list[dict]) -> dict[str, dict]:
    def check(row, baseline, keep, at_least):
        ratios = _speedups(results, row, baseline, keep)
        return {
            "min_speedup": min(ratios) if ratios else None,
            "target": at_least,
            "met": bool(ratios) and min(ratios) >= at_least,
            "shapes": len(ratios),
        }

    big = lambda r: r["m"] >= 4096  # noqa: E731
    return {
        "fp8_gemm vs scaled_mm_row, Flux M>=4096": check(
            "fp8_gemm", "scaled_mm_row", lambda r: r["model"] == "flux" and big(r), 1.0
        ),
        "fp8_w8a8 vs bf16, M>=4096": check("fp8_w8a8", "bf16", big, 1.7),
        "int4_w4a16 vs bf16, M=4096": check("int4_w4a16", "bf16", lambda r: r["m"] == 4096, 1.0),
        "int4_w4a16 vs bf16, M=1": check("int4_w4a16", "bf16", lambda r: r["m"] == 1, 3.0),
        "svdq_w4a4 vs bf16, M>=4096": check("svdq_w4a4", "bf16", big, 1.4),
    }


def print_table(results: list[dict]) -> None:
    names = list(results[0]["rows"])
    print(f"{'shape':34} " + " ".join(f"{n:>13}" for n in names))
    for r in results:
        label = f"{r['model']} {r['layer']} {r['m']}x{r['k']}->{r['n']}"
        cells = []
        for n in names:
            row = r["rows"][n]
            if row is None:
                cells.append(f"{'n/a':>13}")
            elif n == "bf16":
                cells.append(f"{row['ms'] * 1e3:>8.1f}us   ")
            else:
                cells.append(f"{row['vs_bf16']:>7.2f}x bf16")
        print(f"{label[:34]:34} " + " ".join(cells))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-graph", action="store_true", help="time inside CUDA graphs")
    parser.add_argument("--quick", action="store_true", help="three shapes per M only")
    parser.add_argument("--smoke", action="store_true", help="no GPU: CPU references, tiny")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/kernels_<dev>.json)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the kernel benchmark needs a CUDA GPU (use --smoke to check the script)")
    device = "cpu" if args.smoke else "cuda"
    shape_list = smoke_shapes() if args.smoke else shapes(args.quick)
    results = measure(shape_list, device, args.cuda_graph)
    print_table(results)
    checked = None
    if args.smoke:
        print("(smoke run: CPU references on tiny shapes, not kernel timings)")
    else:
        checked = targets(results)
        for name, verdict in checked.items():
            print(f"{name}: {verdict}")
    payload = {
        "mode": "smoke: CPU references, not kernel timings" if args.smoke else "kernels",
        "timer": "do_bench_cudagraph" if args.cuda_graph else "do_bench",
        "triton": _triton_version(),
        "results": results,
        "targets": checked,
    }
    out = args.out or f"benchmarks/results/kernels_{'smoke_cpu' if args.smoke else 'cuda'}.json"
    write_results(out, payload)
    print(f"wrote {out}")
    return payload


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
