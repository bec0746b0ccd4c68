"""SVDQuant ablation: what smoothing and the low-rank branch each buy for W4A4.

Variants (all INT4 per-group-64 weights and dynamic INT4 per-group-64 activations):
  naive           Q(x)·Q(W)ᵀ
  SVD only        Q(x)·Q(R)ᵀ + x·(up·down)ᵀ,                W = up·down + R
  smooth          Q(x/s)·Q(W·s)ᵀ                             (the paper's form)
  smooth folded   Q(x)·(Q(W·s)·diag(1/s))ᵀ                   (1/s folded back into W:
                                                              x is quantized raw)
  SVDQuant        Q(x/s)·Q(R_s)ᵀ + (x/s)·(up·down)ᵀ,        W·s = up·down + R_s
  ... folded      the SVDQuant weight with 1/s folded back, applied to Q(x)
at ranks 0/16/32/64 (rank 0: no branch). Every variant except the folded ones is
`qcompile.quantize` with a Recipe, run through the lowered program; the folded ones
use the SVDQuant layers' own dequantized weights (`QuantizedLinear.dequantized_weight`
is exactly (Q(R_s) + up·down)·diag(1/s)).

Synthetic outlier model (`OutlierMLP`): hidden 512, 4 pre-norm MLP blocks
x ← x + down(gelu(up(rmsnorm(x) · gain))), up 512→2048, down 2048→512. Weights are
Student-t (3 degrees of freedom, heavy-tailed) scaled by 1/√fan_in, biases N(0, 0.02²).
`gain` is 1 except on 1 % of the channels (5 of 512, chosen at random), where it is 50:
the activations entering every `up` carry ×50 outlier channels, as in DiT residual
streams; `down` layers read post-GELU activations without designed outliers.
Calibration: 8 inputs [2, 64, 512] ~ N(0, 1); evaluation: one held-out [1, 128, 512].
Per-layer SQNR feeds each layer the float model's own input; end-to-end SQNR compares
the model outputs. Targets (median over the `up` layers, rank 32): SVDQuant − naive
≥ 6 dB and SVDQuant − smooth folded ≥ 3 dB; end to end, SVDQuant best and naive worst.

The tiny Flux / SD3 / SDXL-UNet models are then ablated the same way with calibration
from their real (tiny) pipelines (`qcompile.capture_calibration`) and held-out inputs.
Their layers are 32–384 wide, so ranks are capped at min(N, K) / 4 (16 for 64-wide).

    python benchmarks/svdquant_ablation.py [--skip-families]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from benchmarks.results import write_results
from qcompile import tiny
from qcompile.kernels.reference.w4 import fake_quantize_4bit
from qcompile.metrics import sqnr
from qcompile.modules import QuantizedLinear
from qcompile.recipes import (
    ActivationFormat,
    ActivationMode,
    ActivationSpec,
    Granularity,
    Recipe,
    SmoothSpec,
    WeightFormat,
    WeightSpec,
)

RANKS = (0, 16, 32, 64)
# Smoothing mode → the variant's name without / with the rank-R branch.
VARIANTS = {
    "none": ("naive", "SVD only"),
    "folded": ("smooth folded", "SVDQuant folded"),
    "paper": ("smooth", "SVDQuant"),
}
TINY_RANKS = (0, 4, 8, 16)
GROUP = 64
NAIVE_MARGIN_DB = 6.0  # the targets
FOLDED_MARGIN_DB = 3.0


class OutlierMLP(nn.Module):
    """The synthetic outlier model of the module docstring."""

    def __init__(self, dim: int = 512, blocks: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        gain = torch.ones(dim)
        self.outliers = torch.randperm(dim, generator=gen)[: max(1, dim // 100)]
        gain[self.outliers] = 50.0
        self.register_buffer("gain", gain)
        self.ups = nn.ModuleList(nn.Linear(dim, 4 * dim) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(4 * dim, dim) for _ in range(blocks))
        with torch.no_grad():
            for linear in (*self.ups, *self.downs):
                linear.weight.copy_(_student_t(linear.weight.shape, 3, gen))
                linear.weight /= linear.in_features**0.5
                linear.bias.copy_(0.02 * torch.randn(linear.bias.shape, generator=gen))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        for up, down in zip(self.ups, self.downs, strict=True):
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
            x = x + down(F.gelu(up(normed)))
        return x


def _student_t(shape: torch.Size, dof: int, gen: torch.Generator) -> torch.Tensor:
    normal = torch.randn(shape, generator=gen)
    chi2 = torch.randn((dof, *shape), generator=gen).pow(2).sum(0)
    return normal / (chi2 / dof).sqrt()


def w4a4(name: str, rank: int, smooth: bool) -> Recipe:
    return Recipe(
        name,
        WeightSpec(WeightFormat.INT4, Granularity.PER_GROUP, GROUP),
        ActivationSpec(ActivationMode.DYNAMIC, ActivationFormat.INT4),
        smooth=SmoothSpec() if smooth else None,
        rank=rank,
    )


class FoldedLinear(nn.Module):
    """Q(x)·W_effᵀ + b with W_eff = the SVDQuant layer's weight, 1/s folded back in."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.weight = layer.dequantized_weight()
        self.bias = layer.bias
        self.group = layer.scheme.weight.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize_4bit(x, "int4", self.group)
        return F.linear(xq, self.weight, None if self.bias is None else self.bias.float()).to(
            x.dtype
        )


