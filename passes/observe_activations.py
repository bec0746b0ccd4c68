"""Run the calibration set through the program: static activation scales, statistics.

Why: static activation scales must come from real inputs, and they belong to the
tensor a linear reads, not to the linear: q/k/v projections that read one normalized
tensor share one observer (and so one scale), which is what lets lowering quantize
that tensor once. Nothing is baked into the graph: an `fx.Interpreter` records the
statistics of the observed nodes' values, keyed by the linears' FQNs.
The same statistics (per-channel max, a row reservoir) feed smoothing.
Pre: `annotate_linears` has run on a float program. Post: the program is unchanged;
returns {linear FQN: input scale (float32 scalar)} for linears with static activations
and {linear FQN: ActivationStats} for those and the smoothed ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from tqdm.auto import tqdm

from qcompile.kernels.reference.act import qmax
from qcompile.kernels.reference.common import absmax_scale
from qcompile.memory import release_freed_memory
from qcompile.passes.meta import LINEAR_FQN, SCHEME
from qcompile.passes.observers import ActivationStats, observe_range
from qcompile.recipes import ActivationMode, Observer
from qcompile.schemes import activation_impl

logger = logging.getLogger(__name__)


class _Recorder(fx.Interpreter):
    """Records the observed nodes' values. State on the meta device (an offloaded
    model's weights) is read through `load` just before the first op that uses it; the
    interpreter frees it after the last one."""

    def __init__(
        self,
        module: fx.GraphModule,
        stats: dict[fx.Node, ActivationStats],
        lazy: dict[fx.Node, str],
        load: Callable[[str, torch.Tensor], torch.Tensor] | None,
    ) -> None:
        super().__init__(module)
        self.stats, self.lazy, self.load = stats, lazy, load

    def run_node(self, n: fx.Node) -> Any:
        for arg in n.all_input_nodes:
            value = self.env.get(arg) if arg in self.lazy else None
            if value is not None and value.is_meta:
                self.env[arg] = self.load(self.lazy[arg], value)
        result = super().run_node(n)
        if n in self.stats:
            self.stats[n].update(result)
        return result


def observe_activations(
    program: ExportedProgram,
    samples: Iterable[dict[str, Any]],
    matcher: Any,
    load: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    keep_rows: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, ActivationStats]]:
    """Observe every static-activation linear's input; return (scales, stats) by FQN.

    `keep_rows`: sample input rows for smoothing's alpha search (megabytes per observed
    tensor at a large model's widths; leave it off when no search runs).

    `load(fqn, meta_tensor)` reads state the program holds on the meta device (see
    `qcompile.offload`), one op's worth at a time.
    """
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in program.graph.nodes:
        scheme = node.meta.get(SCHEME)
        if scheme is not None and (
            scheme.activation.mode is ActivationMode.STATIC or scheme.smooth
        ):
            groups.setdefault(node.args[0], []).append(node)
    if not groups:
        return {}, {}
    stats = {
        x: ActivationStats(_needs_values(consumers), keep_rows) for x, consumers in groups.items()
    }
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    lazy = {
        node: spec.target
        for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=False)
        if load is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
    }
    recorder = _Recorder(program.graph_module, stats, lazy, load)
    state = [
        _state(program, spec)
        for spec in program.graph_signature.input_specs
        if spec.kind is not InputKind.USER_INPUT
    ]
    used, skipped = 0, []
    samples = list(samples)
    for index, sample in enumerate(tqdm(samples, desc="qcompile: observing", disable=None)):
        kwargs = dict(sample)
        if "return_dict" in matcher.signature.parameters:
            kwargs["return_dict"] = False
        routed = matcher.match((), kwargs)
        if isinstance(routed, str):
            skipped.append((index, routed))
            continue
        flat, _, _ = routed
        with torch.no_grad():
            recorder.run(*state, *flat)
        used += 1
        release_freed_memory()  # the sample's activations (and loaded weights) are freed
    for index, reason in skipped[:3]:
        logger.warning(
            "calibration sample %d does not fit the capture (%s); skipped", index, reason
        )
    if used == 0:
        from qcompile.calibration import CalibrationError

        raise CalibrationError(
            f"none of the {len(samples)} calibration samples fits the captured program "
            f"(first: {skipped[0][1] if skipped else 'no samples'})"
        )
    scales: dict[str, torch.Tensor] = {}
    by_fqn: dict[str, ActivationStats] = {}
    for x, consumers in groups.items():
        for consumer in consumers:
            by_fqn[consumer.meta[LINEAR_FQN]] = stats[x]
        static = [c for c in consumers if c.meta[SCHEME].activation.mode is ActivationMode.STATIC]
        if not static:
            continue
        activation = static[0].meta[SCHEME].activation
        dtype = activation_impl(activation).dtype
        clip = observe_range(stats[x], activation.observer, dtype, activation.percentile)
        scale = absmax_scale(torch.tensor(clip), qmax(dtype))  # all-zero input → scale 1
        for consumer in static:  # one value, but each linear owns its buffer
            scales[consumer.meta[LINEAR_FQN]] = scale.clone()
    logger.info(
        "observe_activations: %d observers for %d linears over %d samples",
        len(groups),
        len(by_fqn),
        used,
    )
    return scales, by_fqn


def _needs_values(consumers: list[fx.Node]) -> bool:
    """Whether a static consumer's observer (MSE) reads the value reservoir."""
    return any(
        c.meta[SCHEME].activation.mode is ActivationMode.STATIC
        and c.meta[SCHEME].activation.observer is Observer.MSE
        for c in consumers
    )


def _state(program: ExportedProgram, spec) -> torch.Tensor:
    if spec.kind is InputKind.CONSTANT_TENSOR:
        return program.constants[spec.target]
    return program.state_dict[spec.target]
