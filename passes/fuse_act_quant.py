"""Hand activation quantization to inductor, so it fuses into the op producing the activation.

Why: a `qcompile::quantize_act_*` custom op is opaque to inductor. The norm or AdaLN
modulation in front of a W8A8 linear writes its 16-bit output, and the quantize kernel
reads it back to write the 8-bit copy and the scales. The op's numerical definition
is its reference implementation (`kernels/reference/act.py`): plain torch ops (row
absmax, scale, divide, round, clamp, cast). Calling that in the op's place lets
inductor generate the quantization inside the producer's kernel, and the 16-bit
activation is never written. Run after `share_quantize`, so each tensor is quantized
once. FP8 quantization of an activation on a CUDA GPU without FP8 conversions (before
sm_89) is left to the op, whose kernel handles that GPU.
Pre: a Dynamo graph (torch IR) with `qcompile` quantize calls. Post: none are left;
each is a call of its reference implementation, with the same arguments.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from qcompile.kernels import reference

logger = logging.getLogger(__name__)


def _decompositions() -> dict:
    ops = torch.ops.qcompile
    pairs = {
        ops.quantize_act_dynamic: reference.quantize_act_dynamic,
        ops.quantize_act_static: reference.quantize_act_static,
    }
    return {
        target: function
        for packet, function in pairs.items()
        for target in (packet, packet.default)
    }


def fuse_act_quant(graph: fx.Graph) -> int:
    """Replace quantize custom-op calls by their reference implementations, in place;
    return how many were replaced."""
    decompositions = _decompositions()
    replaced = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in decompositions:
            continue
        if _fp8_unsupported(node):
            continue
        node.target = decompositions[node.target]
        replaced += 1
    if replaced:
        logger.info("fuse_act_quant: %d activation quantizations handed to inductor", replaced)
    return replaced


def _fp8_unsupported(node: fx.Node) -> bool:
    """A float8 quantization of an activation on a CUDA device without FP8 support."""
    if node.args[-1] is not torch.float8_e4m3fn:
        return False
    value = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
    device = getattr(value, "device", None)
    if device is None or device.type != "cuda":
        return False
    from qcompile.kernels.cuda import _fp8_ok

    return not _fp8_ok(device)
