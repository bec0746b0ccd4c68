"""Peak RSS of `qcompile quantize` on a pipeline far larger than the tiny ones (CPU).

    python -m benchmarks.cli_quantize_memory [--layers 8] [--width 512]
        [--dtype float32 bfloat16] [--modes ...] [--out benchmarks/results/...]

Builds the tiny offline FluxPipeline with its transformer replaced by a Flux-shaped one
of hidden `--width` (float32, `--layers` single blocks and half as many double blocks;
270 MiB at 8 layers of 512), saves it, then in a fresh process each:
    load-float         DiffusionPipeline.from_pretrained only (the baseline)
    cli-int8-wo        `qcompile quantize --recipe int8-wo`: weights stream (each layer
                       quantized as it is read), then the pipeline is saved
    in-memory-int8-wo  from_pretrained in float, then qcompile.quantize, then save
    cli-int8-w8a8      `qcompile quantize --recipe int8-w8a8` (2 prompts, 2 steps, 64²):
                       the float pipeline loads whole, calibrates, quantizes, saves
    cli-int8-w8a8-low-memory
                       the same with `--low-memory`: the transformer is built on meta and
                       reads each submodule's weights from the shards as it runs;
                       quantization packs one layer at a time
each at every `--dtype` the pipeline is loaded in (the checkpoint is float32: at
bfloat16 every float weight read is converted, so it is anonymous memory).
Per mode: peak RSS (VmHWM: anonymous and file-backed pages, imports included;
safetensors mmaps the checkpoint, so every page read counts), the RSS after imports,
and the peak growth of anonymous memory after imports (RssAnon sampled every 0.5 ms:
what the load, quantization, capture and save allocate), each against the float
transformer checkpoint's size and against the target: the quantized transformer plus
its largest float block in the load dtype. `--width 1536` gives blocks of Flux's
proportions at half its width, where weights outweigh the graph's fixed cost.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    mode, source, out, dtype = sys.argv[1:5]

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key))

    peak_anon, done = [0], [False]
    def sample():
        while not done[0]:
            peak_anon[0] = max(peak_anon[0], status_kib("RssAnon:"))
            time.sleep(0.0005)
    import qcompile, diffusers  # imports are not what is measured
    base_rss, base_anon = status_kib("VmRSS:"), status_kib("RssAnon:")
    thread = threading.Thread(target=sample); thread.start()
    if mode.startswith("cli-"):
        from qcompile.cli import main
        recipe = mode.split("-", 1)[1].removesuffix("-low-memory")
        run = ["--num-prompts", "2", "--steps", "2", "--size", "64", "--device", "cpu"]
        extra = ["--low-memory"] if mode.endswith("low-memory") else []
        assert main(["quantize", source, "--recipe", recipe, "--dtype", dtype, "--out", out,
                     *run, *extra]) == 0
    else:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, dtype))
        if mode == "in-memory-int8-wo":
            qcompile.quantize(pipe.transformer, "int8-wo")
            pipe.save_pretrained(out)
    done[0] = True; thread.join()
    print(json.dumps({"mode": mode, "peak_rss_bytes": status_kib("VmHWM:") * 1024,
                      "rss_after_imports_bytes": base_rss * 1024,
                      "peak_anon_growth_bytes": (peak_anon[0] - base_anon) * 1024}))
""")


MODES = (
    "load-float",
    "cli-int8-wo",
    "in-memory-int8-wo",
    "cli-int8-w8a8",
    "cli-int8-w8a8-low-memory",
)


def _weights_bytes(folder: Path) -> int | None:
    """The saved quantized transformer's safetensors bytes (None: nothing was saved)."""
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) or None


def build_pipeline(folder: Path, layers: int, width: int = 512) -> tuple[int, int]:
    """Save the pipeline; return the float transformer's checkpoint bytes and its largest
    block's (float32 parameters of one `transformer_blocks.N` or single block)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from qcompile.tiny import tiny_flux_pipeline

    torch.manual_seed(0)
    pipe = tiny_flux_pipeline()
    config = dict(
        patch_size=1,
        in_channels=pipe.transformer.config.in_channels,
        num_layers=layers // 2,
        num_single_layers=layers,
        attention_head_dim=64,
        num_attention_heads=width // 64,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim,
        pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
        axes_dims_rope=(16, 24, 24),
    )
    pipe.transformer = FluxTransformer2DModel(**config)
    pipe.save_pretrained(folder)
    blocks = Counter()
    for name, tensor in pipe.transformer.state_dict().items():
        parts = name.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            blocks[tuple(parts[:2])] += tensor.nbytes
    files = (folder / "transformer").glob("*.safetensors")
    return sum(f.stat().st_size for f in files), max(blocks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512, help="hidden size, a multiple of 64")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", default="benchmarks/results/cli_quantize_memory_cpu.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "float"
        float_bytes, block_bytes = build_pipeline(source, args.layers, args.width)
        for dtype, mode in itertools.product(args.dtype, args.modes):
            out = Path(tmp) / f"{mode}-{dtype}"
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(source), str(out), dtype],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
            row = {"dtype": dtype, **json.loads(done.stdout.strip().splitlines()[-1])}
            row["quantized_transformer_bytes"] = _weights_bytes(out / "transformer")
            row["peak_rss_vs_float_checkpoint"] = row["peak_rss_bytes"] / float_bytes
            row["anon_growth_vs_float_checkpoint"] = row["peak_anon_growth_bytes"] / float_bytes
            if row["quantized_transformer_bytes"]:
                quantized = row["quantized_transformer_bytes"]
                row["anon_growth_vs_quantized"] = row["peak_anon_growth_bytes"] / quantized
                # the target: the quantized model plus one float block, in the load dtype
                block = block_bytes * (2 if dtype == "bfloat16" else 4) // 4
                target = quantized + block
                row["anon_growth_vs_quantized_plus_block"] = row["peak_anon_growth_bytes"] / target
            rows.append(row)
    payload = {
        "layers": args.layers,
        "width": args.width,
        "float_checkpoint_bytes": float_bytes,
        "largest_block_float32_bytes": block_bytes,
        "rows": rows,
    }
    from benchmarks.results import write_results

    write_results(args.out, payload)
    print(
        f"float transformer checkpoint: {float_bytes / 2**20:.1f} MiB, largest block "
        f"{block_bytes / 2**20:.1f} MiB (float32)"
    )
    header = f"{'mode':<26} {'dtype':<9} {'peak RSS':>9} {'imports':>8} {'anon growth':>11}"
    print(header + f" {'quantized':>9}  (MiB)  anon / (quantized + block)")
    for row in rows:
        peak, base = row["peak_rss_bytes"] / 2**20, row["rss_after_imports_bytes"] / 2**20
        anon = row["peak_anon_growth_bytes"] / 2**20
        quantized = row["quantized_transformer_bytes"]
        quantized = f"{quantized / 2**20:.1f}" if quantized else "-"
        ratio = row.get("anon_growth_vs_quantized_plus_block")
        print(
            f"{row['mode']:<26} {row['dtype']:<9} {peak:>9.1f} {base:>8.1f} {anon:>11.1f}"
            f" {quantized:>9}  {'-' if ratio is None else f'{ratio:.2f}'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
