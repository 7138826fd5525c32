"""Stable Diffusion teachers for SiD-LSG (Zhou et al., "Guided Score identity Distillation for Data-Free One-Step
Text-to-Image Generation", ICLR 2025; official repository SiD-LSG, training/sid_sd_util.py and
training/sid_training_loop.py): the model folder, the discrete noise schedule, guidance, the x0 conversion and the
two losses, with the official numerics.

What the official code does, and this module with it:
- components from a diffusers model folder: `UNet2DConditionModel` (unet/), `AutoencoderKL` (vae/), `CLIPTextModel`
  and `CLIPTokenizer` (text_encoder/, tokenizer/), the noise schedule of scheduler/ read as a `DDPMScheduler`;
- the schedule: diffusers' float32 alphas_cumprod (SD 1.5 and 2.1-base: scaled-linear betas 0.00085..0.012 over 1000
  steps); noising is `scheduler.add_noise` (sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, float32), the x0-prediction is
  `scheduler.step(...).pred_original_sample` (epsilon: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); v-prediction:
  sqrt(abar_t) x_t - sqrt(1 - abar_t) v; clamped when the scheduler's clip_sample is set, which SD's is not);
- the generator: the UNet at the fixed timestep --init_timestep (625) on sqrt(1 - abar_625) z (`add_noise` of a zero
  image), its x0-prediction is the sample (abar_625 = 0.1378: EDM's sigma 2.50, SiD's init_sigma);
- guidance: kappa == 1 is one conditional call; otherwise one call on the doubled batch [unconditional "",
  conditional] and eps = eps_u + kappa (eps_c - eps_u) (the same combination of x0-predictions, x0 being affine in
  eps at a given x_t);
- timesteps t ~ uniform integers in [tmin, tmax) = [20, 980);
- text: the tokenizer pads to its model_max_length (77) and truncates longer prompts, the text encoder's last hidden
  state is the conditioning; "" gives the unconditional embedding (computed once);
- the fake-score loss: sum over pixels of (eps_fake - eps)^2 (v-prediction: the velocity target weighted by
  snr / (snr + 1) = abar_t, diffusers' compute_snr); the generator loss is SiD's (sid_fast.losses) on x0-predictions.

Everything runs in the dtype it is given; the tests run it in float64 against diffusers' own scheduler.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from sid_fast.hf import load_transformers_model

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OFFICIAL_TMIN, OFFICIAL_TMAX, OFFICIAL_INIT_TIMESTEP = 20, 980, 625


class SDError(ValueError):
    """A user-facing problem with a Stable Diffusion folder, a prompt file or a guidance flag (one sentence)."""


# ----------------------------------------------------------------------------------------------------------------
# The noise schedule.


class Schedule:
    """The discrete VP schedule of a diffusers scheduler config, as the official code uses it."""

    def __init__(self, scheduler):
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False):
            raise SDError("the scheduler uses dynamic thresholding, which SiD-LSG's x0-prediction does not.")
        self.prediction_type = cfg.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SDError(f"prediction_type {self.prediction_type!r}: SiD-LSG needs epsilon or v_prediction.")
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().clone()  # float32, as diffusers computes it
        self._resident: dict = {}  # (device, dtype) -> alphas_cumprod there
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.clip_sample = bool(getattr(cfg, "clip_sample", False))
        self.clip_sample_range = float(getattr(cfg, "clip_sample_range", 1.0))

    @classmethod
    def from_folder(cls, folder) -> Schedule:
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler"))

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._resident:  # the schedule on the device once per dtype: a step copies nothing from the host
            self._resident[key] = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        a = self._resident[key][t.to(like.device)]
        return a.reshape(-1, *([1] * (like.ndim - 1)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's sigma of timestep t, sqrt((1 - abar_t) / abar_t), in float64."""
        a = self.alphas_cumprod.double()[t.cpu()]
        return ((1 - a) / a).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """diffusers' add_noise: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        a = self._abar(t, x0)
        return a**0.5 * x0 + (1 - a) ** 0.5 * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """diffusers' get_velocity: sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        a = self._abar(t, x0)
        return a**0.5 * eps - (1 - a) ** 0.5 * x0

    def x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0-prediction of a UNet output at x_t (scheduler.step's pred_original_sample, per sample)."""
        a = self._abar(t, x_t)
        if self.prediction_type == "epsilon":
            x = (x_t - (1 - a) ** 0.5 * out) / a**0.5
        else:
            x = a**0.5 * x_t - (1 - a) ** 0.5 * out
        return x.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x

    def generator_input(self, z: torch.Tensor, t_init: torch.Tensor) -> torch.Tensor:
        """The generator's input at --init_timestep: add_noise of a zero image, sqrt(1 - abar) z."""
        return self.add_noise(torch.zeros_like(z), z, t_init)

    def draw_timesteps(self, n: int, tmin: int, tmax: int, device, generator=None) -> torch.Tensor:
        """t ~ uniform integers in [tmin, tmax), as torch.randint(tmin, tmax, (n,))."""
        return torch.randint(tmin, tmax, (n,), device=device, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Guidance and losses.


def guided_output(model, x_t, t, cond, uncond, kappa: float):
    """The output of `model(x, t, conditioning)` (a UNet's raw epsilon or v) with classifier-free guidance kappa: one
    conditional call when kappa == 1, otherwise one call on the doubled batch [uncond, cond] and
    out_u + kappa (out_c - out_u). cond, uncond: text states [N, tokens, dim] or dicts of such tensors (SDXL's also
    hold the pooled embedding and the size conditioning); uncond's batch may be 1 (broadcast)."""
    if kappa == 1:
        return model(x_t, t, cond)
    out = model(
        torch.cat([x_t, x_t]), torch.cat([t, t]), map_cond(lambda u, c: torch.cat([u.expand_as(c), c]), uncond, cond)
    )
    out_u, out_c = out.chunk(2)
    return out_u + kappa * (out_c - out_u)


def map_cond(fn, *conds):
    """fn applied entry by entry to conditionings (tensors, or dicts of tensors with the same keys)."""
    if isinstance(conds[0], dict):
        return {k: fn(*(c[k] for c in conds)) for k in conds[0]}
    return fn(*conds)


def unet_model(unet):
    """A diffusers UNet2DConditionModel as model(x, t, conditioning) -> its raw output (see unet_kwargs)."""
    return lambda x, t, cond: unet(x, t, **unet_kwargs(cond), return_dict=False)[0]


def unet_kwargs(cond) -> dict:
    """The UNet's keyword arguments of a conditioning: text states, or a dict {"encoder_hidden_states", and for SDXL
    "text_embeds", "time_ids"} (diffusers' added_cond_kwargs)."""
    if not isinstance(cond, dict):
        return dict(encoder_hidden_states=cond)
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    return dict(encoder_hidden_states=cond["encoder_hidden_states"], **({"added_cond_kwargs": extra} if extra else {}))


def fake_score_loss_rows(schedule: Schedule, out, x0, eps, t):
    """(per-sample loss [N], rows without NaN [N] bool) of the fake score's (guided) output on x_t = add_noise(x0,
    eps, t): the summed squared error against eps (epsilon models) or against the velocity weighted by
    snr / (snr + 1) (v-prediction). Rows with a NaN contribute 0."""
    if schedule.prediction_type == "epsilon":
        err = (out - eps) ** 2
    else:
        err = schedule._abar(t, x0) * (out - schedule.velocity(x0, eps, t)) ** 2
    rows = err.flatten(1).sum(1)
    ok = ~torch.isnan(rows)
    return torch.where(ok, rows, torch.zeros_like(rows)), ok


def drop_prompts(prompts: list[str], p: float, generator=None) -> list[str]:
    """Each prompt replaced by "" with probability p (the fake-score step when kappa1 or kappa2 is not 1: p = 0.1)."""
    if p <= 0:
        return list(prompts)
    keep = torch.rand(len(prompts), generator=generator) >= p
    return [s if k else "" for s, k in zip(prompts, keep.tolist())]


def check_guidance(cfg_train_fake: float, cfg_eval_fake: float, cfg_eval_real: float) -> float:
    """The prompt-dropout rate of the fake-score step (0.1 when kappa1 or kappa2 is not 1, else 0); guidance scales
    must be positive numbers."""
    for flag, v in (("--cfg-train-fake", cfg_train_fake), ("--cfg-eval-fake", cfg_eval_fake)):
        if not v > 0:
            raise SDError(f"{flag} {v}: a guidance scale must be > 0 (1 is no guidance).")
    if not cfg_eval_real > 0:
        raise SDError(f"--cfg-eval-real {cfg_eval_real}: a guidance scale must be > 0 (1 is no guidance).")
    return 0.1 if (cfg_train_fake != 1 or cfg_eval_fake != 1) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The model folder, text and prompts.


# The files of a diffusers Stable Diffusion folder that sid_fast reads (no fp16 variants, no safety checker), as
# `hf download` patterns.
SD_HUB_FILES = (
    "model_index.json", "'scheduler/*'", "'tokenizer/*'", "text_encoder/config.json", "text_encoder/model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
)  # fmt: skip
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def fetch_command(repo: str, local_dir: str) -> str:
    """The huggingface_hub CLI command that fetches the files sid_fast reads of the Hub repository `repo`."""
    return f"hf download {repo} --local-dir {local_dir} " + " ".join("--include " + f for f in SD_HUB_FILES)


def check_folder(folder) -> Path:
    """`folder` must be a diffusers Stable Diffusion folder (model_index.json and the five component subfolders)."""
    p = Path(folder)
    if not p.is_dir():
        if _HUB_ID.match(str(folder)) and not p.parent.is_dir():
            raise SDError(
                f"{folder}: no such folder; sid_fast reads a local diffusers folder and downloads nothing: if this is "
                f"a Hub id, fetch it with `{fetch_command(str(folder), p.name)}` and give {p.name}."
            )
        raise SDError(f"{p}: no such folder (a Stable Diffusion model folder in diffusers' format).")
    index = p / "model_index.json"
    if not index.is_file():
        raise SDError(f"{p}: not a diffusers model folder (no model_index.json).")
    try:
        spec = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SDError(f"{index}: not valid JSON ({e}).") from None
    missing = [s for s in SD_SUBFOLDERS if not (p / s).is_dir()]
    if missing or not isinstance(spec, dict) or not set(SD_SUBFOLDERS) <= set(spec):
        name = spec.get("_class_name") if isinstance(spec, dict) else None
        raise SDError(
            f"{p}: a diffusers folder of {name or 'an unknown pipeline'}, not Stable Diffusion (needs "
            f"{', '.join(SD_SUBFOLDERS)}; missing {', '.join(missing) or 'their entries in model_index.json'})."
        )
    return p


@dataclass
class StableDiffusion:
    """The components of a Stable Diffusion folder (frozen, eval mode) and its schedule."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: Schedule
    folder: Path

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device=None) -> torch.Tensor:
        """[N, model_max_length, dim]: prompts padded to the tokenizer's maximum length and truncated beyond it, the
        text encoder's last hidden state."""
        device = device or next(self.text_encoder.parameters()).device
        if self.tokenizer is None:  # memory accounting on the meta device (bench.memory): token ids have no values
            tokens = self.text_encoder.config.max_position_embeddings
            return self.text_encoder(torch.zeros([len(prompts), tokens], dtype=torch.long, device=device))[0]
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.encode_ids(ids, device)

    def encode_ids(self, ids: torch.Tensor, device=None) -> torch.Tensor:
        """The text encoder's last hidden state of token ids [N, model_max_length] (on the host: pinned and copied
        without blocking on CUDA)."""
        device = device or next(self.text_encoder.parameters()).device
        if torch.device(device).type == "cuda":  # pinned, so that the copy does not wait for the device
            ids = ids.pin_memory()
        return self.text_encoder(ids.to(device, non_blocking=True))[0]


class _ConfigOnly:
    """A UNet's config without its weights (load_sd(unet=False))."""

    def __init__(self, config: dict):
        self.config = types.SimpleNamespace(**config)


def load_sd(folder, device="cpu", dtype=torch.float32, unet: bool = True) -> StableDiffusion:
    """The components of a local diffusers Stable Diffusion folder, checked against each other; every fault is one
    SDError sentence naming the folder. unet=False leaves the UNet out (sampling a distilled generator needs only the
    text encoder, the VAE and the schedule): its config is read for the checks, its weights are not."""
    p = check_folder(folder)
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise SDError(f"{p}: Stable Diffusion teachers need diffusers and transformers ({e}).") from None
    try:
        if unet:
            unet = UNet2DConditionModel.from_pretrained(str(p), subfolder="unet", torch_dtype=dtype)
        else:  # the config only, as an object with .config (no weights read)
            unet = _ConfigOnly(UNet2DConditionModel.load_config(str(p), subfolder="unet"))
        vae = AutoencoderKL.from_pretrained(str(p), subfolder="vae", torch_dtype=dtype)
        text_encoder = load_transformers_model(CLIPTextModel, p, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer")
        schedule = Schedule.from_folder(p)
    except SDError as e:
        raise SDError(f"{p}/scheduler: {e}") from None
    except Exception as e:  # diffusers/transformers: missing or corrupt weights and configs
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SDError(f"{p}: a component does not load ({type(e).__name__}: {reason}).") from None
    if vae.config.latent_channels != unet.config.in_channels or unet.config.out_channels != unet.config.in_channels:
        raise SDError(
            f"{p}: the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes "
            f"{unet.config.in_channels} and returns {unet.config.out_channels} channels."
        )
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise SDError(
            f"{p}: the text encoder's width {text_encoder.config.hidden_size} is not the UNet's cross-attention "
            f"width {unet.config.cross_attention_dim}."
        )
    for m in (unet, vae, text_encoder):
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, p)
