"""A tiny randomly initialised Stable Diffusion folder in diffusers' own format (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/), written by diffusers' and transformers' save_pretrained, for the text-to-image
tests: it loads the way a user's SD 1.5 folder does, with SD 1.5's scheduler configuration and a CLIP tokenizer whose
vocabulary is the 256 byte symbols (with and without the end-of-word mark) and two merges."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sid_fast.t2i.digits import SD15_SCHEDULER, byte_symbols, write_index_and_scheduler

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)


def write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for merged in ("th", "the</w>"):
        vocab[merged] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))


def write_text_encoder(root: Path, width: int) -> None:
    """A tiny CLIP text encoder of `width` for the tokenizer in root/tokenizer, saved in root/text_encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(config).save_pretrained(str(root / "text_encoder"))


def write_tiny_sd(root, seed=0, unet=None, vae=None, text_width=32, prediction_type="epsilon") -> Path:
    """The folder `root` holding a tiny SD model; returns it."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**(unet or TINY_UNET)).save_pretrained(str(root / "unet"))
    AutoencoderKL(**(vae or TINY_VAE)).save_pretrained(str(root / "vae"))
    write_tokenizer(root / "tokenizer")
    write_text_encoder(root, text_width)
    write_index_and_scheduler(root, PNDMScheduler(**dict(SD15_SCHEDULER, prediction_type=prediction_type)))
    return root


# A tiny SDXL UNet: SDXL-base's block layout (no attention at the top level, cross-attention below it, linear
# projections), its "text_time" added conditioning (six size numbers of width 8 and the second encoder's pooled
# projection of width 16), and a cross-attention width of both text encoders' states together (32 + 16).
TINY_XL_UNET = dict(
    TINY_UNET,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=48,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,
)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
)  # fmt: skip


def write_tiny_sdxl(root, seed=0, unet=None) -> Path:
    """The folder `root` holding a tiny SDXL model as StableDiffusionXLPipeline.save_pretrained lays it out (loadable
    by it): UNet, VAE (SDXL's scaling factor 0.13025), CLIPTextModel (width 32) and CLIPTextModelWithProjection (width
    16, projection 16) with their tokenizers (the second pads with "!", as SDXL's), SDXL's Euler scheduler, and
    force_zeros_for_empty_prompt true; returns it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**(unet or TINY_XL_UNET)).save_pretrained(str(root / "unet"))
    AutoencoderKL(**dict(TINY_VAE, scaling_factor=0.13025)).save_pretrained(str(root / "vae"))
    write_tokenizer(root / "tokenizer")
    write_text_encoder(root, 32)
    write_tokenizer(root / "tokenizer_2")
    CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"), pad_token="!").save_pretrained(str(root / "tokenizer_2"))
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"))
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    CLIPTextModelWithProjection(config).save_pretrained(str(root / "text_encoder_2"))
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(str(root / "scheduler"))
    # SDXL-base's scheduler_config.json also holds keys Euler does not read, clip_sample false among them (read as a
    # DDPM schedule, as SiD-LSG reads it, the x0-predictions are then not clamped).
    config = root / "scheduler" / "scheduler_config.json"
    extra = dict(clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)
    config.write_text(json.dumps(dict(json.loads(config.read_text()), **extra), indent=2) + "\n")
    import diffusers

    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root
