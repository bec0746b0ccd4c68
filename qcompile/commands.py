"""`qcompile quantize` and `qcompile bench`: a pipeline folder in, a quantized one out.

`quantize` loads a diffusers pipeline (a local folder, or a Hub id when the Hub is
reachable), captures calibration data when the recipe needs it, quantizes one
component and saves the whole pipeline atomically: `DiffusionPipeline.from_pretrained`
of the result (after `import qcompile`) gives the quantized pipeline back. `bench`
times full pipeline calls of a saved pipeline, and of a reference one in the same run.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qcompile.api import quantize
from qcompile.atomic import atomic_directory
from qcompile.calibration import capture_calibration
from qcompile.errors import CheckpointError, QCompileError
from qcompile.metrics import weight_bytes
from qcompile.prompts import CALIBRATION_PROMPTS, load_prompts
from qcompile.recipes import resolve_recipe
from qcompile.runtime import runtime_of

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "unet")
# Calibrating without --low-memory holds the float denoiser whole, and by the end the
# quantized one besides (about half its size at int8): that many times its float bytes.
WHOLE_MODEL_FACTOR = 1.5
# `qcompile quantize` calibrates on the first 64 built-in prompts; `qcompile eval`
# defaults to the ones after them, which calibration never saw.
CALIBRATION_COUNT = 64


def load_pipeline(
    source: str,
    dtype: torch.dtype,
    device: str | None = None,
    quantize: dict | None = None,
    components: dict | None = None,
):
    """A diffusers pipeline from a folder (model_index.json) or a Hub id; `quantize`
    ({component: recipe}) quantizes those components while their weights load;
    `components` are given already built (and placed: they are not moved)."""
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from qcompile.integrations.diffusers_config import QCompileConfig

    kwargs = {}
    if quantize:
        mapping = {name: QCompileConfig(recipe) for name, recipe in quantize.items()}
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
    path = check_source(source)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, dtype=dtype, **kwargs, **(components or {})
        )
    except (OSError, ValueError) as exc:
        where = "the folder" if path.exists() else "the Hub (offline, or a wrong id?)"
        raise QCompileError(f"could not load the pipeline {source!r} from {where}: {exc}") from exc
    if device and not components:
        return pipe.to(device)
    for name, component in pipe.components.items():  # the given ones stay where they are
        if device and isinstance(component, torch.nn.Module) and name not in components:
            component.to(device)
    return pipe


def load_streamed_denoiser(
    source: str, component: str | None, dtype: torch.dtype, device: str | None
) -> dict[str, torch.nn.Module]:
    """{name: the pipeline's denoiser}, built on the meta device, its weights read from
    the folder's shards one submodule at a time as it runs (see `qcompile.offload`)."""
    import diffusers

    from qcompile.offload import streamed_model

    if not (Path(source) / "model_index.json").is_file():
        raise QCompileError(
            f"--low-memory reads the weights from a local pipeline folder; {source} is not "
            "one (download the pipeline first, e.g. `hf download <id> --local-dir DIR`)"
        )
    name = denoiser_name(source, component)
    _, class_name = diffusers.DiffusionPipeline.load_config(source)[name]
    folder = Path(source) / name
    return {name: streamed_model(getattr(diffusers, class_name), folder, dtype, device or "cpu")}


def warn_if_too_large(source: str, name: str, dtype: torch.dtype, device: str | None) -> None:
    """Before a calibrated recipe loads the float denoiser whole: warn when it may not
    fit the memory left on `device`, and name --low-memory (measured from the shards'
    headers; a Hub id, or a folder without safetensors, is not checked)."""
    from qcompile.offload import ShardWeights

    try:
        need = ShardWeights(Path(source) / name).loaded_bytes(dtype) * WHOLE_MODEL_FACTOR
    except (CheckpointError, OSError):
        return
    where = torch.device(device or "cpu")
    if where.type == "cuda":
        free = torch.cuda.mem_get_info(where)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need > free:
        logger.warning(
            "calibrating the float %s whole needs about %.1f GiB (%s, with the quantized "
            "copy) and %.1f GiB is free on %s: pass --low-memory to stream its weights from "
            "the shards instead",
            name,
            need / 2**30,
            str(dtype).removeprefix("torch."),
            free / 2**30,
            where,
        )


def check_source(source: str) -> Path:
    """`source` as a path; an existing folder must be a diffusers pipeline folder."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise QCompileError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the "
            "folder `save_pretrained` wrote, or a Hub id such as black-forest-labs/FLUX.1-dev"
        )
    return path


def denoiser_name(source: str, name: str | None) -> str:
    """The component to quantize, read from the pipeline's model_index.json."""
    from diffusers import DiffusionPipeline

    check_source(source)
    if name:
        return name
    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as exc:
        raise QCompileError(f"could not read the pipeline index of {source!r}: {exc}") from exc
    for candidate in COMPONENTS:
        if candidate in index:
            return candidate
    raise QCompileError(f"{source} has no transformer or unet component; pass --component")


def component_of(pipe, name: str | None) -> tuple[str, torch.nn.Module]:
    """The pipeline's denoiser: `name`, or its transformer / unet."""
    names = [name] if name else [n for n in COMPONENTS if getattr(pipe, n, None) is not None]
    module = getattr(pipe, names[0], None) if names else None
    if module is None:
        present = sorted(k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module))
        raise QCompileError(
            f"{type(pipe).__name__} has no component {name or 'transformer or unet'!r}; "
            f"its model components are {present}"
        )
    return names[0], module


