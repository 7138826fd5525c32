"""The public UNet configurations of the Stable Diffusion teachers SiD-LSG distills (their unet/config.json values),
for counts on the meta device without any weights: parameters, FLOPs and bytes at the official shapes.

    runwayml/stable-diffusion-v1-5            SD 1.5, 512 px (latents 4 x 64 x 64), CLIP ViT-L/14 text (768)
    stabilityai/stable-diffusion-2-1-base     SD 2.1-base, 512 px, OpenCLIP ViT-H/14 text (1024), linear projections
    stabilityai/stable-diffusion-xl-base-1.0  SDXL, 1024 px (latents 4 x 128 x 128), two text encoders (2048 + pooled
                                              1280), size/crop conditioning (time_ids, 6 numbers)

Parameter counts of the UNets built from them (tests/test_t2i_sd.py checks each on the meta device): SD 1.5
859,520,964; SD 2.1-base 865,910,724; SDXL 2,567,463,684.
"""

from __future__ import annotations

import torch

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD21_BASE_UNET = dict(
    SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True
)
SDXL_UNET = dict(
    SD15_UNET,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10],
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    sample_size=128,
)

UNETS = {"sd15": SD15_UNET, "sd21-base": SD21_BASE_UNET, "sdxl": SDXL_UNET}
TEXT_TOKENS = 77


def unet_inputs(name: str, batch: int, device="meta", dtype=torch.float32) -> tuple[tuple, dict]:
    """(args, kwargs) of one UNet call at the official shapes: latents, timesteps, text states (and SDXL's pooled
    text embedding and size conditioning)."""
    cfg = UNETS[name]
    res = cfg["sample_size"]
    x = torch.randn(batch, cfg["in_channels"], res, res, device=device, dtype=dtype)
    t = torch.full([batch], 500, device=device, dtype=torch.long)
    kwargs = dict(
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg["cross_attention_dim"], device=device, dtype=dtype)
    )
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, pooled, device=device, dtype=dtype),
            time_ids=torch.randn(batch, 6, device=device, dtype=dtype),
        )
    return (x, t), kwargs


def build_unet(name: str, device="meta"):
    """diffusers' UNet2DConditionModel of a public configuration, with random (or, on meta, no) weights."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**UNETS[name])
