"""The `qcompile` command line: quantize, inspect, eval, bench, demo, recipes."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a user waits through, shown as one line each on stderr: the capture (seconds to
# minutes on a large model) and the first torch.compile of the graph.
PROGRESS_LOGGERS = ("qcompile.capture", "qcompile.runtime")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (the launcher, `qcompile_cli`, holds the parser) and run it."""
    from qcompile_cli import main as launch

    return launch(argv)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("qcompile: %(message)s"))
    for name in PROGRESS_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(progress)
        logger.propagate = False
    import diffusers

    import qcompile

    diffusers.utils.logging.set_verbosity_error()
    try:
        print(_run(args))
    except qcompile.QCompileError as exc:
        print(f"qcompile {args.command}: {exc}", file=sys.stderr)
        return 2
    finally:
        for name in PROGRESS_LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(progress)
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
    return 0


def _run(args: argparse.Namespace) -> str:
    import qcompile
    from qcompile import commands

    if args.command == "recipes":
        recipes = [qcompile.get_recipe(name) for name in qcompile.list_recipes()]
        if args.json:
            return json.dumps([recipe.to_dict() for recipe in recipes], indent=2)
        return format_recipes(recipes)
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
        out = args.out or commands.default_out(args.model, args.recipe)
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
    from qcompile.errors import QCompileError

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise QCompileError(
            f"--device {args.device!r} is not a device ({exc}); pass e.g. cuda, cuda:1 or cpu"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
        raise QCompileError(
            f"--device {args.device} asks for CUDA, but torch {torch.__version__} has none "
            f"here ({build}); pass --device cpu, or install a CUDA build of torch"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise QCompileError(
            f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    return args.device


def _format_eval(report: dict) -> str:
    from qcompile.commands import format_rows

    summary = report["summary"]
    rows = [
        ("prompts", str(len(report["prompts"]))),
        (f"{report['component']} SQNR (mean)", f"{summary['transformer_sqnr_db']:.1f} dB"),
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
        speed = ""
        if "speedup" in row:
            ratio = row["speedup"]
            speed = (
                f" ({ratio:.2f}× faster than the reference)"
                if ratio >= 1
                else f" ({1 / ratio:.2f}× slower than the reference)"
            )
        if row.get("graph_calls") is not None:
            speed += f", denoiser calls graph / eager {row['graph_calls']} / {row['eager_calls']}"
        rows.append((label, f"{row['seconds']:.3f} s/call{speed}{peak}"))
        rows.append((f"{label} weight bytes", f"{row['weight_bytes']:,}"))
    return format_rows(rows)


def format_recipes(recipes: list) -> str:
    """One line per preset: weights, activations, and whether it needs calibration
    (`qcompile recipes --json` prints each recipe in full)."""
    from qcompile.commands import format_rows

    def weights(recipe) -> str:
        spec = recipe.weight
        group = f" g{spec.group_size}" if spec.group_size else ""
        rank = f" + rank-{recipe.rank} branch" if recipe.rank else ""
        return f"{spec.format.value} {spec.granularity.value}{group}{rank}"

    def activations(recipe) -> str:
        spec = recipe.activation
        if not spec.quantized:
            return "16-bit"
        smooth = ", smoothed" if recipe.smooth is not None else ""
        return f"{spec.format.value} {spec.mode.value}{smooth}"

    rows = []
    for recipe in recipes:
        needs = "needs calibration" if recipe.needs_calibration else "no calibration"
        rows.append(
            (recipe.name, f"weights {weights(recipe)}; activations {activations(recipe)}; {needs}")
        )
    return format_rows(rows)


if __name__ == "__main__":
    sys.exit(main())
