"""`qcompile demo`: quantize a tiny, fully offline FluxPipeline and report what changed.

Builds every component from configs in code (nothing is downloaded), runs the float
pipeline, quantizes the transformer, runs the pipeline again unchanged, saves the
transformer, reloads it through diffusers' from_pretrained, runs the pipeline with the
reloaded model, writes the image, and reports sizes, SQNR and time per phase.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qcompile.api import quantize
from qcompile.calibration import capture_calibration
from qcompile.metrics import sqnr, weight_bytes
from qcompile.prompts import CALIBRATION_PROMPTS
from qcompile.recipes import resolve_recipe
from qcompile.runtime import runtime_of
from qcompile.tiny import tiny_flux_pipeline

PROMPT = "a photo of an astronaut riding a horse on the moon"
CALIBRATION_PROMPT_COUNT = 4  # recipes with static scales or smoothing calibrate on these


@dataclass
class DemoReport:
    recipe: str
    dtype: str
    bytes_before: int
    bytes_after: int
    transformer_sqnr_db: float
    image_sqnr_db: float
    linears_quantized: int
    linears_total: int
    graph_calls: int
    eager_calls: int
    checkpoint_bytes: int
    reloaded_output_equal: bool
    reloaded_image_equal: bool
    reloaded_graph_calls: int
    image_path: Path
    seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - start


def run_demo(
    recipe: str = "int8-wo",
    out_dir: str | Path = "qcompile-demo",
    steps: int = 4,
    size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> DemoReport:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with _timed(seconds, "build pipeline"):
        pipe = tiny_flux_pipeline(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps)

    first_call: dict = {}

    def keep_first(module, args, kwargs, output):
        if not first_call:
            first_call.update(kwargs=kwargs, output=output[0].detach().clone())

    hook = pipe.transformer.register_forward_hook(keep_first, with_kwargs=True)
    with _timed(seconds, "float pipeline"), torch.no_grad():
        reference = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
    hook.remove()

    transformer = pipe.transformer
    bytes_before = weight_bytes(transformer)
    calibration = None
    if resolve_recipe(recipe).needs_calibration:  # static scales or smoothing
        with _timed(seconds, "calibrate"):
            calibration = capture_calibration(
                pipe,
                transformer,
                CALIBRATION_PROMPTS[:CALIBRATION_PROMPT_COUNT],
                num_inference_steps=steps,
                height=size,
                width=size,
            )
    with _timed(seconds, "quantize"):
        quantize(transformer, recipe, calibration=calibration)
    with torch.no_grad():
        quantized_out = transformer(**first_call["kwargs"])[0]
    runtime = runtime_of(transformer)
    runtime.calls.clear()
    with _timed(seconds, "quantized pipeline"), torch.no_grad():
        images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
    checkpoint = out_dir / f"flux-tiny-{recipe}-transformer"
    with _timed(seconds, "save checkpoint"):
        transformer.save_pretrained(checkpoint)
    with _timed(seconds, "reload (from_pretrained)"):
        reloaded = type(transformer).from_pretrained(checkpoint)
    with torch.no_grad():
        reloaded_out = reloaded(**first_call["kwargs"])[0]
    runtime_of(reloaded).calls.clear()
    pipe.transformer = reloaded
    with _timed(seconds, "reloaded pipeline"), torch.no_grad():
        again = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
    image_path = out_dir / f"flux-tiny-{recipe}.png"
    pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images.images))[0].save(
        image_path
    )
    state = transformer.qcompile_state
    return DemoReport(
        recipe=recipe,
        dtype=str(dtype).removeprefix("torch."),
        bytes_before=bytes_before,
        bytes_after=weight_bytes(transformer),
        transformer_sqnr_db=sqnr(first_call["output"], quantized_out),
        image_sqnr_db=sqnr(reference.images.float(), images.images.float()),
        linears_quantized=len(state.schemes),
        linears_total=state.linears_total,
        graph_calls=runtime.calls["graph"],
        eager_calls=runtime.calls["eager"],
        checkpoint_bytes=sum(f.stat().st_size for f in checkpoint.iterdir()),
        reloaded_output_equal=torch.equal(reloaded_out, quantized_out),
        reloaded_image_equal=torch.equal(again.images, images.images),
        reloaded_graph_calls=runtime_of(reloaded).calls["graph"],
        image_path=image_path,
        seconds=seconds,
    )


def format_report(report: DemoReport) -> str:
    ratio = report.bytes_before / report.bytes_after
    rows = [
        ("recipe", f"{report.recipe} ({report.dtype})"),
        ("linears quantized", f"{report.linears_quantized} of {report.linears_total}"),
        ("transformer bytes, float", f"{report.bytes_before:,}"),
        ("transformer bytes, quantized", f"{report.bytes_after:,} ({ratio:.2f}× smaller)"),
        ("transformer output SQNR vs float", f"{report.transformer_sqnr_db:.1f} dB"),
        ("image SQNR vs float pipeline", f"{report.image_sqnr_db:.1f} dB"),
        ("transformer calls graph / eager", f"{report.graph_calls} / {report.eager_calls}"),
        ("checkpoint bytes (all files)", f"{report.checkpoint_bytes:,}"),
        (
            "reloaded: output / image bitwise equal",
            f"{report.reloaded_output_equal} / {report.reloaded_image_equal}",
        ),
        ("reloaded: transformer calls on graph", str(report.reloaded_graph_calls)),
        *((f"seconds: {phase}", f"{s:.2f}") for phase, s in report.seconds.items()),
        ("image", str(report.image_path)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
