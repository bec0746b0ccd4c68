"""Tiny models per family and held-out inputs (batch 1, other sizes than the capture's)."""

from __future__ import annotations

import torch

from qcompile import tiny

FAMILIES = tiny.HELD_OUT
flux_eval_inputs = tiny.flux_eval_inputs
unet_eval_inputs = tiny.unet_eval_inputs


def _g(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


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


def flux_images(pipe, prompt: str = "a photo of a cat"):
    """A tiny Flux pipeline's images at 32², 2 steps, seed 0, as a tensor."""
    return pipe(
        prompt,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
