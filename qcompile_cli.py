"""The `qcompile` command line's entry point: parses the arguments, then runs the command.

It sits outside the `qcompile` package on purpose: `import qcompile` loads torch and
diffusers (seconds), which `qcompile --help`, `--version` and a mistyped argument do not
need. Everything else runs in `qcompile.cli`.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("bfloat16", "float16", "float32")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"qcompile {version('qcompile')}"
    except PackageNotFoundError:
        return "qcompile (not installed as a package)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize, inspect, evaluate and time diffusers pipelines.",
        epilog="Python: `import qcompile` before DiffusionPipeline.from_pretrained of a "
        "quantized folder.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser, steps: int) -> None:
        p.add_argument("--steps", type=_positive, default=steps, help="denoising steps per call")
        p.add_argument("--size", type=_positive, default=None, help="image height and width")
        p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
        p.add_argument("--device", default=None, help="default: cuda if available, else cpu")

    q = sub.add_parser("quantize", help="quantize a pipeline's transformer/unet and save it")
    q.add_argument("model", help="pipeline folder (model_index.json) or Hub id")
    q.add_argument("--recipe", required=True, help="preset name (see `qcompile recipes`)")
    q.add_argument("--component", choices=("transformer", "unet"), default=None)
    q.add_argument("--prompts", default=None, help="calibration prompts: .txt or .tsv")
    q.add_argument("--num-prompts", type=_positive, default=None, help="use the first N prompts")
    q.add_argument(
        "--out",
        default=None,
        help="output folder: new, empty, or an earlier pipeline save (default: "
        "<model>-<recipe> beside the model folder)",
    )
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
    e.add_argument("--num-prompts", type=_positive, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="report folder (default: <path>-eval)")
    run_options(e, steps=20)

    b = sub.add_parser("bench", help="time pipeline calls, against a reference if given")
    b.add_argument("path", help="the quantized pipeline folder")
    b.add_argument("--reference", default=None, help="a float pipeline to time in the same run")
    b.add_argument("--iters", type=_positive, default=3, help="timed calls after one warm-up")
    b.add_argument("--out", default=None, help="write the results as JSON here")
    run_options(b, steps=20)

    demo = sub.add_parser("demo", help="quantize a tiny offline FluxPipeline and report")
    demo.add_argument("--recipe", default="int8-wo", help="preset name (see `qcompile recipes`)")
    demo.add_argument("--out", default="qcompile-demo", help="folder for the image")
    demo.add_argument("--steps", type=_positive, default=4, help="denoising steps")
    demo.add_argument("--size", type=_positive, default=64, help="image height and width")
    demo.add_argument("--dtype", choices=DTYPES, default="float32")
    recipes = sub.add_parser("recipes", help="list the recipe presets")
    recipes.add_argument("--json", action="store_true", help="each preset's full recipe as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qcompile.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
