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
- The instruction's keys and values are computed once (`InstructionPrefix`): Gemma is causal, so every instructed
  prompt's states at the positions kept (the first, which is the instruction's, and the last 299) are those of its
  suffix run over the instruction's cached keys and values. The official loop runs Gemma over all ~1,350 tokens of
  every prompt, two phases per micro-batch: 11.2 of SANA-600M's 29.6 TFLOP per image at 512 px (bench.memory);
  over the 299-token suffix it is a quarter of that. The prefix is the tokens that every instructed prompt shares
  (found by tokenising the instruction before probe prompts), checked against each micro-batch's ids on the host;
  ids that do not all start with it (the empty prompt's, which has no instruction) run the whole sequence.

Every fault of a folder is one SanaError sentence naming the folder and the component.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from sid_fast.hf import load_transformers_model, pipeline_class

SANA_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MAX_SEQUENCE = 300  # SanaPipeline's max_sequence_length, the official loop's
TIME_SCALE = 1000.0  # the transformer's timestep is 1000 t


class SanaError(ValueError):
    """A user-facing problem with a SANA folder (one sentence naming it)."""


def is_sana_folder(path) -> bool:
    """Is `path` a diffusers folder whose model_index.json names SanaPipeline?"""
    return pipeline_class(path) == "SanaPipeline"


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
    prefix_cache: bool = True  # the instruction's keys and values computed once (InstructionPrefix)
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
        prefix = self._prefix(device) if self.prefix_cache else None
        prefix = prefix if prefix is not None and prefix.starts(ids[0]) else None  # the host's ids, before the copy
        i = ids[0]
        if torch.device(device).type == "cuda":
            i = i.pin_memory()
        i = i.to(device, non_blocking=True)
        # Without tokenizers (memory accounting on the meta device) the ids have no values: no padding.
        mask = (i != self.pad_id).long() if self.tokenizers is not None else torch.ones_like(i)
        tail = i.shape[1] - MAX_SEQUENCE + 1  # the first position and the last 299 (slices: no index tensor to copy)
        if prefix is not None:
            first, states = prefix.first, prefix.suffix_states(self.text_encoders[0], i, mask)
            states = torch.cat([first.expand(len(i), -1, -1), states[:, tail - prefix.length :]], dim=1)
        else:
            states = self.text_encoders[0](i, attention_mask=mask, use_cache=False)[0]  # no KV cache: nothing decodes
            states = torch.cat([states[:, :1], states[:, tail:]], dim=1)
        return dict(encoder_hidden_states=states,
                    encoder_attention_mask=torch.cat([mask[:, :1], mask[:, tail:]], dim=1))  # fmt: skip

    def _prefix(self, device) -> InstructionPrefix | None:
        """The instruction's cached keys and values on `device` (made on first use, one per device)."""
        cache = self.__dict__.setdefault("_prefixes", {})
        key = str(device)
        if key not in cache:
            ids = self.prefix_ids()
            cache[key] = None if ids is None else InstructionPrefix(self.text_encoders[0], ids, device)
        return cache[key]

    def prefix_ids(self) -> torch.Tensor | None:
        """The token ids every instructed prompt starts with ([P], int64), at most up to where the kept tail begins;
        None without an instruction. Without tokenizers (the meta device) zeros of the instructed length's prefix."""
        if self.tokenizers is None:
            n = self.meta_length - MAX_SEQUENCE + 1
            return torch.zeros([n], dtype=torch.long) if n > 1 else None  # longer than 300: an instructed length
        if not self.instruction:
            return None
        rows = self.tokenize(list(PREFIX_PROBES))[0]
        same = (rows == rows[:1]).all(dim=0)
        shared = int(same.long().cumprod(0).sum())  # the length of the common prefix
        # One token short of it (the instruction's last token may merge with a prompt's first), and never into the
        # last 299 positions, which the suffix run must produce.
        n = min(shared - 1, self.length - MAX_SEQUENCE + 1)
        return rows[0, :n].clone() if n > 1 else None

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


# Prompts whose instructed tokenisations share their first tokens only where the instruction's are stable: a word, a
# capital (lower-cased), a digit, a non-ASCII letter, a punctuation mark, two words.
PREFIX_PROBES = ("a", "The cat", "1", "é", ".", "x y")


class InstructionPrefix:
    """Gemma's keys and values of the instruction's shared tokens (sid_fast.t2i.sana.Sana.prefix_ids), made once, and
    the states of prompts run from there: `suffix_states(gemma, ids, mask)` runs positions P.. of ids [N, L] over
    the cached [P] positions; `first` is position 0's state [1, 1, width], the same for every instructed prompt.

    One transformers cache per batch size, made at its first use (its layers make their constants then) and put back
    to the prefix after every run (each row's keys and values views of the one copy), so that a warm step makes no
    host tensor and copies nothing from the host (sid_fast.guard)."""

    def __init__(self, gemma, ids: torch.Tensor, device):
        self.ids, self.length = ids.numpy(), len(ids)
        with torch.no_grad():
            out = gemma(ids[None].to(device), use_cache=True)
        self.first = out.last_hidden_state[:, :1]
        self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self.config = gemma.config
        self._caches: dict = {}

    def starts(self, ids: torch.Tensor) -> bool:
        """Do all rows of the host ids [N, L] start with the prefix (a host comparison; False for device ids)?"""
        if ids.device.type != "cpu" or ids.shape[1] < self.length:
            return ids.device.type == "meta"  # the meta device's ids have no values: counted as instructed
        return bool((ids.numpy()[:, : self.length] == self.ids).all())  # numpy: the host's own work

    def _views(self, n: int) -> list:
        return [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.kv]

    def _reset(self, cache, n: int) -> None:
        """The cache back to the prefix (the run's appended keys and values released). It sets transformers' cache
        layer attributes (5.x's `keys`, `values`, `cumulative_length`) and checks the cache then reports the prefix's
        length (host integers, no device read): a release that renames them fails here, not silently."""
        for layer, (k, v) in zip(cache.layers, self._views(n)):
            layer.keys, layer.values = k, v
            if hasattr(layer, "cumulative_length"):  # a sliding-window layer counts the positions it has seen
                layer.cumulative_length = self.length
        if cache.get_seq_length() != self.length:
            raise RuntimeError(
                f"SANA's instruction cache: this transformers version's cache ({type(cache).__name__}) does not "
                "go back to the instruction's length when reset; set Sana.prefix_cache = False or use the locked "
                "transformers."
            )

    def suffix_states(self, gemma, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache  # the text path's dependency

        n = len(ids)
        cache = self._caches.get(n)
        if cache is None:
            cache = self._caches[n] = DynamicCache(ddp_cache_data=self._views(n), config=self.config)
        try:
            return gemma(ids[:, self.length :], attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
        finally:
            self._reset(cache, n)


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
