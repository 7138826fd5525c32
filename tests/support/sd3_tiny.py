"""Tiny randomly initialised Stable Diffusion 3 and FLUX.1 folders in diffusers' own format (write_tiny_sd3:
model_index.json, transformer/, vae/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/, scheduler/; write_tiny_flux: the
same with CLIP-L and T5), written by diffusers' and transformers' save_pretrained, for the flow-matching tests: they
load the way a user's folders do (StableDiffusion3Pipeline and FluxPipeline read them too). The CLIP tokenizers are
sd_tiny's byte-level BPE; the T5 tokenizer a byte-level Unigram model with SentencePiece's word-boundary mark, saved
as a T5TokenizerFast."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from support.sd_tiny import write_tokenizer

TINY_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=16,
    qk_norm="rms_norm",
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
    shift_factor=0.0609,
    scaling_factor=1.5305,
)
# SD3's scheduler configuration (stabilityai/stable-diffusion-3-medium-diffusers, scheduler_config.json).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def write_t5_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(chr(c), -2.0) for c in range(32, 127)] + [("\u2581" + chr(c), -1.5) for c in range(97, 123)]
    vocab += [("\u2581the", -1.0), ("\u2581a", -1.0), ("\u2581cat", -1.0)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                          model_max_length=256)  # fmt: skip
    tok.save_pretrained(str(folder))


def write_clip(root: Path, name: str, tok_name: str, width: int, projection: int | None) -> None:
    """A tiny CLIP text encoder in root/name (with a projection of that width, else a plain CLIPTextModel) and its
    tokenizer in root/tok_name."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tokenizer(root / tok_name)
    tok = CLIPTokenizer.from_pretrained(str(root / tok_name))
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or 512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).save_pretrained(str(root / name))


def write_t5(root: Path, name: str, tok_name: str) -> None:
    """A tiny T5 encoder (width 32) in root/name and its tokenizer in root/tok_name."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    write_t5_tokenizer(root / tok_name)
    tok = T5TokenizerFast.from_pretrained(str(root / tok_name))
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=0)).save_pretrained(str(root / name))  # fmt: skip


def write_index(root: Path, pipeline: str, components: dict) -> None:
    """model_index.json naming the pipeline class and each component's (library, class)."""
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_sd3(root, seed: int = 0, transformer: dict | None = None) -> Path:
    """The folder `root` holding a tiny SD3 model; returns it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tcfg = dict(TINY_TRANSFORMER, **(transformer or {}))
    SD3Transformer2DModel(**tcfg).save_pretrained(str(root / "transformer"))
    AutoencoderKL(**TINY_VAE).save_pretrained(str(root / "vae"))
    write_clip(root, "text_encoder", "tokenizer", 16, 8)
    write_clip(root, "text_encoder_2", "tokenizer_2", 16, 16)
    write_t5(root, "text_encoder_3", "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(str(root / "scheduler"))
    index = {
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    write_index(root, "StableDiffusion3Pipeline", index)
    return root


TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
# FLUX.1-dev's scheduler configuration (black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json).
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


def write_tiny_flux(root, seed: int = 0, transformer: dict | None = None) -> Path:
    """The folder `root` holding a tiny FLUX model (CLIP-L and T5 text encoders, a guidance embedding); returns it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    FluxTransformer2DModel(**dict(TINY_FLUX, **(transformer or {}))).save_pretrained(str(root / "transformer"))
    AutoencoderKL(**dict(TINY_VAE, shift_factor=0.1159, scaling_factor=0.3611)).save_pretrained(str(root / "vae"))
    write_clip(root, "text_encoder", "tokenizer", 16, None)
    write_t5(root, "text_encoder_2", "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(str(root / "scheduler"))
    index = {
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    write_index(root, "FluxPipeline", index)
    return root


def write_gemma_tokenizer(folder: Path) -> None:
    """A Gemma tokenizer over byte-level characters and the words of SANA's instruction and the test prompts (a
    Unigram model; <pad> 0, <eos> 1, <bos> 2 before every text)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GemmaTokenizer

    from sid_fast.t2i.sana import complex_human_instruction

    words = sorted(set(re.findall(r"[a-z']+", (complex_human_instruction() + " a cat the dog seven moon").lower())))
    vocab = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0)]
    vocab += [(chr(c), -3.0) for c in range(32, 127)] + [("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    tk = Tokenizer(models.Unigram(vocab, unk_id=3))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    GemmaTokenizer(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                   unk_token="<unk>").save_pretrained(str(folder))  # fmt: skip


def write_tiny_sana(root, seed=0) -> Path:
    """A tiny SANA folder as SanaPipeline.save_pretrained lays it out (loadable by it): SanaTransformer2DModel (4x8x8
    latents, patch 1, 2 blocks of width 16, caption width 32), AutoencoderDC (16-pixel RGB <-> 4x8x8, SANA's scaling
    factor 0.41407), a Gemma-2 text encoder (width 32) with its tokenizer, the flow DPM-Solver scheduler."""
    import diffusers
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1,
    ).save_pretrained(str(root / "transformer"))  # fmt: skip
    AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), scaling_factor=0.41407,
    ).save_pretrained(str(root / "vae"))  # fmt: skip
    write_gemma_tokenizer(root / "tokenizer")
    tok = GemmaTokenizer.from_pretrained(str(root / "tokenizer"))
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    Gemma2Model(config).save_pretrained(str(root / "text_encoder"))
    DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0
    ).save_pretrained(str(root / "scheduler"))
    index = {
        "_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": ["transformers", "GemmaTokenizer"], "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root
