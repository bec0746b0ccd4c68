"""One Flux transformer step, end to end: bf16 eager and compiled against qcompile recipes.

A FLUX.1-dev-size transformer (its published config: 19 double and 38 single blocks,
3072 wide, or the first --blocks of them; random weights, built on the meta device and
materialised on the GPU directly in bfloat16) runs one forward step at 1024² (4096 image
and 512 text tokens), batch 1. Rows:
    bf16                 eager
    bf16+compile         torch.compile (inductor), the baseline of every ratio
    <recipe>+graph       qcompile.quantize, then the model's own call: the lowered
                         graph (horizontal fusion on), compiled with the qcompile
                         backend on its first call (the default on CUDA)
    <recipe>+qcompile    qcompile.quantize, then torch.compile(model, backend="qcompile")
                         (Dynamo traces the quantized modules' forward)
    <first recipe>+graph-no-hfuse / -no-actfuse   (--ablations) the same graph without
                         horizontal fusion / without activation-quantize fusion
    torchao-fp8-row      torchao float8 dynamic activation + weight, per row, + compile
                         (only when torchao is installed; otherwise the row says why)
Per row: median step time over --iters timed steps (after warm-up, which includes the
compile, timed separately), speed-up vs bf16+compile, peak GPU memory from the built
model on (weights, quantization, compile and the steps), and the bytes of the
transformer's weights. --no-compile drops the compiled rows and runs the lowered graphs
uncompiled (ratios are then against bf16 eager). The goal (issue 13): the best recipe
≥ 1.7× bf16+compile and ahead of torchao in the same run.

    python -m benchmarks.e2e [--recipes fp8-dynamic,int8-dynamic,...] [--iters 10]
                             [--blocks 4,8] [--ablations] [--no-compile]
                             [--out benchmarks/results/e2e-<device>.json]
    python -m benchmarks.e2e --smoke   # no GPU: the tiny Flux on the CPU, checks the
                                       # script end to end; not a result
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable

import torch

import qcompile
from benchmarks.configs import FLUX_DEV
from benchmarks.results import write_results

RECIPES = ("fp8-dynamic", "int8-dynamic", "int8-wo", "int4-wo", "svdq-w4a16", "nvfp4")
SMOKE_RECIPES = ("int8-dynamic",)
TARGET_SPEEDUP = 1.7


def flux_dev(device: str, dtype: torch.dtype, seed: int = 0, config: dict = FLUX_DEV):
    """FLUX.1-dev's transformer with random weights (linears N(0, 0.02), zero biases,
    unit norm scales), built on the meta device and materialised on `device` in `dtype`
    (never in float32 first: 11.9 B parameters would take 47.6 GB)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in module.named_parameters(recurse=False):
                if name == "bias":
                    tensor.zero_()
                elif isinstance(module, torch.nn.Linear):
                    tensor.normal_(0.0, 0.02, generator=generator)
                else:  # norm scales
                    tensor.fill_(1.0)
    return model


