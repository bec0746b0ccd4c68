"""Calibration data: the submodule's real inputs, captured from pipeline runs.

`capture_calibration` hooks the submodule's forward, runs the pipeline once per prompt
(a different generator seed per prompt) and keeps a detached CPU copy of every call's
keyword arguments, bound to the forward's parameter names — CFG-doubled batches and all.
A `CalibrationSet` saves to one safetensors file (tensors by `<sample>/<path>`, the
samples' structure as JSON in the header): no pickle.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from qcompile.errors import CheckpointError, QCompileError

logger = logging.getLogger(__name__)

STRUCTURE_KEY = "qcompile_calibration"
_SKIPPED = ("return_dict",)


class CalibrationError(QCompileError, ValueError):
    """Calibration data is empty, non-finite or never reached the module."""


@dataclass
class CalibrationSet:
    """Forward kwargs of the calibrated submodule, one dict per call, on the CPU."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    module_class: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.samples)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.samples for t in _tensors(s))

    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        structure = [_encode(sample, f"{i}", tensors) for i, sample in enumerate(self.samples)]
        meta = {"module_class": self.module_class, "samples": structure}
        save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationSet:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[STRUCTURE_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a qcompile calibration file ({exc!r})") from exc
        samples = [_decode(s, tensors) for s in meta["samples"]]
        return cls(samples, meta.get("module_class", ""))

    def check_finite(self, skip: bool = False) -> CalibrationSet:
        """Raise on NaN/Inf, naming the sample and input; or drop such samples (warned)."""
        kept = []
        for index, sample in enumerate(self.samples):
            bad = [name for name, t in _named_tensors(sample) if not torch.isfinite(t).all()]
            if not bad:
                kept.append(sample)
                continue
            message = f"calibration sample {index}: input {bad[0]!r} contains NaN or Inf"
            if not skip:
                raise CalibrationError(message + " (pass skip_nonfinite=True to drop it)")
            logger.warning("%s; sample skipped", message)
        if not kept:
            raise CalibrationError("no finite calibration sample is left")
        return CalibrationSet(kept, self.module_class)


class _Enough(Exception):
    """Raised from the hook to stop the pipeline once max_samples are captured."""


def capture_calibration(
    pipe: Any,
    module: nn.Module,
    prompts: Sequence[str] | str,
    *,
    num_inference_steps: int = 20,
    max_samples: int | None = None,
    seed: int = 0,
    **pipe_kwargs: Any,
) -> CalibrationSet:
    """Run `pipe` once per prompt and record every call of `module` (a pipeline component).

    Extra keyword arguments go to the pipeline call (height, guidance_scale, ...).
    """
    components = getattr(pipe, "components", {}) or {}
    if not any(component is module for component in components.values()):
        raise CalibrationError(
            f"{type(module).__name__} is not a component of {type(pipe).__name__}; pass the "
            "submodule the pipeline runs, e.g. pipe.transformer or pipe.unet"
        )
    state = getattr(module, "qcompile_state", None)
    if state is not None:  # each sample would run the quantized model, for nothing
        raise CalibrationError(
            f"{type(module).__name__} is already quantized with {state.recipe.name!r}: "
            "calibrate the float model (load the pipeline again without quantizing it), "
            "then quantize that"
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise CalibrationError("no prompts given")
    signature = inspect.signature(type(module).forward)
    samples: list[dict[str, Any]] = []
    bar = tqdm(prompts, desc="qcompile: calibration", unit="prompt", disable=None)

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if max_samples is not None and len(samples) >= max_samples:
            raise _Enough
        bound = signature.bind(_module, *args, **kwargs).arguments
        sample = {k: _to_cpu(v) for k, v in bound.items() if k != "self" and k not in _SKIPPED}
        samples.append(sample)

    pipe_kwargs.setdefault("output_type", "latent")  # the decoder is not calibrated
    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for index, prompt in enumerate(bar):
            generator = torch.Generator().manual_seed(seed + index)
            try:
                pipe(
                    prompt=prompt,
                    num_inference_steps=num_inference_steps,
                    generator=generator,
                    **pipe_kwargs,
                )
            except _Enough:
                break
            bar.set_postfix(samples=len(samples), MiB=f"{_nbytes(samples) / 2**20:.1f}")
    finally:
        handle.remove()
    if not samples:
        raise CalibrationError(
            f"{type(pipe).__name__} never called {type(module).__name__}: nothing captured"
        )
    result = CalibrationSet(samples, type(module).__name__)
    logger.info(
        "captured %d calls of %s (%.1f MiB on CPU)",
        len(result),
        result.module_class,
        result.nbytes / 2**20,
    )
    return result


def as_calibration_set(calibration: Any) -> CalibrationSet:
    """A CalibrationSet, a list of kwargs dicts, or a path to a saved set."""
    if isinstance(calibration, CalibrationSet):
        result = calibration
    elif isinstance(calibration, (str, os.PathLike)):
        result = CalibrationSet.load(calibration)
    else:
        result = CalibrationSet([dict(s) for s in calibration])
    if not result.samples:
        raise CalibrationError("the calibration set is empty; capture at least one call")
    return result


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _named_tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def _tensors(sample: dict[str, Any]) -> Iterator[torch.Tensor]:
    return (t for _, t in _named_tensors(sample))


def _nbytes(samples: list[dict[str, Any]]) -> int:
    return sum(t.numel() * t.element_size() for s in samples for t in _tensors(s))


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"__list__" if isinstance(value, list) else "__tuple__": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"__value__": value}
    raise CalibrationError(f"cannot store a {type(value).__name__} calibration input ({key})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, payload),) = value.items()
    if kind == "__tensor__":
        return tensors[payload]
    if kind == "__dict__":
        return {k: _decode(v, tensors) for k, v in payload.items()}
    if kind in ("__list__", "__tuple__"):
        items = [_decode(v, tensors) for v in payload]
        return items if kind == "__list__" else tuple(items)
    return payload
