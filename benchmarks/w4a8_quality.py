"""W4A8 quality against its neighbours: the synthetic outlier model and the tiny models.

Presets compared: int8-dynamic (8-bit weights and activations), w4a8 and svdq-w4a8
(INT4 g64 weights with integer group scales, INT8 per-token activations; svdq-w4a8
adds smoothing and the rank-32 branch), svdq-w4a4 (INT4 g64 activations too) and
svdq-w4a16 (16-bit activations). Every model is quantized with `qcompile.quantize`
and run through its lowered program.

- Synthetic outlier model (`svdquant_ablation.OutlierMLP`: hidden 512, 4 MLP blocks,
  Student-t(3) weights, ×50 outlier channels entering every `up`): median per-layer
  SQNR over the `up` layers (each fed the float model's own input) and end-to-end SQNR;
  calibration 8 inputs [2, 64, 512], evaluation one held-out [1, 128, 512].
- Tiny Flux / SD3 / SDXL UNet (random init, `qcompile.tiny`): end-to-end SQNR on the
  held-out batch-1 input; calibrated presets use 4 batch-2 inputs of other seeds (as
  tests/qcompile/test_svdquant.py).

    python -m benchmarks.w4a8_quality [--out benchmarks/results/w4a8_quality_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import qcompile
from benchmarks.results import write_results
from benchmarks.svdquant_ablation import OutlierMLP, layer_inputs
from qcompile.metrics import sqnr
from qcompile.modules import QuantizedLinear
from qcompile.tiny import HELD_OUT

PRESETS = ("int8-dynamic", "w4a8", "svdq-w4a8", "svdq-w4a4", "svdq-w4a16")
CALIBRATION_SEEDS = range(10, 14)


def outlier_model() -> dict[str, dict]:
    model = OutlierMLP().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    calibration = [{"hidden_states": torch.randn(2, 64, 512, generator=gen)} for _ in range(8)]
    inputs = {"hidden_states": torch.randn(1, 128, 512, generator=gen)}
    seen, reference = layer_inputs(model, inputs, lambda m, i: m(**i))
    rows = {}
    for preset in PRESETS:
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        needs = qcompile.get_recipe(preset).needs_calibration
        qcompile.quantize(
            quantized, preset, calibration if needs else None, example_inputs=calibration[0]
        )
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = quantized(**inputs)
            layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
            ups = [float(sqnr(seen[n][1], m(seen[n][0]))) for n, m in layers.items() if "ups" in n]
        assert qcompile.runtime_of(quantized).last_path == "graph"
        rows[preset] = {
            "median_up_layer_db": statistics.median(ups),
            "end_to_end_db": float(sqnr(reference, out)),
            "quantize_s": seconds,
        }
    return rows


def tiny_models() -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for family, (build, held_out) in HELD_OUT.items():
        rows[family] = {}
        for preset in PRESETS:
            model = build()
            inputs = held_out(model)
            with torch.no_grad():
                reference = model(**inputs, return_dict=False)[0]
            calibration = None
            if qcompile.get_recipe(preset).needs_calibration:
                calibration = [held_out(model, batch=2, seed=s) for s in CALIBRATION_SEEDS]
            qcompile.quantize(model, preset, calibration)
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
            assert qcompile.runtime_of(model).last_path == "graph"
            rows[family][preset] = float(sqnr(reference, out))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/w4a8_quality_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    results = {"outlier_model": outlier_model(), "tiny_models": tiny_models()}
    results["seconds"] = time.perf_counter() - start
    write_results(args.out, results)
    print("| preset | outlier `up` layers (median) | outlier end to end | "
          + " | ".join(f"tiny {f}" for f in results["tiny_models"]) + " |")  # fmt: skip
    print("|---" * (3 + len(results["tiny_models"])) + "|")
    families = results["tiny_models"]
    for preset in PRESETS:
        row = results["outlier_model"][preset]
        tiny = " | ".join(f"{families[f][preset]:.2f}" for f in families)
        outlier = f"{row['median_up_layer_db']:.2f} | {row['end_to_end_db']:.2f}"
        print(f"| {preset} | {outlier} | {tiny} |")
    print(f"({results['seconds']:.0f} s; output SQNR vs float, dB)")


if __name__ == "__main__":
    main()
