"""Stable Diffusion 3 / 3.5 teachers (flow matching, MMDiT) for SiD on flow-matching models (official ml-sid-dit,
training/sid_dit_sd3_util.py): the model folder and the text conditioning, as the official code builds them.

- Components of a local diffusers folder (what `StableDiffusion3Pipeline.from_pretrained` reads):
  `SD3Transformer2DModel` (transformer/), `AutoencoderKL` (vae/, with its shift_factor and scaling_factor), two
  `CLIPTextModelWithProjection` (text_encoder/, text_encoder_2/: CLIP-L and CLIP-G) with their `CLIPTokenizer`s,
  `T5EncoderModel` (text_encoder_3/) with its T5 tokenizer (tokenizer_3/), and scheduler/ (read for its configuration
  only: SiD draws its own times).
- Text: every tokenizer pads and truncates to 77 tokens, T5's too (the official value; diffusers' pipeline uses 256),
  or to its model_max_length when that is shorter (a small teacher's, e.g. sid_fast.t2i.digits_flow's 8).
  Each CLIP's penultimate hidden state ([N, 77, 768] and [N, 77, 1280]) is concatenated along channels, zero-padded to
  T5's width and concatenated along the sequence with T5's last hidden state: [N, 154, 4096]. The pooled embedding is
  both CLIPs' projected text embeddings concatenated ([N, 2048]). The empty prompt "" gives the unconditional input
  (computed once).
- The transformer is called at timestep 1000 t (time_scale 1000) and returns the velocity.

Every fault of a folder is one SD3Error sentence naming the folder and the component.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sid_fast.hf import load_transformers_model, pipeline_class

SD3_SUBFOLDERS = (
    "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
    "tokenizer_3", "scheduler",
)  # fmt: skip
TOKENS = 77  # every tokenizer's length in the official code, T5's included
TIME_SCALE = 1000.0  # the transformer's timestep is 1000 t


class SD3Error(ValueError):
    """A user-facing problem with an SD3 folder (one sentence naming it)."""


def is_sd3_folder(path) -> bool:
    """Is `path` a diffusers folder whose model_index.json names an SD3 pipeline?"""
    return "StableDiffusion3" in pipeline_class(path)


def check_folder(folder) -> Path:
    p = Path(folder)
    if not (p / "model_index.json").is_file():
        raise SD3Error(f"{p}: not a diffusers model folder (no model_index.json).")
    missing = [s for s in SD3_SUBFOLDERS if not (p / s).is_dir()]
    if missing:
        raise SD3Error(f"{p}: an SD3 folder needs {', '.join(SD3_SUBFOLDERS)}; missing {', '.join(missing)}.")
    return p


@dataclass
class SD3:
    """The components of an SD3 folder (frozen, eval mode)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list  # CLIP-L, CLIP-G, T5
    tokenizers: list
    folder: Path
    transformer_class = "diffusers.SD3Transformer2DModel"

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_resolution(self) -> int:
        return int(self.transformer.config.sample_size)

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """The three tokenizers' ids [N, token_length] (77 for SD3's, as the official tokenize_prompt); without
        tokenizers (memory accounting on the meta device) zeros in their shape."""
        if self.tokenizers is None:
            return [torch.zeros([len(prompts), TOKENS], dtype=torch.long)] * 3
        return [tok(list(prompts), padding="max_length", max_length=token_length(tok), truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]  # fmt: skip

    @torch.no_grad()
    def encode_ids(self, ids: list[torch.Tensor], device=None) -> dict:
        """The conditioning (`encode`) of the three tokenizers' ids, in the encoders' dtype, from the host: pinned and
        copied without blocking on CUDA."""
        device = device or next(self.text_encoders[0].parameters()).device
        if torch.device(device).type == "cuda":
            ids = [i.pin_memory() for i in ids]
        return encode(self.text_encoders, [i.to(device, non_blocking=True) for i in ids])

    def encode_text(self, prompts: list[str], device=None) -> dict:
        return self.encode_ids(self.tokenize(prompts), device)

    def velocity_model(self, net, guidance: float):
        """net as model(x, t, cond) -> v (SD3 has no guidance embedding: `guidance` is not used)."""
        return transformer_model(net, TIME_SCALE)


def token_length(tokenizer) -> int:
    """The length a tokenizer pads and truncates to: the official 77, or its model_max_length when shorter (SD3's
    CLIP tokenizers hold 77, its T5 tokenizer 512: the official lengths; the digits teacher's hold 8)."""
    return min(TOKENS, int(tokenizer.model_max_length))


def encode(encoders, ids: list[torch.Tensor]) -> dict:
    """{"encoder_hidden_states": [N, CLIP tokens + T5 tokens, T5 width], "pooled_projections": [N, CLIP-L + CLIP-G
    projections]} of the three tokenizers' ids (official encode_prompt): each CLIP's penultimate hidden state,
    concatenated along channels and zero-padded to T5's width, then T5's last hidden state along the sequence."""
    states, pooled = [], []
    for enc, i in zip(encoders[:2], ids[:2]):
        out = enc(i, output_hidden_states=True)
        pooled.append(out[0])  # the projected text embedding
        states.append(out.hidden_states[-2])
    clip = torch.cat(states, dim=-1)
    t5 = encoders[2](ids[2])[0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return dict(encoder_hidden_states=torch.cat([clip, t5], dim=-2), pooled_projections=torch.cat(pooled, dim=-1))


def load_sd3(folder, device="cpu", dtype=torch.float32, text_dtype=None, transformer=None) -> SD3:
    """The components of a local SD3 folder, checked against each other (`text_dtype`: the text encoders' dtype,
    default `dtype`); `transformer`: a transformer to use instead of the folder's (a distilled generator: the
    teacher's is then not read)."""
    p = check_folder(folder)
    try:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
    except ImportError as e:
        raise SD3Error(f"{p}: SD3 teachers need diffusers and transformers ({e}).") from None
    text_dtype = text_dtype or dtype
    try:
        net = transformer or SD3Transformer2DModel.from_pretrained(str(p), subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(str(p), subfolder="vae", torch_dtype=dtype)
        encoders = [
            load_transformers_model(CLIPTextModelWithProjection, p, subfolder="text_encoder", torch_dtype=text_dtype),
            load_transformers_model(CLIPTextModelWithProjection, p, subfolder="text_encoder_2", torch_dtype=text_dtype),
            load_transformers_model(T5EncoderModel, p, subfolder="text_encoder_3", torch_dtype=text_dtype),
        ]
        tokenizers = [
            CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer_2"),
            AutoTokenizer.from_pretrained(str(p), subfolder="tokenizer_3"),
        ]
    except Exception as e:  # diffusers/transformers: missing or corrupt weights and configs
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SD3Error(f"{p}: a component does not load ({type(e).__name__}: {reason}).") from None
    c = net.config
    clip_width = sum(int(e.config.hidden_size) for e in encoders[:2])
    pooled = sum(int(e.config.projection_dim) for e in encoders[:2])
    t5_width = int(encoders[2].config.d_model)
    for ok, what in (
        (vae.config.latent_channels == c.in_channels == c.out_channels,
         f"the VAE makes {vae.config.latent_channels}-channel latents; the transformer takes {c.in_channels} and "
         f"returns {c.out_channels}"),
        (t5_width == c.joint_attention_dim,
         f"T5's width {t5_width} is not the transformer's joint_attention_dim {c.joint_attention_dim}"),
        (clip_width <= t5_width, f"the CLIPs' widths ({clip_width} together) exceed T5's {t5_width}"),
        (pooled == c.pooled_projection_dim,
         f"the CLIPs' projections ({pooled} together) are not the transformer's pooled_projection_dim "
         f"{c.pooled_projection_dim}"),
    ):  # fmt: skip
        if not ok:
            raise SD3Error(f"{p}: {what}.")
    for m in (net, vae, *encoders):
        m.to(device).eval().requires_grad_(False)
    return SD3(net, vae, encoders, tokenizers, p)


def transformer_model(net, time_scale: float = TIME_SCALE):
    """net (an SD3Transformer2DModel, or a trainer call site of one, whose positional arguments are hidden_states,
    encoder_hidden_states and pooled_projections) as model(x, t, cond) -> v, called at timestep time_scale * t."""

    def model(x, t, cond):
        return net(x, cond["encoder_hidden_states"], cond["pooled_projections"], timestep=time_scale * t.flatten(),
                   return_dict=False)[0]  # fmt: skip

    return model
