"""FLUX.1 teachers (flow matching, MMDiT with single-stream blocks and a guidance embedding) for SiD on flow-matching
models (official ml-sid-dit, training/sid_dit_flux_util.py): the model folder, the text conditioning and the call of
the transformer, as the official code makes them.

- Components of a local diffusers folder (what `FluxPipeline.from_pretrained` reads): `FluxTransformer2DModel`
  (transformer/), `AutoencoderKL` (vae/, 16-channel latents with shift_factor and scaling_factor), `CLIPTextModel`
  (text_encoder/, CLIP-L) with its `CLIPTokenizer`, `T5EncoderModel` (text_encoder_2/) with its T5 tokenizer.
- Text: CLIP-L at 77 tokens gives the pooled embedding (its pooler output, [N, 768]); T5 at 512 tokens gives the
  per-token states ([N, 512, 4096]); text positions are zeros [512, 3].
- Latents [N, 16, H, W] are packed into 2x2 patches ([N, HW/4, 64]) for the transformer and unpacked after it; image
  positions are (0, row, column) of the patch grid. The transformer takes the flow time t itself (it scales it by
  1000 inside) and a guidance embedding: the call's guidance scale (the teacher's kappa4, the fake score's kappa1 or
  kappa2, 1 for G), and, as the official code does, classifier-free guidance at the same scale on top when it is not 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sid_fast.hf import load_transformers_model, pipeline_class

FLUX_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
CLIP_TOKENS = 77
T5_TOKENS = 512  # official max_sequence_length of the FLUX loop


class FluxError(ValueError):
    """A user-facing problem with a FLUX folder (one sentence naming it)."""


def is_flux_folder(path) -> bool:
    """Is `path` a diffusers folder whose model_index.json names a FLUX pipeline?"""
    return "Flux" in pipeline_class(path)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, HW/4, 4C]: 2x2 patches, channel-major within a patch (FLUX's layout)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse: [N, HW/4, 4C] -> [N, C, H, W]."""
    n, _, c4 = x.shape
    return x.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


