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
