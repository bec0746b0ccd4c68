"""Model families qcompile knows: default excludes, example inputs, dynamic dims.

For a known family, `quantize` needs no inputs from the user: examples are synthesized
from the model config with the dtypes the family's diffusers pipeline passes (a dtype
that differs from the capture's sends a call to the eager fallback). Batch, token and
spatial dims are dynamic; batch starts at 1 (FluxPipeline calls with batch 1), which
torch.export only allows through an explicit `Dim(min=1)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

# Example sizes are distinct on purpose, so no two dynamic dims share an example value.
EXAMPLE_BATCH = 2
EXAMPLE_TEXT_TOKENS = 7
MAX_BATCH = 1024
MAX_TOKENS = 1 << 18
UNET_MAX_BATCH = 63  # UNet2DConditionModel branches on batch >= 64


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_name: str
    default_excludes: tuple[str, ...]
    example_inputs: Callable[[nn.Module, torch.device, torch.dtype], dict[str, Any]]
    dynamic_shapes: Callable[[dict[str, Any]], dict[str, Any]]


def detect_family(module: nn.Module) -> ModelFamily | None:
    """The family of `module`, by class (subclasses included), or None."""
    for cls in type(module).__mro__:
        for family in FAMILIES:
            if cls.__name__ == family.class_name:
                return family
    return None


def _randn(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _flux_inputs(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg = module.config
    b, rows, cols, t = EXAMPLE_BATCH, 4, 5, EXAMPLE_TEXT_TOKENS
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2)], dim=1)
    inputs: dict[str, Any] = {
        "hidden_states": _randn(b, rows * cols, cfg.in_channels, device=device, dtype=dtype),
        "encoder_hidden_states": _randn(b, t, cfg.joint_attention_dim, device=device, dtype=dtype),
        "pooled_projections": _randn(b, cfg.pooled_projection_dim, device=device, dtype=dtype),
        "timestep": torch.full((b,), 0.5, device=device, dtype=dtype),
        "img_ids": img_ids.to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(t, 3, device=device, dtype=dtype),
    }
    if cfg.guidance_embeds:  # FluxPipeline builds guidance in float32 whatever the model dtype
        inputs["guidance"] = torch.full((b,), 3.5, device=device, dtype=torch.float32)
    return inputs


def _flux_dims(inputs: dict[str, Any]) -> dict[str, Any]:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    image = Dim("image_tokens", min=1, max=MAX_TOKENS)
    text = Dim("text_tokens", min=1, max=MAX_TOKENS)
    dims = {
        "hidden_states": {0: batch, 1: image},
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
        "img_ids": {0: image},
        "txt_ids": {0: text},
        "guidance": {0: batch},
    }
    return {name: dims.get(name) for name in inputs}


def _sd3_inputs(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg = module.config
    b, p = EXAMPLE_BATCH, cfg.patch_size
    return {
        "hidden_states": _randn(b, cfg.in_channels, 6 * p, 5 * p, device=device, dtype=dtype),
        "encoder_hidden_states": _randn(
            b, EXAMPLE_TEXT_TOKENS, cfg.joint_attention_dim, device=device, dtype=dtype
        ),
        "pooled_projections": _randn(b, cfg.pooled_projection_dim, device=device, dtype=dtype),
        # StableDiffusion3Pipeline passes the scheduler's float32 timesteps.
        "timestep": torch.full((b,), 500.0, device=device, dtype=torch.float32),
    }


def _sd3_dims(inputs: dict[str, Any]) -> dict[str, Any]:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    text = Dim("text_tokens", min=1, max=MAX_TOKENS)
    dims = {
        "hidden_states": {0: batch, 2: Dim.AUTO, 3: Dim.AUTO},
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
    }
    return {name: dims.get(name) for name in inputs}


def _unet_inputs(module: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    cfg = module.config
    b = EXAMPLE_BATCH
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    inputs: dict[str, Any] = {
        "sample": _randn(b, cfg.in_channels, 4 * factor, 3 * factor, device=device, dtype=dtype),
        # SDXL's default (Euler) scheduler yields 0-dim float32 timesteps.
        "timestep": torch.tensor(500.0, device=device, dtype=torch.float32),
        "encoder_hidden_states": _randn(
            b, EXAMPLE_TEXT_TOKENS, cfg.cross_attention_dim, device=device, dtype=dtype
        ),
    }
    if cfg.addition_embed_type == "text_time":
        # SDXL: 6 time ids, each embedded to addition_time_embed_dim, plus the text embeds.
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": _randn(b, text_dim, device=device, dtype=dtype),
            "time_ids": _randn(b, 6, device=device, dtype=dtype),
        }
    return inputs


def _unet_dims(inputs: dict[str, Any]) -> dict[str, Any]:
    batch = Dim("batch", min=1, max=UNET_MAX_BATCH)
    text = Dim("text_tokens", min=1, max=MAX_TOKENS)
    dims: dict[str, Any] = {
        "sample": {0: batch, 2: Dim.AUTO, 3: Dim.AUTO},
        "timestep": None,
        "encoder_hidden_states": {0: batch, 1: text},
    }
    if "added_cond_kwargs" in inputs:
        dims["added_cond_kwargs"] = {key: {0: batch} for key in inputs["added_cond_kwargs"]}
    return {name: dims.get(name) for name in inputs}


FLUX = ModelFamily(
    name="flux",
    class_name="FluxTransformer2DModel",
    # Embedders and the final projection stay 16-bit. `proj_out` is anchored: the
    # single blocks' own proj_out (≈15 % of the parameters) is quantized.
    default_excludes=(
        "x_embedder",
        "context_embedder",
        "time_text_embed.*",
        "norm_out.*",
        "proj_out",
    ),
    example_inputs=_flux_inputs,
    dynamic_shapes=_flux_dims,
)
SD3 = ModelFamily(
    name="sd3",
    class_name="SD3Transformer2DModel",
    default_excludes=(
        "pos_embed.*",
        "context_embedder",
        "time_text_embed.*",
        "norm_out.*",
        "proj_out",
    ),
    example_inputs=_sd3_inputs,
    dynamic_shapes=_sd3_dims,
)
UNET = ModelFamily(
    name="unet2d-condition",
    class_name="UNet2DConditionModel",
    default_excludes=(
        "time_embedding.*",
        "add_embedding.*",
        "encoder_hid_proj*",
        "class_embedding.*",
    ),
    example_inputs=_unet_inputs,
    dynamic_shapes=_unet_dims,
)
FAMILIES = (FLUX, SD3, UNET)


def keep_in_fp32_globs(names: list[str]) -> tuple[str, ...]:
    """Excludes for a model's `_keep_in_fp32_modules`: a linear is skipped when one of
    its name's dotted components is one of `names` (diffusers keeps those in float32)."""
    return tuple(g for n in names for g in (n, f"{n}.*", f"*.{n}", f"*.{n}.*"))
