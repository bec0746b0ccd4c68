"""Launch-config selection for the Triton kernels.

Every kernel has one safe default config (any CUDA GPU from sm_80 on, and the Triton
interpreter) and a list of candidates tuned for sm_90. On an H100/H200 the first call
with a new shape key times each candidate with ``triton.testing.do_bench`` and keeps the
fastest; later calls reuse it. Timing launches kernels and synchronizes, which must never
happen while a CUDA graph is being captured: a key first seen during capture gets the
default config (with a warning to warm up first) and is tuned on its next eager call.
``QCOMPILE_AUTOTUNE=0`` turns tuning off (read when a shape key is first met; each
key's decision is then one dictionary lookup per launch).

Shape keys bucket M (tokens × batch) to a power of two, so a model whose token count
varies is tuned once per bucket, not once per length; and no kernel specializes on M
(``ROWS``), so a new token count never compiles again either (Triton would otherwise
compile M = 1, M a multiple of 16 and any other M apart).

Only launches that can use the candidates are tuned (``tunes``): 16-bit activations and
sizes that are multiples of 16. Float32 activations (a float32 model's precision path,
not a speed path) and unaligned sizes (rows load element by element; the wide candidates
spill there) run the default config.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

HOPPER = (9, 0)
# The row count of every kernel: not specialized (see the module docstring).
ROWS = ["M"]


@dataclass(frozen=True)
class Config:
    """Meta-parameters (BLOCK_M, …) plus the launch's num_warps / num_stages."""

    meta: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def at_least(self, **minimum: int) -> Config:
        """This config with each named meta-parameter raised to at least `minimum`."""
        meta = {**self.meta, **{k: max(self.meta[k], v) for k, v in minimum.items()}}
        return Config(meta, self.num_warps, self.num_stages)

    def kwargs(self) -> dict[str, int]:
        return {**self.meta, "num_warps": self.num_warps, "num_stages": self.num_stages}


def config(num_warps: int = 4, num_stages: int = 3, **meta: int) -> Config:
    return Config(meta, num_warps, num_stages)


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M for shape keys (1, 2, 4, …, capped at 16384)."""
    return min(1 << max(0, math.ceil(math.log2(max(m, 1)))), 16384)


def tunes(dtype: torch.dtype, *sizes: int) -> bool:
    """Whether a launch with activations of `dtype` and these sizes (K, N) is tuned."""
    return dtype is not torch.float32 and all(size % 16 == 0 for size in sizes)


def autotune_enabled() -> bool:
    return os.environ.get("QCOMPILE_AUTOTUNE", "1") != "0"


class Tuner:
    """Picks a kernel's launch config per (device, shape key)."""

    def __init__(self, name: str, default: Config, hopper: Sequence[Config] = ()):
        self.name = name
        self.default = default
        self.hopper = tuple(hopper)
        self.best: dict[tuple, Config] = {}  # tuned on sm_90
        self._picked: dict[tuple, Config] = {}  # every decision: one lookup per launch
        self._warned_capture = False

    def candidates(self, device: torch.device) -> tuple[Config, ...]:
        if device.type != "cuda" or not autotune_enabled():
            return ()
        if torch.cuda.get_device_capability(device) != HOPPER:
            return ()
        return self.hopper

    def pick(
        self,
        key: tuple,
        device: torch.device,
        launch: Callable[[Config], object],
        valid: Callable[[Config], bool] = lambda c: True,
        tune: bool = True,
    ) -> Config:
        """The config for `key` on `device`: the default unless `tune` and on sm_90 with
        candidates that are `valid`, then the fastest of those (timed once per key)."""
        picked = self._picked.get((device.type, device.index, *key))
        if picked is not None:
            return picked
        candidates = [c for c in self.candidates(device) if valid(c)] if tune else []
        if not candidates:
            return self._remember(device, key, self.default)
        if torch.cuda.is_current_stream_capturing():
            if not self._warned_capture:
                log.warning(
                    "qcompile: %s met shape %s first inside CUDA-graph capture; using the "
                    "default config. Run the model once eagerly before capturing to tune.",
                    self.name,
                    key,
                )
                self._warned_capture = True
            return self.default
        self.best[(device.index, *key)] = self._time(key, candidates, launch)
        return self._remember(device, key, self.best[(device.index, *key)])

    def _remember(self, device: torch.device, key: tuple, chosen: Config) -> Config:
        self._picked[(device.type, device.index, *key)] = chosen
        return chosen

    def _time(
        self, key: tuple, candidates: Sequence[Config], launch: Callable[[Config], object]
    ) -> Config:
        from triton.testing import do_bench

        timings = []
        for candidate in candidates:
            try:
                timings.append(do_bench(lambda c=candidate: launch(c), warmup=5, rep=20))
            except Exception as error:  # a config can run out of shared memory/registers
                log.debug("qcompile: %s config %s failed: %s", self.name, candidate, error)
                timings.append(float("inf"))
        best = min(range(len(candidates)), key=timings.__getitem__)
        if math.isinf(timings[best]):
            return self.default
        log.info("qcompile: %s %s → %s (%.3f ms)", self.name, key, candidates[best], timings[best])
        return candidates[best]
