"""Tiny diffusers models and a FluxPipeline built entirely from configs in code.

Nothing is downloaded: weights are random (seeded), tokenizers are word-level
vocabularies made here. Used by `qcompile demo` and the tests.
"""

from __future__ import annotations

import torch

TINY_VOCAB = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "horse",
    "on",
    "the",
    "moon",
    "cat",
    "sitting",
    "red",
    "blue",
    "green",
    "city",
    "night",
    "at",
    "sunset",
    "lake",
    "mountains",
]


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return (
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=48,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
            guidance_embeds=True,
        )
        .to(dtype)
        .eval()
    )


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return (
        SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            caption_projection_dim=64,
            joint_attention_dim=48,
            pooled_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=64,
        )
        .to(dtype)
        .eval()
    )


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32, sdxl: bool = True):
    """A two-stage UNet2DConditionModel; `sdxl` adds SDXL's text_time conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    return (
        UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=48,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            **extra,
        )
        .to(dtype)
        .eval()
    )


def _word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("<pad>", "<unk>", "<eos>", *TINY_VOCAB))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A FluxPipeline whose every component is tiny and built here."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab_size = len(TINY_VOCAB) + 3
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            eos_token_id=2,
            pad_token_id=0,
            bos_token_id=0,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=48,
            d_kv=12,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer(32),
        transformer=tiny_flux(seed),
    )
    return pipe.to(dtype)
