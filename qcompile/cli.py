"""The `qcompile` command line: quantize, inspect, eval, bench, demo, recipes."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p, steps: int) -> None:
        p.add_argument("--steps", type=int, default=steps, help="denoising steps per call")
        p.add_argument("--size", type=int, default=None, help="image height and width")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    q = sub.add_parser("quantize", help="quantize a pipeline's transformer/unet and save it")
    q.add_argument("model", help="pipeline folder (model_index.json) or Hub id")
    q.add_argument("--recipe", required=True, help="preset name (see `qcompile recipes`)")
    q.add_argument("--component", choices=("transformer", "unet"), default=None)
    q.add_argument("--prompts", default=None, help="calibration prompts: .txt or .tsv")
    q.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    q.add_argument("--out", default=None, help="output folder (default: <model>-<recipe>)")
    q.add_argument(
        "--low-memory",
        action="store_true",
        help="calibrate with the denoiser's weights read from disk one submodule at a time",
    )
    run_options(q, steps=20)

    i = sub.add_parser("inspect", help="what a qcompile checkpoint holds")
    i.add_argument("path", help="a saved pipeline folder or its quantized component's folder")
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("eval", help="compare a quantized pipeline with its float reference")
    e.add_argument("path", help="the quantized pipeline folder")
    e.add_argument("--reference", required=True, help="the float pipeline folder or Hub id")
    e.add_argument("--prompts", default=None, help="prompts: .txt or .tsv")
    e.add_argument("--num-prompts", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="report folder (default: <path>-eval)")
    run_options(e, steps=20)

    b = sub.add_parser("bench", help="time pipeline calls, against a reference if given")
    b.add_argument("path", help="the quantized pipeline folder")
    b.add_argument("--reference", default=None, help="a float pipeline to time in the same run")
    b.add_argument("--iters", type=int, default=3, help="timed calls after one warm-up")
    b.add_argument("--out", default=None, help="write the results as JSON here")
    run_options(b, steps=20)

    demo = sub.add_parser("demo", help="quantize a tiny offline FluxPipeline and report")
    demo.add_argument("--recipe", default="int8-wo", help="preset name (see `qcompile recipes`)")
    demo.add_argument("--out", default="qcompile-demo", help="folder for the image")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps")
    demo.add_argument("--size", type=int, default=64, help="image height and width")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    sub.add_parser("recipes", help="list the recipe presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import diffusers

    import qcompile

    diffusers.utils.logging.set_verbosity_error()
    try:
        print(_run(args))
    except qcompile.QCompileError as exc:
        print(f"qcompile {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> str:
    import qcompile
    from qcompile import commands

    if args.command == "recipes":
        return "\n".join(
            f"{name:14s} {qcompile.get_recipe(name).to_json()}" for name in qcompile.list_recipes()
        )
    if args.command == "demo":
        from qcompile.demo import format_report, run_demo

        report = run_demo(args.recipe, args.out, args.steps, args.size, DTYPES[args.dtype])
        return format_report(report)
    if args.command == "inspect":
        from qcompile.inspection import format_inspection, inspect_checkpoint

        report = inspect_checkpoint(args.path)
        return json.dumps(report, indent=2) if args.json else format_inspection(report)
    run = dict(steps=args.steps, size=args.size, dtype=DTYPES[args.dtype], device=_device(args))
    if args.command == "quantize":
        out = args.out or f"{args.model.rstrip('/').split('/')[-1]}-{args.recipe}"
        summary = commands.quantize_pipeline(
            args.model,
            args.recipe,
            out,
            component=args.component,
            prompts=args.prompts,
            num_prompts=args.num_prompts,
            low_memory=args.low_memory,
            **run,
        )
        ratio = summary["bytes_before"] / summary["bytes_after"]
        return commands.format_rows(
            [
                ("saved", summary["out"]),
                ("component", summary["component"]),
                ("recipe", summary["recipe"]),
                ("calibration prompts", str(summary["calibration_prompts"])),
                (
                    "linears quantized",
                    f"{summary['linears_quantized']} of {summary['linears_total']}",
                ),
                ("bytes before", f"{summary['bytes_before']:,}"),
                ("bytes after", f"{summary['bytes_after']:,} ({ratio:.2f}× smaller)"),
                *((f"seconds: {k}", f"{v:.2f}") for k, v in summary["seconds"].items()),
            ]
        )
    if args.command == "eval":
        from qcompile.evaluation import evaluate

        out = args.out or f"{args.path.rstrip('/')}-eval"
        report = evaluate(
            args.path,
            args.reference,
            out,
            prompts=args.prompts,
            num_prompts=args.num_prompts,
            seed=args.seed,
            **run,
        )
        return _format_eval(report)
    payload = commands.bench_pipeline(args.path, reference=args.reference, iters=args.iters, **run)
    if args.out:
        _write_json(args.out, payload)
    return _format_bench(payload)


def _write_json(path: str, payload: dict) -> None:
    """`payload` to `path`, atomically (a temporary file renamed over it)."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, target)


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _format_eval(report: dict) -> str:
    from qcompile.commands import format_rows

    summary = report["summary"]
    rows = [
        ("prompts", str(len(report["prompts"]))),
        ("transformer SQNR (mean)", f"{summary['transformer_sqnr_db']:.1f} dB"),
        ("image PSNR (mean)", f"{summary['image_psnr_db']:.1f} dB"),
        ("image SSIM (mean)", f"{summary['image_ssim']:.4f}"),
    ]
    worst = summary["worst_layer"]
    if worst:
        rows.append(("worst layer", f"{worst['layer']} {worst['sqnr_db']:.1f} dB"))
    rows += [(f"file: {name}", path) for name, path in report["files"].items()]
    return format_rows(rows)


def _format_bench(payload: dict) -> str:
    from qcompile.commands import format_rows

    rows = []
    for label, row in payload["rows"].items():
        peak = f", peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else ""
        speed = f" ({row['speedup']:.2f}× the reference)" if "speedup" in row else ""
        rows.append((label, f"{row['seconds']:.3f} s/call{speed}{peak}"))
        rows.append((f"{label} weight bytes", f"{row['weight_bytes']:,}"))
    return format_rows(rows)


if __name__ == "__main__":
    sys.exit(main())
