"""quantize_weights: packs once per FQN, refuses non-finite weights by name."""

from __future__ import annotations

import pytest
import torch

from qcompile import WeightError, get_recipe
from qcompile.capture import capture
from qcompile.passes import annotate_linears, quantize_weights

from .blocks import AttentionBlock, block_inputs


def test_packs_each_selected_linear_with_its_format():
    program = capture(AttentionBlock().eval(), block_inputs()).program
    annotate_linears(program, get_recipe("int4-wo"))
    packed = quantize_weights(program)
    assert len(packed) == 7
    assert packed["ff_out"]["weight"].dtype == torch.uint8
    assert packed["ff_out"]["weight"].shape == (32, 32)  # K=64 → 32 bytes per row
    assert packed["ff_out"]["weight_scale"].shape == (32, 1)


def test_nan_weight_is_reported_with_its_layer():
    block = AttentionBlock().eval()
    with torch.no_grad():
        block.to_v.weight[3, 4] = float("nan")
    program = capture(block, block_inputs()).program
    annotate_linears(program, get_recipe("int8-wo"))
    with pytest.raises(WeightError, match=r"to_v\.weight contains NaN or Inf"):
        quantize_weights(program)
