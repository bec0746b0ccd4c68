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


def _as(model, dtype: torch.dtype):
    """Eval mode, cast only when asked (diffusers warns on every `.to(dtype)`)."""
    model.eval()
    return model if dtype is torch.float32 else model.to(dtype)


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
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
    return _as(model, dtype)


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
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
    return _as(model, dtype)


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
    model = UNet2DConditionModel(
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
    return _as(model, dtype)


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
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    vocab_size = len(TINY_VOCAB) + 3
    torch.manual_seed(seed)
    clip = _clip(vocab_size, 32, intermediate=37, heads=4)
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
    vae = _vae(shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer(32),
        transformer=tiny_flux(seed),
    )
    for component in (clip, t5, vae):
        component.eval()  # built in training mode: T5's dropout would make runs differ
    return pipe if dtype is torch.float32 else pipe.to(dtype)


def _clip(
    vocab_size: int,
    hidden: int,
    projection: int | None = None,
    *,
    intermediate: int | None = None,
    heads: int = 2,
):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=0,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(**config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **config,
    ).eval()


def _t5(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=2,
    )
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline around `tiny_sd3`: two CLIP encoders and a T5 encoder
    as wide as the transformer's joint attention (SD3's layout), and a VAE with SD3's
    latent shift and scale; it saves and loads back like a real SD3 folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vocab_size = len(TINY_VOCAB) + 3
    torch.manual_seed(seed)
    transformer = tiny_sd3(seed)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_clip(vocab_size, 16, 16),
        tokenizer=_word_tokenizer(77),
        text_encoder_2=_clip(vocab_size, 16, 16),
        tokenizer_2=_word_tokenizer(77),
        text_encoder_3=_t5(vocab_size, transformer.config.joint_attention_dim),
        tokenizer_3=_word_tokenizer(77),
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline around the SDXL-style `tiny_unet`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    vocab_size = len(TINY_VOCAB) + 3
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_clip(vocab_size, 16),
        tokenizer=_word_tokenizer(77),
        text_encoder_2=_clip(vocab_size, 32, 32),
        tokenizer_2=_word_tokenizer(77),
        unet=tiny_unet(seed),
        scheduler=EulerDiscreteScheduler(),
    )


# Held-out inputs: batch 1 and other sizes than the capture's examples.
def _g(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def flux_eval_inputs(model, batch=1, rows=6, cols=6, text=11, dtype=torch.float32, seed=1):
    cfg = model.config
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    ids = torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2)], 1)
    return {
        "hidden_states": _g(batch, rows * cols, cfg.in_channels, seed=seed).to(dtype),
        "encoder_hidden_states": _g(batch, text, cfg.joint_attention_dim, seed=seed).to(dtype),
        "pooled_projections": _g(batch, cfg.pooled_projection_dim, seed=seed).to(dtype),
        "timestep": torch.full((batch,), 0.7, dtype=dtype),
        "img_ids": ids.to(dtype),
        "txt_ids": torch.zeros(text, 3, dtype=dtype),
        "guidance": torch.full((batch,), 3.5),
    }


def sd3_eval_inputs(model, batch=1, height=20, width=16, text=11, seed=1):
    cfg = model.config
    return {
        "hidden_states": _g(batch, cfg.in_channels, height, width, seed=seed),
        "encoder_hidden_states": _g(batch, text, cfg.joint_attention_dim, seed=seed),
        "pooled_projections": _g(batch, cfg.pooled_projection_dim, seed=seed),
        "timestep": torch.full((batch,), 700.0),
    }


def unet_eval_inputs(model, batch=1, height=24, width=20, text=11, seed=1):
    cfg = model.config
    return {
        "sample": _g(batch, cfg.in_channels, height, width, seed=seed),
        "timestep": torch.tensor(700.0),
        "encoder_hidden_states": _g(batch, text, cfg.cross_attention_dim, seed=seed),
        "added_cond_kwargs": {
            "text_embeds": _g(batch, 32, seed=seed),
            "time_ids": _g(batch, 6, seed=seed),
        },
    }


HELD_OUT = {
    "flux": (tiny_flux, flux_eval_inputs),
    "sd3": (tiny_sd3, sd3_eval_inputs),
    "unet": (tiny_unet, unet_eval_inputs),
}