def flux_inputs(model, image_tokens: int, text_tokens: int, device: str, dtype: torch.dtype):
    cfg = model.config
    generator = torch.Generator(device).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    side = int(image_tokens**0.5)
    rows = torch.arange(side, device=device).repeat_interleave(side)
    cols = torch.arange(side, device=device).repeat(side)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)
    inputs = {
        "hidden_states": randn(1, image_tokens, cfg.in_channels),
        "encoder_hidden_states": randn(1, text_tokens, cfg.joint_attention_dim),
        "pooled_projections": randn(1, cfg.pooled_projection_dim),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return inputs


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def time_step(step: Callable[[], object], iters: int, device: str) -> tuple[float, list[float]]:
    """(warm-up seconds including any compile, per-step milliseconds)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    step()
    sync()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return warmup, times


def torchao_fp8_row(model):
    """torchao's float8 dynamic-activation/weight quantization, per row; None if absent."""
    if importlib.util.find_spec("torchao") is None:
        return None, "torchao is not installed"
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        return None, f"torchao lacks the float8 per-row config ({exc})"
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model, ""


def run(args) -> dict:
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        from qcompile.tiny import flux_eval_inputs, tiny_flux

        def build():
            return tiny_flux()

        def inputs_for(model):
            return flux_eval_inputs(model, batch=1, rows=8, cols=8, text=16)
    else:
        config = dict(FLUX_DEV)
        if args.blocks:
            config["num_layers"], config["num_single_layers"] = args.blocks

        def build():
            return flux_dev(device, dtype, config=config)

        def inputs_for(model):
            return flux_inputs(model, args.image_tokens, args.text_tokens, device, dtype)

    rows: dict[str, dict] = {}

    def measure(name: str, make: Callable[[], tuple[object, object, str]]) -> None:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the peak counts from the build on
        model, runner, skipped = make()
        if runner is None:
            rows[name] = {"skipped": skipped}
            print(f"{name}: skipped ({skipped})", flush=True)
            return
        inputs = inputs_for(model)
        torch._dynamo.reset()

        def step():
            with torch.no_grad():
                return runner(**inputs, return_dict=False)

        warmup, times = time_step(step, args.iters, device)
        rows[name] = {
            "ms": statistics.median(times),
            "ms_all": times,
            "warmup_s": warmup,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "weight_gib": weight_bytes(model) / 2**30,
        }
        runtime = qcompile.runtime_of(model)
        if runtime is not None and runner is model:  # the graph rows: which path ran
            rows[name]["calls"] = dict(runtime.calls)
        print(f"{name}: {rows[name]['ms']:.2f} ms (warm-up {warmup:.1f} s)", flush=True)

    def eager():
        model = build()
        return model, model, ""

    def compiled():
        model = build()
        return model, torch.compile(model, mode=args.mode), ""

    compile_rows = not args.no_compile

    def recipe_row(recipe):
        def make():
            model = qcompile.quantize(build(), recipe)
            return model, torch.compile(model, backend="qcompile", mode=args.mode), ""

        return make

    def graph_row(recipe, horizontal_fusion=True, fuse_activation_quant=True):
        def make():
            from qcompile import backend

            model = qcompile.quantize(build(), recipe)
            runtime = qcompile.runtime_of(model)
            # The smoke run compiles only the main graph row (inductor on the CPU is
            # slow); the ablations there check the rows run, not their speed.
            ablation = not (horizontal_fusion and fuse_activation_quant)
            runtime.compile = compile_rows and not (smoke and ablation)
            runtime.horizontal_fusion = horizontal_fusion
            backend.FUSE_ACTIVATION_QUANT = fuse_activation_quant
            return model, model, ""

        return make

    def torchao_row():
        model, reason = torchao_fp8_row(build())
        if model is None:
            return None, None, reason
        return model, torch.compile(model, mode=args.mode), ""

    measure("bf16", eager)
    if compile_rows:
        measure("bf16+compile", compiled)
    from qcompile import backend

    for recipe in args.recipes:
        measure(f"{recipe}+graph", graph_row(recipe))
        if compile_rows:
            measure(f"{recipe}+qcompile", recipe_row(recipe))
    first = args.recipes[0]
    if args.ablations:
        measure(f"{first}+graph-no-hfuse", graph_row(first, horizontal_fusion=False))
        measure(f"{first}+graph-no-actfuse", graph_row(first, fuse_activation_quant=False))
        backend.FUSE_ACTIVATION_QUANT = True
    if not smoke and compile_rows:
        measure("torchao-fp8-row", torchao_row)
    base = rows["bf16+compile" if compile_rows else "bf16"]["ms"]
    for row in rows.values():
        if "ms" in row:
            row["vs_baseline"] = base / row["ms"]
    ours = {
        k: v["vs_baseline"]
        for k, v in rows.items()
        if k.endswith(("+qcompile", "+graph")) and "ms" in v
    }
    best = max(ours, key=ours.get) if ours else None
    torchao = rows.get("torchao-fp8-row", {}).get("vs_baseline")
    targets = None
    if not smoke and best is not None and compile_rows:
        targets = {
            "best_recipe": best,
            f"best >= {TARGET_SPEEDUP}x bf16+compile": ours[best] >= TARGET_SPEEDUP,
            "best ahead of torchao": None if torchao is None else ours[best] > torchao,
        }
    return {
        "mode": "smoke (CPU, tiny Flux; not a result)" if smoke else "flux-dev 1024² batch 1",
        "model": "tiny_flux" if smoke else FLUX_DEV,
        "image_tokens": None if smoke else args.image_tokens,
        "text_tokens": None if smoke else args.text_tokens,
        "dtype": str(dtype),
        "compile_mode": args.mode,
        "blocks": None if smoke else args.blocks or (19, 38),
        "baseline": "bf16+compile" if compile_rows else "bf16 (eager, --no-compile)",
        "rows": rows,
        "targets": targets,
    }


def table(payload: dict) -> str:
    lines = [f"{'row':<30} {'ms':>9} {'vs baseline':>16} {'peak GiB':>9} {'weights GiB':>11}"]
    for name, row in payload["rows"].items():
        if "ms" not in row:
            lines.append(f"{name:<30} skipped: {row['skipped']}")
            continue
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        lines.append(
            f"{name:<30} {row['ms']:>9.2f} {row['vs_baseline']:>15.2f}x {peak:>9} "
            f"{row['weight_gib']:>11.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--recipes", type=lambda s: tuple(s.split(",")), default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--image-tokens", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--mode", default=None, help="torch.compile mode for every row")
    parser.add_argument(
        "--blocks",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="double,single blocks of FLUX.1-dev to build (default all: 19,38)",
    )
    parser.add_argument("--ablations", action="store_true", help="the fusion ablation rows")
    parser.add_argument("--no-compile", action="store_true", help="no compiled rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.e2e needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    args.recipes = args.recipes or (SMOKE_RECIPES if args.smoke else RECIPES)
    args.iters = args.iters or (2 if args.smoke else 10)
    payload = run(args)
    device = "cpu" if args.smoke else torch.cuda.get_device_name().replace(" ", "-")
    out = args.out or f"benchmarks/results/e2e-{device}.json"
    write_results(out, payload)
    if args.smoke:
        print("smoke run: checks the script end to end; the numbers are not a result")
    print(f"baseline: {payload['baseline']}")
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
