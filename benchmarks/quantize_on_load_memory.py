"""Peak memory of quantize-on-load vs a plain float load (CPU, fresh processes).

    python benchmarks/quantize_on_load_memory.py [--layers 4] [--json out.json]

Saves a float FluxTransformer2DModel (hidden 512, MLP 2048; float32) once, then in a
fresh process each: loads it as is, and loads it with
`quantization_config=QCompileConfig("int8-wo")`. Memory is the process's anonymous
resident memory (RssAnon, sampled every 0.5 ms; safetensors' mmap'd file pages are
file-backed and excluded), as growth over the level before `from_pretrained`.
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
    import torch, qcompile, qcompile.api
    from diffusers import FluxTransformer2DModel

    def anon_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])

    folder, mode = sys.argv[1], sys.argv[2]
    base, peak, done = anon_kib(), [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon_kib())
            time.sleep(0.0005)
    # The peak while weights stream in, before the capture (whose cost follows the graph's
    # size, not the weights') starts.
    weights_peak, capture = [None], qcompile.api._capture
    def capture_after_weights(*args, **kwargs):
        weights_peak[0] = max(peak[0], anon_kib())
        return capture(*args, **kwargs)
    qcompile.api._capture = capture_after_weights
    thread = threading.Thread(target=sample); thread.start()
    start = time.perf_counter()
    kwargs = {}
    if mode == "int8-wo":
        kwargs["quantization_config"] = qcompile.QCompileConfig("int8-wo")
    model = FluxTransformer2DModel.from_pretrained(folder, **kwargs)
    seconds = time.perf_counter() - start
    done[0] = True; thread.join()
    peak[0] = max(peak[0], anon_kib())
    weights = (weights_peak[0] if weights_peak[0] is not None else peak[0]) - base
    print(json.dumps({"mode": mode, "peak_growth_bytes": (peak[0] - base) * 1024,
                      "weights_phase_peak_growth_bytes": weights * 1024,
                      "seconds": seconds, "model_bytes": qcompile.weight_bytes(model)}))
""")


def build_float_checkpoint(folder: Path, layers: int) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=layers // 2,
        num_single_layers=layers,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=256,
        pooled_projection_dim=128,
        axes_dims_rope=(16, 24, 24),
    )
    model.save_pretrained(folder)
    tensors = list(model.state_dict().values())
    return {
        "float_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "largest_tensor_bytes": max(t.numel() * t.element_size() for t in tensors),
    }


def measure(layers: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        info = build_float_checkpoint(Path(tmp), layers)
        for mode in ("float", "int8-wo"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, mode],
                capture_output=True,
                text=True,
                check=True,
            )
            info[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4, help="single blocks (double = half)")
    parser.add_argument("--json")
    args = parser.parse_args()
    info = measure(args.layers)
    mib = 1 << 20
    print(f"float checkpoint       {info['float_bytes'] / mib:8.1f} MiB")
    print(f"largest tensor         {info['largest_tensor_bytes'] / mib:8.1f} MiB")
    for mode in ("float", "int8-wo"):
        r = info[mode]
        print(
            f"load {mode:8s} peak anon growth {r['peak_growth_bytes'] / mib:8.1f} MiB "
            f"(weights phase {r['weights_phase_peak_growth_bytes'] / mib:.1f}), "
            f"model {r['model_bytes'] / mib:8.1f} MiB, {r['seconds']:.2f} s"
        )
    if args.json:
        from results import write_results

        write_results(args.json, info)


if __name__ == "__main__":
    main()
