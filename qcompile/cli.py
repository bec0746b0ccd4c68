"""The `qcompile` command line."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a tiny offline FluxPipeline and report")
    demo.add_argument("--recipe", default="int8-wo", help="preset name (see `qcompile recipes`)")
    demo.add_argument("--out", default="qcompile-demo", help="folder for the image")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps")
    demo.add_argument("--size", type=int, default=64, help="image height and width")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    sub.add_parser("recipes", help="list the recipe presets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import diffusers

    import qcompile

    diffusers.utils.logging.set_verbosity_error()

    if args.command == "recipes":
        for name in qcompile.list_recipes():
            print(f"{name:14s} {qcompile.get_recipe(name).to_json()}")
        return 0
    from qcompile.demo import format_report, run_demo

    try:
        report = run_demo(args.recipe, args.out, args.steps, args.size, DTYPES[args.dtype])
    except qcompile.QCompileError as exc:
        print(f"qcompile demo: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
