"""`qcompile eval`: a quantized pipeline against its float reference, with report files.

For each prompt both pipelines run with the same seed. Three measures:
- transformer SQNR per prompt: every call the float pipeline makes to its denoiser is
  recorded, and the quantized denoiser is run on the same inputs (so the number is the
  model's error, not the drift of two diverging trajectories);
- per-layer SQNR: on the first prompt's middle denoising call, each float linear's
  input is fed to the quantized layer of the same name, in isolation (each layer's own
  error, not what it inherits);
- final images: PSNR and SSIM of the quantized pipeline's image against the float one.
Files written into `out`: `report.json`, `grid.png` (a row per prompt: float |
quantized) and `layers.png` (per-layer SQNR bars, matplotlib).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils import _pytree as pytree

from qcompile.atomic import atomic_directory
from qcompile.commands import (
    CALIBRATION_COUNT,
    check_count,
    component_of,
    load_pipeline,
    pipeline_kwargs,
)
from qcompile.errors import QCompileError
from qcompile.metrics import psnr, sqnr, ssim
from qcompile.modules import QuantizedLinear
from qcompile.prompts import CALIBRATION_PROMPTS, load_prompts
from qcompile.runtime import runtime_of

DEFAULT_PROMPTS = 4


def evaluate(
    source: str,
    reference: str,
    out: str | Path,
    *,
    prompts: str | Path | None = None,
    num_prompts: int | None = None,
    steps: int = 20,
    size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure `source` (a quantized pipeline folder) against `reference`; write the
    report files into `out` and return the report."""
    check_count(num_prompts, "--num-prompts")
    if prompts:
        texts = load_prompts(prompts)[:num_prompts]
    else:  # held out: `qcompile quantize` calibrates on the prompts before these
        held_out = CALIBRATION_PROMPTS[CALIBRATION_COUNT:]
        texts = list(held_out[: num_prompts or DEFAULT_PROMPTS])
    quantized_pipe = load_pipeline(source, dtype, device)
    float_pipe = load_pipeline(reference, dtype, device)
    name, quantized = component_of(quantized_pipe, None)
    _, float_model = component_of(float_pipe, name)
    if runtime_of(quantized) is None:
        raise QCompileError(f"{source}: its {name} is not quantized by qcompile")
    if runtime_of(float_model) is not None:
        raise QCompileError(f"--reference {reference}: its {name} is quantized; pass the float one")
    call = pipeline_kwargs(size, steps)
    rows, grid, layers = [], [], None
    for index, text in enumerate(texts):
        calls = _record_calls(float_model)
        with torch.no_grad():
            want = float_pipe(
                prompt=text, generator=_generator(seed), output_type="pt", **call
            ).images
        calls.remove()
        if index == 0:
            middle = calls.records[len(calls.records) // 2]
            layers = layer_sqnr(float_model, quantized, middle)
        with torch.no_grad():
            got = quantized_pipe(
                prompt=text, generator=_generator(seed), output_type="pt", **call
            ).images
            errors = [_output_sqnr(quantized, args, kwargs, y) for args, kwargs, y in calls.records]
        rows.append(
            {
                "prompt": text,
                "seed": seed,
                "transformer_sqnr_db": _mean_db(errors),
                "image_psnr_db": psnr(want.float(), got.float()),
                "image_ssim": ssim(want.float(), got.float()),
            }
        )
        grid.append((want[0], got[0]))
    report = {
        "quantized": source,
        "reference": reference,
        "component": name,
        "steps": steps,
        "size": size,
        "prompts": rows,
        "layers": layers,
        "summary": {
            "transformer_sqnr_db": _mean_db([r["transformer_sqnr_db"] for r in rows]),
            "image_psnr_db": _mean_db([r["image_psnr_db"] for r in rows]),
            "image_ssim": sum(r["image_ssim"] for r in rows) / len(rows),
            "worst_layer": min(layers, key=lambda r: r["sqnr_db"]) if layers else None,
        },
    }
    write_report(report, grid, out)
    return report


def write_report(report: dict[str, Any], grid: list, out: str | Path) -> None:
    """report.json, grid.png and layers.png into `out`, replacing an earlier report
    atomically (other files in the folder are kept)."""
    names = ("report.json", "grid.png", "layers.png")
    with atomic_directory(out, owns=lambda name: name in names) as staging:
        _image_grid(grid).save(staging / "grid.png")
        _layer_chart(report["layers"] or [], staging / "layers.png")
        text = json.dumps(_finite(report), indent=2, allow_nan=False)
        (staging / "report.json").write_text(text + "\n")
    report["files"] = {name: str(Path(out).absolute() / name) for name in names}


class _record_calls:
    """Every call of `module`: (args, kwargs, first output), detached."""

    def __init__(self, module: nn.Module) -> None:
        self.records: list[tuple[tuple, dict, torch.Tensor]] = []
        self._hook = module.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs, output) -> None:
        first = output[0] if isinstance(output, (tuple, list)) else output.sample
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, dict(kwargs)))
        self.records.append((args, kwargs, first.detach().clone()))

    def remove(self) -> None:
        self._hook.remove()


