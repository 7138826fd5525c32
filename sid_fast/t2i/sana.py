"""SANA teachers (flow matching, linear-attention DiT) for SiD on flow-matching models (official ml-sid-dit,
training/sid_dit_util.py): the model folder and the text conditioning, as the official code builds them.

- Components of a local diffusers folder (what `SanaPipeline.from_pretrained` reads): `SanaTransformer2DModel`
  (transformer/), `AutoencoderDC` (vae/: 32-channel latents at H/32, its scaling_factor), Gemma-2 (text_encoder/, a
  `Gemma2Model`, run in bf16 as the official code keeps it) with its tokenizer (tokenizer/), and scheduler/ (read for
  nothing: SiD draws its own times).
- Text, as the official loop encodes it through SanaPipeline.encode_prompt: a prompt is lower-cased and stripped; a
  non-empty one is prefixed with the pipeline's "complex human instruction" (the lines of SanaPipeline's default
  `complex_human_instruction`, joined by newlines, taken from the installed diffusers), tokenised right-padded to
  (the instruction's token count + 300 - 2) tokens with an attention mask, encoded by Gemma with that mask, and the
  first token and the last 299 are kept: [N, 300, 2304] states and a [N, 300] mask. The empty prompt "" (the
  unconditional input, encoded once) has no instruction: 300 tokens.
- The transformer is called at timestep 1000 t with the states and their mask (encoder_attention_mask) and returns the
  velocity.

Every fault of a folder is one SanaError sentence naming the folder and the component.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sid_fast.hf import load_transformers_model

SANA_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MAX_SEQUENCE = 300  # SanaPipeline's max_sequence_length, the official loop's
TIME_SCALE = 1000.0  # the transformer's timestep is 1000 t


class SanaError(ValueError):
    """A user-facing problem with a SANA folder (one sentence naming it)."""


def is_sana_folder(path) -> bool:
    """Is `path` a diffusers folder whose model_index.json names SanaPipeline?"""
    if path is None:
        return False
    index = Path(str(path)) / "model_index.json"
    try:
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == "SanaPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def complex_human_instruction() -> str:
    """SanaPipeline's default complex human instruction, its lines joined by newlines (as the pipeline joins them)."""
    from diffusers import SanaPipeline  # an optional dependency: only SANA teachers need it

    return "\n".join(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class InstructedPrompts:
    """A prompt file's lines as the SANA text path tokenises them: lower-cased, stripped, the instruction before
    (a sequence for sid_fast.t2i.tokens.PromptTokens)."""

    def __init__(self, prompts, instruction: str):
        self.prompts, self.instruction = prompts, instruction

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return prepare(self.prompts[i], self.instruction)


def prepare(prompt: str, instruction: str) -> str:
    p = prompt.lower().strip()
    return instruction + p if p else p


@dataclass
class Sana:
    """The components of a SANA folder (frozen, eval mode)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list  # [Gemma-2]
    tokenizers: list  # [its tokenizer] (None on the meta device)
    folder: Path
    instruction: str = ""
    meta_length: int = MAX_SEQUENCE  # without tokenizers (bench.memory): the token length of an instructed prompt
    transformer_class = "diffusers.SanaTransformer2DModel"

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def latent_resolution(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizers[0].pad_token_id)

    @functools.cached_property
    def length(self) -> int:
        """The token length of an instructed prompt: the instruction's tokens + 300 - 2 (SanaPipeline's)."""
        return len(self.tokenizers[0].encode(self.instruction)) + MAX_SEQUENCE - 2

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """[ids [N, length]] of the prompts as the pipeline tokenises them (empty prompts: see encode_text)."""
        if self.tokenizers is None:  # the meta device: an instructed prompt's length (bench.memory's estimate)
            return [torch.zeros([len(prompts), self.meta_length], dtype=torch.long)]
        tok = self.tokenizers[0]
        tok.padding_side = "right"
        texts = [prepare(p, self.instruction) for p in prompts]
        return [tok(texts, padding="max_length", max_length=self.length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids]  # fmt: skip

    @torch.no_grad()
    def encode_ids(self, ids: list[torch.Tensor], device=None) -> dict:
        """{"encoder_hidden_states": [N, 300, width], "encoder_attention_mask": [N, 300]} of token ids (right-padded,
        so the mask is ids != pad), the first and the last 299 positions kept; from the host: pinned and copied
        without blocking on CUDA."""
        device = device or next(self.text_encoders[0].parameters()).device
        i = ids[0]
        if torch.device(device).type == "cuda":
            i = i.pin_memory()
        i = i.to(device, non_blocking=True)
        # Without tokenizers (memory accounting on the meta device) the ids have no values: no padding.
        mask = (i != self.pad_id).long() if self.tokenizers is not None else torch.ones_like(i)
        states = self.text_encoders[0](i, attention_mask=mask, use_cache=False)[0]  # no KV cache: nothing decodes
        tail = i.shape[1] - MAX_SEQUENCE + 1  # the first position and the last 299 (slices: no index tensor to copy)
        return dict(encoder_hidden_states=torch.cat([states[:, :1], states[:, tail:]], dim=1),
                    encoder_attention_mask=torch.cat([mask[:, :1], mask[:, tail:]], dim=1))  # fmt: skip

    def blank_ids(self, n: int) -> list[torch.Tensor]:
        """[ids [n, 300]] of the empty prompt, without the instruction."""
        if self.tokenizers is None:
            return [torch.zeros([n, MAX_SEQUENCE], dtype=torch.long)]
        tok = self.tokenizers[0]
        tok.padding_side = "right"
        return [tok([""] * n, padding="max_length", max_length=MAX_SEQUENCE, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids]  # fmt: skip

    def encode_text(self, prompts: list[str], device=None) -> dict:
        """The conditioning of prompts; empty ones encoded without the instruction (300 tokens), as the official loop
        puts its unconditional encoding in their rows."""
        empty = [not p.strip() for p in prompts]
        out = None
        full, blank = [i for i, e in enumerate(empty) if not e], [i for i, e in enumerate(empty) if e]
        for rows, ids_of in ((full, lambda r: self.tokenize([prompts[i] for i in r])),
                             (blank, lambda r: self.blank_ids(len(r)))):  # fmt: skip
            if not rows:
                continue
            enc = self.encode_ids(ids_of(rows), device)
            if out is None:
                out = {k: v.new_zeros([len(prompts), *v.shape[1:]]) for k, v in enc.items()}
            for k, v in enc.items():
                out[k][rows] = v
        return out

    def velocity_model(self, net, guidance: float):
        """net as model(x, t, cond) -> v (SANA has no guidance embedding: `guidance` is not used)."""
        return transformer_model(net)


def transformer_model(net, time_scale: float = TIME_SCALE):
    """net (a SanaTransformer2DModel, or a trainer call site of one, whose positional arguments are hidden_states,
    encoder_hidden_states and timestep) as model(x, t, cond) -> v, called at timestep time_scale * t."""

    def model(x, t, cond):
        return net(x, cond["encoder_hidden_states"], time_scale * t.flatten(),
                   encoder_attention_mask=cond["encoder_attention_mask"], return_dict=False)[0]  # fmt: skip

    return model


def load_sana(folder, device="cpu", dtype=torch.float32, text_dtype=torch.bfloat16, transformer=None) -> Sana:
    """The components of a local SANA folder, checked against each other (Gemma in `text_dtype`, the official bf16
    by default); `transformer`: one to use instead of the folder's (a distilled generator)."""
    p = Path(folder)
    if not (p / "model_index.json").is_file():
        raise SanaError(f"{p}: not a diffusers model folder (no model_index.json).")
    missing = [s for s in SANA_SUBFOLDERS if not (p / s).is_dir()]
    if missing:
        raise SanaError(f"{p}: a SANA folder needs {', '.join(SANA_SUBFOLDERS)}; missing {', '.join(missing)}.")
    try:
        from diffusers import AutoencoderDC, SanaTransformer2DModel
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SanaError(f"{p}: SANA teachers need diffusers and transformers ({e}).") from None
    try:
        net = transformer or SanaTransformer2DModel.from_pretrained(str(p), subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderDC.from_pretrained(str(p), subfolder="vae", torch_dtype=dtype)
        gemma = load_transformers_model(AutoModel, p, subfolder="text_encoder", torch_dtype=text_dtype)
        tok = AutoTokenizer.from_pretrained(str(p), subfolder="tokenizer")
        instruction = complex_human_instruction()
    except Exception as e:  # diffusers/transformers: missing or corrupt weights and configs
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SanaError(f"{p}: a component does not load ({type(e).__name__}: {reason}).") from None
    c = net.config
    width = int(gemma.config.hidden_size)
    for ok, what in (
        (vae.config.latent_channels == c.in_channels == (c.out_channels or c.in_channels),
         f"the VAE makes {vae.config.latent_channels}-channel latents; the transformer takes {c.in_channels} and "
         f"returns {c.out_channels}"),
        (width == c.caption_channels,
         f"Gemma's width {width} is not the transformer's caption_channels {c.caption_channels}"),
    ):  # fmt: skip
        if not ok:
            raise SanaError(f"{p}: {what}.")
    for m in (net, vae, gemma):
        m.to(device).eval().requires_grad_(False)
    return Sana(net, vae, [gemma], [tok], p, instruction)