def layer_inputs(model: nn.Module, inputs: dict, call) -> dict[str, torch.Tensor]:
    """Each nn.Linear's input (and output) during one float call, by FQN."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, (args[0], out))  # first call of the layer

        return hook

    hooks = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        reference = call(model, inputs)
    for hook in hooks:
        hook.remove()
    return seen, reference


def ablate(float_model, calibration, inputs, call, ranks, focus=None) -> dict:
    """Quantize copies of `float_model` with every variant; per-layer and e2e SQNR."""
    seen, reference = layer_inputs(float_model, inputs, call)
    rows = {}
    for smooth in (False, True):
        for rank in ranks:
            model = copy.deepcopy(float_model)
            start = time.perf_counter()
            qcompile.quantize(model, w4a4(f"r{rank}", rank, smooth), calibration)
            seconds = time.perf_counter() - start
            layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
            with torch.no_grad():
                out = call(model, inputs)
            assert qcompile.runtime_of(model).last_path == "graph"
            rows[(VARIANTS["paper" if smooth else "none"][rank > 0], rank)] = _score(
                layers, seen, reference, out, focus, seconds
            )
            if smooth:  # the same layers with 1/s folded back into the weights
                runtime = qcompile.runtime_of(model)
                for fqn, layer in layers.items():
                    parent, _, child = fqn.rpartition(".")
                    setattr(model.get_submodule(parent), child, FoldedLinear(layer))
                folded = {n: model.get_submodule(n) for n in layers}
                with torch.no_grad():
                    out = call(runtime.eager, inputs)
                rows[(VARIANTS["folded"][rank > 0], rank)] = _score(
                    folded, seen, reference, out, focus, None
                )
    return rows


def _score(layers, seen, reference, out, focus, seconds) -> dict:
    per_layer = {}
    with torch.no_grad():
        for fqn, layer in layers.items():
            x, y = seen[fqn]
            per_layer[fqn] = float(sqnr(y, layer(x)))
    chosen = [v for n, v in per_layer.items() if focus is None or focus(n)]
    return {
        "end_to_end_db": float(sqnr(reference, out)),
        "median_layer_db": statistics.median(chosen),
        "per_layer_db": per_layer,
        "quantize_s": seconds,
    }


def synthetic() -> dict:
    model = OutlierMLP().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    calibration = [{"hidden_states": torch.randn(2, 64, 512, generator=gen)} for _ in range(8)]
    inputs = {"hidden_states": torch.randn(1, 128, 512, generator=gen)}
    rows = ablate(model, calibration, inputs, lambda m, i: m(**i), RANKS, lambda n: "ups" in n)
    return rows


def family(name: str) -> dict:
    build_pipe, module_attr, kwargs = {
        "flux": (tiny.tiny_flux_pipeline, "transformer", {}),
        "sd3": (tiny.tiny_sd3_pipeline, "transformer", {}),
        "unet": (tiny.tiny_sdxl_pipeline, "unet", {}),
    }[name]
    pipe = build_pipe()
    module = getattr(pipe, module_attr)
    calibration = qcompile.capture_calibration(
        pipe,
        module,
        ["a red cube on a table", "a photo of a dog in snow"],
        num_inference_steps=4,
        height=32,
        width=32,
        **kwargs,
    )
    _, make_inputs = tiny.HELD_OUT[name]
    inputs = make_inputs(module, 1)

    def call(model, inputs):
        return model(**inputs, return_dict=False)[0]

    return ablate(module, calibration, inputs, call, TINY_RANKS)


def table(title: str, rows: dict, ranks) -> str:
    """One line per smoothing mode, one column per rank (r0: no branch)."""
    lines = [title, f"{'smoothing':<16}" + "".join(f"{'r' + str(r):>15}" for r in ranks)]
    for mode, names in VARIANTS.items():
        cells = []
        for r in ranks:
            row = rows[(names[r > 0], r)]
            cells.append(f"{row['median_layer_db']:6.2f}/{row['end_to_end_db']:6.2f}")
        lines.append(f"{mode:<16}" + "".join(f"{c:>15}" for c in cells))
    lines.append(
        "cells: median per-layer SQNR / end-to-end SQNR, dB. none: r0 naive, r>0 SVD only; "
        "paper: r0 smooth only, r>0 SVDQuant; folded: 1/s folded back into W"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/svdquant_ablation_cpu.json")
    parser.add_argument("--skip-families", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"synthetic": synthetic()}
    if not args.skip_families:
        for name in ("flux", "sd3", "unet"):
            results[name] = family(name)
    syn = results["synthetic"]
    full, naive = syn[("SVDQuant", 32)], syn[("naive", 0)]
    folded = syn[("SVDQuant folded", 32)]
    checks = {
        "layers: SVDQuant - naive (dB)": full["median_layer_db"] - naive["median_layer_db"],
        "layers: SVDQuant - folded (dB)": full["median_layer_db"] - folded["median_layer_db"],
        "e2e: SVDQuant r32 best": all(
            full["end_to_end_db"] >= syn[(v, r)]["end_to_end_db"]
            for v, r in syn
            if r in (0, 32) and (v, r) != ("SVDQuant", 32)
        ),
        "e2e: naive worst": all(
            naive["end_to_end_db"] <= syn[(v, r)]["end_to_end_db"] for v, r in syn if r in (0, 32)
        ),
    }
    write_results(
        args.out,
        {
            "checks": checks,
            "targets_db": {"naive": NAIVE_MARGIN_DB, "folded": FOLDED_MARGIN_DB},
            "results": {
                model: {f"{v} r{r}": row for (v, r), row in rows.items()}
                for model, rows in results.items()
            },
        },
    )
    print(
        table("synthetic outlier model (median over the `up` layers fed by outliers)", syn, RANKS)
    )
    for name in ("flux", "sd3", "unet"):
        if name in results:
            print(
                table(f"tiny {name} (median over all quantized layers)", results[name], TINY_RANKS)
            )
    for check, value in checks.items():
        print(f"{check}: {value if isinstance(value, bool) else round(value, 2)}")


if __name__ == "__main__":
    main()
