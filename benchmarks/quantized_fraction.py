"""What each family preset quantizes: fraction of linear parameters, and model bytes.

Full-size FLUX.1-dev, SD3-medium and SDXL-base configs are built on the meta device (no
weights needed; shapes are exact), plus the tiny models the tests use. For each family
preset: linear parameters quantized / all linear parameters, what stays 16-bit, and the
checkpoint bytes of the quantized model vs bf16 (packed 4-bit data, scales, smoothing
factors and the bf16 rank-R branch counted from the layer shapes and the scheme).

    python benchmarks/quantized_fraction.py
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from benchmarks.configs import FLUX_DEV
from benchmarks.results import write_results
from qcompile import tiny
from qcompile.api import select_linears
from qcompile.recipes import resolve_recipe
from qcompile.svdquant import empty_layer

FULL = {
    "flux": lambda: FluxTransformer2DModel(**FLUX_DEV),
    "sd3": lambda: SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    ),
    "sdxl": lambda: UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
    ),
}
TINY = {"flux": tiny.tiny_flux, "sd3": tiny.tiny_sd3, "sdxl": tiny.tiny_unet}
PRESETS = ("svdq-w4a4", "svdq-w4a16", "nvfp4", "mxfp4-wo")


def measure(model: torch.nn.Module, family: str) -> dict:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear_params = sum(m.weight.numel() for m in linears.values())
    all_params = sum(p.numel() for p in model.parameters())
    rows = {}
    for base in PRESETS:
        recipe = resolve_recipe(f"{family}-{base}")
        selected = select_linears(model, recipe)
        quantized = sum(linears[n].weight.numel() for n in selected)
        packed = 0
        for name, scheme in selected.items():
            m = linears[name]
            tensors = empty_layer(scheme, m.out_features, m.in_features, torch.bfloat16)
            packed += sum(t.numel() * t.element_size() for t in tensors.values())
        bf16 = 2 * all_params
        rows[base] = {
            "linears": f"{len(selected)}/{len(linears)}",
            "fraction_linear_params": quantized / linear_params,
            "bytes_bf16": bf16,
            "bytes_quantized": bf16 - 2 * quantized + packed,
            "kept_16bit": sorted({_glob(n) for n in linears if n not in selected}),
        }
    return {"params": all_params, "linear_params": linear_params, "presets": rows}


def _glob(name: str) -> str:
    """transformer_blocks.3.attn.to_q → transformer_blocks.*.attn.to_q (for the report)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/quantized_fraction.json")
    args = parser.parse_args()
    results = {}
    for family, build in FULL.items():
        with torch.device("meta"):
            results[f"{family} (full)"] = measure(build(), family)
    for family, build in TINY.items():
        results[f"{family} (tiny)"] = measure(build(), family)
    write_results(args.out, {"models": results})
    print(f"{'model':<12} {'preset':<11} {'linears':>9} {'lin. params':>11} {'size vs bf16':>12}")
    for model, data in results.items():
        for preset, row in data["presets"].items():
            ratio = row["bytes_bf16"] / row["bytes_quantized"]
            print(
                f"{model:<12} {preset:<11} {row['linears']:>9} "
                f"{row['fraction_linear_params']:>10.2%} {ratio:>11.2f}×"
            )
    for model, data in results.items():
        print(f"{model}: kept 16-bit: {', '.join(data['presets']['svdq-w4a4']['kept_16bit'])}")


if __name__ == "__main__":
    main()
