"""quantize_weights: packs once per FQN, refuses non-finite weights by name, and packs
large row-wise weights in chunks bitwise equal to packing them whole."""

from __future__ import annotations

import pytest
import torch

from qcompile import WeightError, get_recipe, schemes
from qcompile.capture import capture
from qcompile.passes import annotate_linears, quantize_weights
from qcompile.recipes import WeightSpec
from qcompile.schemes import weight_format_impl

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


PACKED_SPECS = [
    WeightSpec("int8"),
    WeightSpec("int8", "per_tensor"),
    WeightSpec("fp8_e4m3"),
    WeightSpec("int4", "per_group", 64),
    WeightSpec("mxfp4", "per_group"),
    WeightSpec("nvfp4", "per_group"),
]


@pytest.mark.parametrize(
    "spec", PACKED_SPECS, ids=lambda s: f"{s.format.value}-{s.granularity.value}"
)
def test_packing_in_row_chunks_is_bitwise_whole_tensor_packing(spec, monkeypatch):
    torch.manual_seed(0)
    weight = (torch.randn(37, 200) * torch.logspace(-3, 2, 37)[:, None]).to(torch.bfloat16)
    whole = weight_format_impl(spec).quantize(weight, spec)
    # 8 rows of 200 float32 values per chunk: 5 chunks, the last one partial.
    monkeypatch.setattr(schemes, "PACK_CHUNK_BYTES", 8 * 200 * 4)
    chunked = schemes.pack_weight(weight, spec)
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert chunked[name].dtype == whole[name].dtype and chunked[name].shape == whole[name].shape
        assert torch.equal(_bytes(chunked[name]), _bytes(whole[name])), name
    # Formats with a scale over the whole tensor must not be split: one row's scale
    # would differ. A row-wise split of those is caught here.
    assert weight_format_impl(spec).rowwise(spec) == (
        spec.granularity.value != "per_tensor" and spec.format.value != "nvfp4"
    )


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)