_POSITIONS: dict = {}  # (kind, sizes, device, dtype) -> positions made on the device once, never written to


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] positions (0, row, column) of the 2x2-patch grid of an H x W latent, made on `device` once per
    shape and dtype (no host copy in a step)."""
    key = ("img", h, w, torch.device(device), dtype)
    if key not in _POSITIONS:
        ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        _POSITIONS[key] = ids.reshape(-1, 3)
    return _POSITIONS[key]


def text_ids(n: int, device, dtype) -> torch.Tensor:
    """[n, 3] zero positions of n text tokens, made on `device` once per length and dtype."""
    key = ("txt", n, torch.device(device), dtype)
    if key not in _POSITIONS:
        _POSITIONS[key] = torch.zeros(n, 3, device=device, dtype=dtype)
    return _POSITIONS[key]


@dataclass
class Flux:
    """The components of a FLUX folder (frozen, eval mode); `resolution`: the latents' side (the transformer's config
    does not hold it)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list  # CLIP-L, T5
    tokenizers: list | None
    folder: Path
    resolution: int
    transformer_class = "diffusers.FluxTransformer2DModel"

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    @property
    def latent_resolution(self) -> int:
        return self.resolution

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """CLIP's ids [N, 77] and T5's [N, 512], padded and truncated (official encode_prompt)."""
        if self.tokenizers is None:  # memory accounting on the meta device
            return [torch.zeros([len(prompts), n], dtype=torch.long) for n in (CLIP_TOKENS, T5_TOKENS)]
        return [tok(list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
                for tok, n in zip(self.tokenizers, (CLIP_TOKENS, T5_TOKENS))]  # fmt: skip

    @torch.no_grad()
    def encode_ids(self, ids: list[torch.Tensor], device=None) -> dict:
        """{"encoder_hidden_states": T5's last hidden state, "pooled_projections": CLIP's pooler output}."""
        device = device or next(self.text_encoders[0].parameters()).device
        if torch.device(device).type == "cuda":
            ids = [i.pin_memory() for i in ids]
        ids = [i.to(device, non_blocking=True) for i in ids]
        pooled = self.text_encoders[0](ids[0], output_hidden_states=False).pooler_output
        states = self.text_encoders[1](ids[1])[0]
        return dict(encoder_hidden_states=states, pooled_projections=pooled)

    def encode_text(self, prompts: list[str], device=None) -> dict:
        return self.encode_ids(self.tokenize(prompts), device)

    def velocity_model(self, net, guidance: float):
        """net (a FluxTransformer2DModel or a trainer call site of one: positional hidden_states,
        encoder_hidden_states, pooled_projections) as model(x, t, cond) -> v on unpacked latents, its guidance
        embedding at `guidance` (for a transformer without one, none)."""
        embeds = bool(getattr(getattr(self.transformer, "config", None), "guidance_embeds", False))

        def model(x, t, cond):
            n, _, h, w = x.shape
            ehs = cond["encoder_hidden_states"]
            kw = dict(
                timestep=t.flatten(),
                img_ids=image_ids(h, w, x.device, x.dtype),
                txt_ids=text_ids(ehs.shape[1], x.device, x.dtype),
            )
            if embeds:
                # official torch.tensor([guidance_scale]): torch's default float dtype
                kw["guidance"] = torch.full([n], float(guidance), device=x.device, dtype=torch.get_default_dtype())
            out = net(pack(x), ehs, cond["pooled_projections"], **kw, return_dict=False)[0]
            return unpack(out, h, w)

        return model


def check_folder(folder) -> Path:
    p = Path(folder)
    if not (p / "model_index.json").is_file():
        raise FluxError(f"{p}: not a diffusers model folder (no model_index.json).")
    missing = [s for s in FLUX_SUBFOLDERS if not (p / s).is_dir()]
    if missing:
        raise FluxError(f"{p}: a FLUX folder needs {', '.join(FLUX_SUBFOLDERS)}; missing {', '.join(missing)}.")
    return p


def load_flux(folder, resolution: int, device="cpu", dtype=torch.float32, text_dtype=None, transformer=None) -> Flux:
    """The components of a local FLUX folder, checked against each other; `resolution`: the latents' side;
    `transformer`: a transformer to use instead of the folder's (a distilled generator)."""
    p = check_folder(folder)
    try:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel
    except ImportError as e:
        raise FluxError(f"{p}: FLUX teachers need diffusers and transformers ({e}).") from None
    text_dtype = text_dtype or dtype
    try:
        net = transformer or FluxTransformer2DModel.from_pretrained(str(p), subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(str(p), subfolder="vae", torch_dtype=dtype)
        encoders = [
            load_transformers_model(CLIPTextModel, p, subfolder="text_encoder", torch_dtype=text_dtype),
            load_transformers_model(T5EncoderModel, p, subfolder="text_encoder_2", torch_dtype=text_dtype),
        ]
        tokenizers = [
            CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(str(p), subfolder="tokenizer_2"),
        ]
    except Exception as e:  # diffusers/transformers: missing or corrupt weights and configs
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FluxError(f"{p}: a component does not load ({type(e).__name__}: {reason}).") from None
    c = net.config
    for ok, what in (
        (c.in_channels % 4 == 0 and vae.config.latent_channels * 4 == c.in_channels
         and (c.out_channels or c.in_channels) == c.in_channels,
         f"the VAE makes {vae.config.latent_channels}-channel latents; the transformer takes {c.in_channels} "
         "packed channels (4 per latent channel)"),
        (int(encoders[1].config.d_model) == c.joint_attention_dim,
         f"T5's width {encoders[1].config.d_model} is not the transformer's joint_attention_dim "
         f"{c.joint_attention_dim}"),
        (int(encoders[0].config.hidden_size) == c.pooled_projection_dim,
         f"CLIP's width {encoders[0].config.hidden_size} is not the transformer's pooled_projection_dim "
         f"{c.pooled_projection_dim}"),
        (resolution % 2 == 0, f"latents of side {resolution} cannot be packed in 2x2 patches"),
    ):  # fmt: skip
        if not ok:
            raise FluxError(f"{p}: {what}.")
    for m in (net, vae, *encoders):
        m.to(device).eval().requires_grad_(False)
    return Flux(net, vae, encoders, tokenizers, p, resolution)
