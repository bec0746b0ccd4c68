"""Peak RSS of `qcompile quantize` on a pipeline far larger than the tiny ones (CPU).

    python -m benchmarks.cli_quantize_memory [--layers 8] [--out benchmarks/results/...]

Builds the tiny offline FluxPipeline with its transformer replaced by a Flux-shaped one
of hidden 512 (float32, `--layers` single blocks and half as many double blocks; 270
MiB at 8), saves it, then in a fresh process each:
    load-float         DiffusionPipeline.from_pretrained only (the baseline)
    cli-int8-wo        `qcompile quantize --recipe int8-wo`: weights stream (each layer
                       quantized as it is read), then the pipeline is saved
    in-memory-int8-wo  from_pretrained in float, then qcompile.quantize, then save: what
                       a calibrated recipe has to do (the float model is whole)
Per mode: peak RSS (VmHWM: anonymous and file-backed pages, imports included;
safetensors mmaps the checkpoint, so every page read counts), the RSS after imports,
and the peak growth of anonymous memory after imports (RssAnon sampled every 0.5 ms:
what the load, quantization, capture and save allocate), each against the float
transformer checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    mode, source, out = sys.argv[1:4]

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
    if mode == "cli-int8-wo":
        from qcompile.cli import main
        main(["quantize", source, "--recipe", "int8-wo", "--dtype", "float32", "--out", out])
    else:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
        if mode == "in-memory-int8-wo":
            qcompile.quantize(pipe.transformer, "int8-wo")
            pipe.save_pretrained(out)
    done[0] = True; thread.join()
    print(json.dumps({"mode": mode, "peak_rss_bytes": status_kib("VmHWM:") * 1024,
                      "rss_after_imports_bytes": base_rss * 1024,
                      "peak_anon_growth_bytes": (peak_anon[0] - base_anon) * 1024}))
""")


def build_pipeline(folder: Path, layers: int) -> int:
    """Save the pipeline; return the float transformer's checkpoint bytes."""
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
        num_attention_heads=8,
        joint_attention_dim=pipe.transformer.config.joint_attention_dim,
        pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
        axes_dims_rope=(16, 24, 24),
    )
    pipe.transformer = FluxTransformer2DModel(**config)
    pipe.save_pretrained(folder)
    return sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/cli_quantize_memory_cpu.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "float"
        float_bytes = build_pipeline(source, args.layers)
        for mode in ("load-float", "cli-int8-wo", "in-memory-int8-wo"):
            out = Path(tmp) / mode
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(source), str(out)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["peak_rss_vs_float_checkpoint"] = row["peak_rss_bytes"] / float_bytes
            row["anon_growth_vs_float_checkpoint"] = row["peak_anon_growth_bytes"] / float_bytes
            rows.append(row)
    payload = {"layers": args.layers, "float_checkpoint_bytes": float_bytes, "rows": rows}
    from benchmarks.results import write_results

    write_results(args.out, payload)
    print(f"float transformer checkpoint: {float_bytes / 2**20:.1f} MiB")
    print(f"{'mode':<18} {'peak RSS MiB':>12} {'after imports':>13} {'anon growth MiB':>15}")
    for row in rows:
        peak, base = row["peak_rss_bytes"] / 2**20, row["rss_after_imports_bytes"] / 2**20
        anon = row["peak_anon_growth_bytes"] / 2**20
        print(f"{row['mode']:<18} {peak:>12.1f} {base:>13.1f} {anon:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