def _output_sqnr(model: nn.Module, args: tuple, kwargs: dict, want: torch.Tensor) -> float:
    kwargs = {**kwargs, "return_dict": False}
    return sqnr(want, model(*args, **kwargs)[0])


def layer_sqnr(float_model: nn.Module, quantized: nn.Module, record) -> list[dict[str, Any]]:
    """Each quantized linear's output SQNR on its float twin's input, in isolation."""
    args, kwargs, _ = record
    rows: list[dict[str, Any]] = []
    hooks = []
    for fqn, module in float_model.named_modules():
        try:
            twin = quantized.get_submodule(fqn)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear) or not isinstance(twin, QuantizedLinear):
            continue

        def compare(module, inputs, output, fqn=fqn, twin=twin):
            rows.append({"layer": fqn, "sqnr_db": sqnr(output, twin(inputs[0]))})

        hooks.append(module.register_forward_hook(compare))
    try:
        with torch.no_grad():
            float_model(*args, **{**kwargs, "return_dict": False})
    finally:
        for hook in hooks:
            hook.remove()
    return rows


GRID_HEADER = 16  # pixels above the columns, for their labels


def _image_grid(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Image.Image:
    """One row per prompt: the float image, then the quantized one, under a header
    naming the columns."""
    tiles = [[_to_pil(a), _to_pil(b)] for a, b in pairs]
    w, h = tiles[0][0].size
    grid = Image.new("RGB", (2 * w, GRID_HEADER + h * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(("float", "quantized")):
        draw.text((column * w + 2, 2), label, fill="black")
    for row, (a, b) in enumerate(tiles):
        grid.paste(a, (0, GRID_HEADER + row * h))
        grid.paste(b, (w, GRID_HEADER + row * h))
    return grid


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def _layer_chart(layers: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    height = max(3.0, 0.18 * len(layers) + 1.0)
    fig, ax = plt.subplots(figsize=(9, height))
    values = [min(r["sqnr_db"], 200.0) for r in layers]
    ax.barh(range(len(layers)), values, color="#4c72b0")
    ax.set_yticks(range(len(layers)), [r["layer"] for r in layers], fontsize=6)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlabel("output SQNR vs float (dB), each layer on the float input")
    ax.set_title("per-layer quantization error")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_db(values: list[float]) -> float:
    """The dB of the mean noise-to-signal ratio (an average that an infinite SQNR,
    bitwise equality, does not dominate)."""
    finite = [10 ** (-v / 10) for v in values]
    mean = sum(finite) / len(finite)
    return math.inf if mean == 0 else -10 * math.log10(mean)


def _finite(value: Any) -> Any:
    """`value` for strict JSON: an infinite SQNR (bitwise equal) becomes "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