def pipeline_kwargs(size: int | None, steps: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    if size:
        kwargs.update(height=size, width=size)
    return kwargs


@contextmanager
def phase(bar: tqdm, name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Time one phase; the bar shows it on a terminal, and where there is no terminal
    (output piped or logged, where tqdm draws nothing) a line each at its start and end."""
    bar.set_description(f"qcompile: {name}")
    if bar.disable:
        tqdm.write(f"qcompile: {name} ...", file=sys.stderr)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    if bar.disable:
        tqdm.write(f"qcompile: {name} done in {seconds[name]:.1f} s", file=sys.stderr)
    bar.update()


def default_out(source: str, recipe: str) -> str:
    """`<model>-<recipe>` beside a local model folder (`.` is named by what it resolves
    to), or in the current folder for a Hub id."""
    path = Path(source)
    if path.exists():
        path = path.resolve()
        return str(path.parent / f"{path.name}-{recipe}")
    return f"{source.rstrip('/').split('/')[-1]}-{recipe}"


def check_out(source: str, out: str | Path, recipe: str) -> Path:
    """Refuse an output folder whose replacement would lose data: the model itself, a
    folder holding it or the current folder, or one with files that are not a saved
    pipeline (a pipeline folder's extra files are kept)."""
    target = Path(out).resolve()
    src = Path(source).resolve() if Path(source).exists() else None
    if src is not None and (target == src or target in src.parents):
        raise QCompileError(
            f"--out {out} is the model folder {source} (or holds it): the quantized "
            "pipeline replaces the output folder whole; pass a new folder, e.g. "
            f"--out {default_out(source, recipe)}"
        )
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise QCompileError(
            f"--out {out} is the current folder (or holds it): the quantized pipeline "
            f"replaces the output folder whole; pass a new folder, e.g. --out ./{recipe}"
        )
    if target.exists() and not target.is_dir():
        raise QCompileError(f"--out {out} is a file; pass a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise QCompileError(
            f"--out {out} already holds files and is not a saved pipeline (no "
            "model_index.json); pass a new or empty folder, so that nothing in it is replaced"
        )
    return target


def _pipeline_owned(target: Path) -> set[str]:
    """What a pipeline save owns in an earlier save at `target`: its index, its README
    and the components that index names. The user's other files are kept."""
    owned = {"model_index.json", "README.md"}
    try:
        index = json.loads((target / "model_index.json").read_text())
    except (OSError, ValueError):
        return owned
    return owned | {k for k, v in index.items() if isinstance(v, list) and not k.startswith("_")}


PIPELINE_README = """# A qcompile-quantized diffusers pipeline

Its `{component}` was quantized by [qcompile](https://pypi.org/project/qcompile/) with
the `{recipe}` recipe. Load it after `import qcompile` (without it diffusers stops with
`Unknown quantization type, got qcompile`):

```python
import qcompile  # registers the quantizer with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{name}")
```
"""


def quantize_pipeline(
    source: str,
    recipe: str,
    out: str | Path,
    *,
    component: str | None = None,
    prompts: str | Path | None = None,
    num_prompts: int | None = None,
    steps: int = 20,
    size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    low_memory: bool = False,
) -> dict[str, Any]:
    """Load, calibrate if needed, quantize one component, save atomically; a summary.

    `low_memory`: a calibrated recipe's denoiser is built on the meta device and reads
    each submodule's float weights from the shards as it runs (accelerate hooks), and
    quantization packs them one layer at a time: the float denoiser is never whole in
    memory. Slower (every call re-reads the weights). Recipes without calibration always
    stream.
    """
    recipe_ = resolve_recipe(recipe)  # an unknown name fails before anything loads
    target = check_out(source, out, recipe_.name)
    texts = load_prompts(prompts) if prompts else list(CALIBRATION_PROMPTS[:CALIBRATION_COUNT])
    texts = texts[: check_count(num_prompts, "--num-prompts")]
    seconds: dict[str, float] = {}
    # Without calibration the weights stream: each layer is quantized as it is read
    # (quantize-on-load), so the float model is never whole in memory. Calibration runs
    # the float pipeline, so that path loads it, calibrates, then quantizes.
    stream = not recipe_.needs_calibration
    with tqdm(total=3 if stream else 4, unit="phase", disable=None) as bar:
        if stream:
            name = denoiser_name(source, component)
            with phase(bar, "load and quantize", seconds):
                pipe = load_pipeline(source, dtype, device, quantize={name: recipe_.name})
                name, module = component_of(pipe, name)
            calibration = None
        else:
            with phase(bar, "load", seconds):
                given = {}
                if low_memory:
                    given = load_streamed_denoiser(source, component, dtype, device)
                elif Path(source).is_dir():
                    warn_if_too_large(source, denoiser_name(source, component), dtype, device)
                pipe = load_pipeline(source, dtype, device, components=given)
                name, module = component_of(pipe, component or next(iter(given), None))
            with phase(bar, "calibrate", seconds):
                kwargs = pipeline_kwargs(size, steps)
                steps_ = kwargs.pop("num_inference_steps")
                calibration = capture_calibration(
                    pipe, module, texts, num_inference_steps=steps_, **kwargs
                )
            with phase(bar, "quantize", seconds):
                quantize(module, recipe_, calibration=calibration)
        owned = _pipeline_owned(target)
        with phase(bar, "save", seconds), atomic_directory(target, owned.__contains__) as staging:
            pipe.save_pretrained(staging)
            readme = PIPELINE_README.format(component=name, recipe=recipe_.name, name=target.name)
            (staging / "README.md").write_text(readme)
    state = module.qcompile_state
    return {
        "source": source,
        "out": str(target),
        "component": name,
        "recipe": recipe_.name,
        "calibration_prompts": len(texts) if calibration is not None else 0,
        "linears_quantized": len(state.schemes),
        "linears_total": state.linears_total,
        "bytes_before": float_bytes(module),
        "bytes_after": weight_bytes(module),
        "streamed": stream or low_memory,
        "seconds": seconds,
    }


def check_count(count: int | None, what: str) -> int | None:
    """A prompt count: None means all, anything else must be at least 1."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise QCompileError(f"{what} must be at least 1, got {count!r} (leave it out for all)")
    return count


def float_bytes(module: torch.nn.Module) -> int:
    """The bytes `module` would hold unquantized: each quantized linear as its float
    weight [N, K] in the model's dtype, everything else as stored."""
    from qcompile.modules import QuantizedLinear

    total = weight_bytes(module)
    size = torch.empty((), dtype=module.dtype).element_size()
    for layer in module.modules():
        if isinstance(layer, QuantizedLinear):
            quantized = sum(t.numel() * t.element_size() for t in layer.quantized_tensors.values())
            total += layer.in_features * layer.out_features * size - quantized
    return total


def bench_pipeline(
    source: str,
    *,
    reference: str | None = None,
    prompt: str = CALIBRATION_PROMPTS[-1],
    steps: int = 20,
    size: int | None = None,
    iters: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
) -> dict[str, Any]:
    """Median seconds per pipeline call (after one warm-up call, which compiles), peak
    GPU memory and the denoiser's weight bytes, for `source` and `reference`."""
    if iters < 1:
        raise QCompileError(f"--iters must be at least 1, got {iters}")
    rows = {}
    for label, path in (("quantized", source), ("reference", reference)):
        if path is None:
            continue
        pipe = load_pipeline(path, dtype, device)
        pipe.set_progress_bar_config(disable=True)
        _, module = component_of(pipe, None)
        call = dict(prompt=prompt, **pipeline_kwargs(size, steps))
        cuda = pipe.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(iters + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt")
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first call warms up (and compiles)
                times.append(time.perf_counter() - start)
        runtime = runtime_of(module)
        rows[label] = {
            "path": path,
            # a denoiser that ran eager is timed too, but says so: the graph is the speed
            "graph_calls": runtime.calls["graph"] if runtime is not None else None,
            "eager_calls": runtime.calls["eager"] if runtime is not None else None,
            "seconds": statistics.median(times),
            "seconds_all": times,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "weight_bytes": weight_bytes(module),
        }
        del pipe, module
    if "reference" in rows:
        rows["quantized"]["speedup"] = rows["reference"]["seconds"] / rows["quantized"]["seconds"]
    return {"steps": steps, "size": size, "iters": iters, "rows": rows}


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
