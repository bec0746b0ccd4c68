"""Checkpoint sizes vs float and save/reload times, per preset and tiny family (CPU).

    python benchmarks/checkpoint_table.py [--json results.json]

Float: diffusers' own save_pretrained of the float model. Quantized: qcompile's folder
(safetensors + weightless .pt2 + config). Reload: from_pretrained in this process,
program re-attached, first call included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import qcompile
from qcompile.checkpoint import WEIGHTS_NAME
from qcompile.integrations.diffusers_config import PROGRAM_NAME
from qcompile.tiny import HELD_OUT

RECIPES = ["int8-wo", "fp8-wo", "int4-wo", "int4-wo-g128"]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def measure() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (build, held_out) in HELD_OUT.items():
            float_dir = Path(tmp) / f"{family}-float"
            build().save_pretrained(float_dir)
            for recipe in RECIPES:
                model = qcompile.quantize(build(), recipe)
                inputs = held_out(model)
                folder = Path(tmp) / f"{family}-{recipe}"
                start = time.perf_counter()
                model.save_pretrained(folder)
                save_s = time.perf_counter() - start
                start = time.perf_counter()
                reloaded = type(model).from_pretrained(folder)
                with torch.no_grad():
                    reloaded(**inputs)
                reload_s = time.perf_counter() - start
                rows.append(
                    dict(
                        family=family,
                        recipe=recipe,
                        float_weights_bytes=(float_dir / WEIGHTS_NAME).stat().st_size,
                        weights_bytes=(folder / WEIGHTS_NAME).stat().st_size,
                        program_bytes=(folder / PROGRAM_NAME).stat().st_size,
                        folder_bytes=_size(folder),
                        save_s=round(save_s, 2),
                        reload_s=round(reload_s, 2),
                        path=qcompile.runtime_of(reloaded).last_path,
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = measure()
    print(
        f"{'family':6} {'recipe':13} {'float w':>10} {'q weights':>10} {'ratio':>6} "
        f"{'.pt2':>9} {'save s':>7} {'reload s':>8} path"
    )
    for r in rows:
        ratio = r["float_weights_bytes"] / r["weights_bytes"]
        print(
            f"{r['family']:6} {r['recipe']:13} {r['float_weights_bytes']:10,} "
            f"{r['weights_bytes']:10,} {ratio:6.2f} {r['program_bytes']:9,} "
            f"{r['save_s']:7.2f} {r['reload_s']:8.2f} {r['path']}"
        )
    if args.json:
        from results import write_results

        write_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
