"""Published transformer configs the benchmarks build (random weights, exact shapes)."""

FLUX_DEV = dict(  # FLUX.1-dev's transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
