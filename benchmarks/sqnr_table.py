"""SQNR and size of every weight-only preset on the tiny Flux, SD3 and UNet models (CPU).

    python benchmarks/sqnr_table.py [--json results.json]

Whole-model output SQNR vs the float model on held-out inputs (batch 1, other
resolution and prompt length than the capture), the quantized linears' share, the
model's weight bytes before and after, quantize time, and which runtime path ran.
Static-activation presets are calibrated on 4 batch-2 inputs of other seeds.
"""

from __future__ import annotations

import argparse
import time

import torch

import qcompile
from qcompile.tiny import HELD_OUT

RECIPES = [
    "int8-wo",
    "fp8-wo",
    "int4-wo",
    "int4-wo-g128",
    "int8-w8a8",
    "fp8-w8a8",
    "int8-dynamic",
    "fp8-dynamic",
]
CALIBRATION_SEEDS = range(10, 14)  # static presets: 4 batch-2 inputs, other seeds


def measure() -> list[dict]:
    rows = []
    for family, (build, held_out) in HELD_OUT.items():
        for recipe in RECIPES:
            model = build()
            inputs = held_out(model)
            with torch.no_grad():
                reference = model(**inputs, return_dict=False)[0]
                before = qcompile.weight_bytes(model)
                calibration = None
                if qcompile.get_recipe(recipe).needs_calibration:
                    calibration = [held_out(model, batch=2, seed=s) for s in CALIBRATION_SEEDS]
                start = time.perf_counter()
                qcompile.quantize(model, recipe, calibration=calibration)
                seconds = time.perf_counter() - start
                out = model(**inputs, return_dict=False)[0]
            state = model.qcompile_state
            rows.append(
                dict(
                    family=family,
                    recipe=recipe,
                    sqnr_db=round(qcompile.sqnr(reference, out), 2),
                    linears=f"{len(state.schemes)}/{state.linears_total}",
                    bytes_float=before,
                    bytes_quantized=qcompile.weight_bytes(model),
                    quantize_s=round(seconds, 2),
                    path=state.runtime.last_path,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the rows and versions here")
    args = parser.parse_args()
    rows = measure()
    header = (
        f"{'family':6} {'recipe':13} {'SQNR dB':>8} {'linears':>8} {'bytes':>22} {'q s':>5} path"
    )
    print(header)
    for r in rows:
        size = f"{r['bytes_float']:,}→{r['bytes_quantized']:,}"
        print(
            f"{r['family']:6} {r['recipe']:13} {r['sqnr_db']:8.2f} {r['linears']:>8} "
            f"{size:>22} {r['quantize_s']:5.1f} {r['path']}"
        )
    if args.json:
        from results import write_results

        write_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
