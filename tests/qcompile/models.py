"""Tiny models per family and held-out inputs (batch 1, other sizes than the capture's)."""

from __future__ import annotations

import torch

from qcompile import tiny


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def flux_eval_inputs(model, batch=1, rows=6, cols=6, text=11, dtype=torch.float32):
    cfg = model.config
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    ids = torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2)], 1)
    return {
        "hidden_states": _g(batch, rows * cols, cfg.in_channels).to(dtype),
        "encoder_hidden_states": _g(batch, text, cfg.joint_attention_dim).to(dtype),
        "pooled_projections": _g(batch, cfg.pooled_projection_dim).to(dtype),
        "timestep": torch.full((batch,), 0.7, dtype=dtype),
        "img_ids": ids.to(dtype),
        "txt_ids": torch.zeros(text, 3, dtype=dtype),
        "guidance": torch.full((batch,), 3.5),
    }


def sd3_eval_inputs(model, batch=1, height=20, width=16, text=11):
    cfg = model.config
    return {
        "hidden_states": _g(batch, cfg.in_channels, height, width),
        "encoder_hidden_states": _g(batch, text, cfg.joint_attention_dim),
        "pooled_projections": _g(batch, cfg.pooled_projection_dim),
        "timestep": torch.full((batch,), 700.0),
    }


def unet_eval_inputs(model, batch=1, height=24, width=20, text=11):
    cfg = model.config
    return {
        "sample": _g(batch, cfg.in_channels, height, width),
        "timestep": torch.tensor(700.0),
        "encoder_hidden_states": _g(batch, text, cfg.cross_attention_dim),
        "added_cond_kwargs": {"text_embeds": _g(batch, 32), "time_ids": _g(batch, 6)},
    }


FAMILIES = {
    "flux": (tiny.tiny_flux, flux_eval_inputs),
    "sd3": (tiny.tiny_sd3, sd3_eval_inputs),
    "unet": (tiny.tiny_unet, unet_eval_inputs),
}


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        caption_channels=24,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def pixart_inputs(batch=2, height=8, width=6, text=7):
    return {
        "hidden_states": _g(batch, 4, height, width),
        "encoder_hidden_states": _g(batch, text, 24),
        "timestep": torch.full((batch,), 500.0),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
