"""Quantize and pack the weight of every annotated linear.

Why: packing is the expensive, format-specific step; doing it once per linear FQN
(shared weights are packed once) and handing the result to `lower_linears` keeps the
graph surgery format-agnostic.
Pre: `annotate_linears` has run (and `smooth` / `fold_lowrank` where the scheme asks:
the linear then reads the residual, which is what gets packed). Post: the program is
unchanged; the returned table maps each linear FQN to the tensors its quantized module
owns (`weight`, `weight_scale`, ..., and the `smooth` / `lora_*` buffers those passes
added).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.export import ExportedProgram
from tqdm.auto import tqdm

from qcompile.errors import WeightError
from qcompile.memory import release_freed_memory
from qcompile.passes.meta import LINEAR_FQN, SCHEME
from qcompile.program import input_spec_of, state_tensor
from qcompile.schemes import (
    INPUT_SCALE,
    LORA_DOWN,
    LORA_UP,
    SMOOTH,
    QuantizedWeight,
    pack_weight,
    tensor_names,
    weight_impl,
)

logger = logging.getLogger(__name__)


def quantize_weights(
    program: ExportedProgram,
    input_scales: dict[str, torch.Tensor] | None = None,
    load: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, QuantizedWeight]:
    """Pack every annotated linear's weight; return {linear FQN: packed tensors}.

    Linears with static activation scales also get `input_scale` from `input_scales`
    (the calibrated scales, by linear FQN). A weight on the meta device is read through
    `load(fqn, meta_tensor)` (an offloaded model, see `qcompile.offload`) and dropped
    once packed.
    """
    todo = {}
    for node in program.graph.nodes:
        if SCHEME in node.meta:
            todo.setdefault(node.meta[LINEAR_FQN], (node.meta[SCHEME], node.args[1]))
    packed: dict[str, QuantizedWeight] = {}
    for fqn, (scheme, weight_node) in tqdm(
        todo.items(), desc="qcompile: packing weights", unit="layer", disable=None
    ):
        weight = state_tensor(program, weight_node)
        if weight.is_meta and load is not None:
            weight = load(input_spec_of(program, weight_node).target, weight)
        if weight.is_meta:
            raise WeightError(f"{fqn}.weight is on the meta device; load real weights first")
        if not torch.isfinite(weight).all():
            raise WeightError(
                f"{fqn}.weight contains NaN or Inf; fix the checkpoint or exclude the layer"
            )
        with torch.no_grad():
            packed[fqn] = pack_weight(weight, scheme.weight, weight_impl(scheme))
        if INPUT_SCALE in tensor_names(scheme):
            if input_scales is None or fqn not in input_scales:
                raise WeightError(
                    f"{fqn} needs a calibrated input scale (static activations); pass "
                    "calibration= or use a dynamic recipe"
                )
            packed[fqn][INPUT_SCALE] = input_scales[fqn].detach().to(torch.float32).reshape(())
        for name in (SMOOTH, LORA_DOWN, LORA_UP):
            if name in tensor_names(scheme):
                if f"{fqn}.{name}" not in program.state_dict:
                    raise WeightError(
                        f"{fqn}: scheme needs {name!r}; run the smooth / fold_lowrank passes "
                        "before quantize_weights"
                    )
                packed[fqn][name] = program.state_dict[f"{fqn}.{name}"]
        release_freed_memory()
    logger.info("quantize_weights: packed %d linears", len(packed))
    return packed
