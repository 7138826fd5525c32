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

SDXL folders (text_encoder_2/ and tokenizer_2/ in model_index.json: `CLIPTextModelWithProjection`, a UNet with
addition_embed_type "text_time") are read as diffusers' StableDiffusionXLPipeline reads them: each encoder's
penultimate hidden state, concatenated (768 + 1280 = 2048 wide), the second encoder's projected pooled embedding
(`text_embeds`) and the size conditioning `time_ids` = (H, W, 0, 0, H, W) at the UNet's own image size (no crop);
the unconditional input is all zeros when model_index.json's force_zeros_for_empty_prompt is true (SDXL-base's, and
the pipeline's default; DMD2's SDXL loop does the same), else the encoded "". No official SiD code distills SDXL:
SiD-LSG's iteration runs on it unchanged.

Everything runs in the dtype it is given; the tests run it in float64 against diffusers' own scheduler.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sid_fast import fewstep
from sid_fast.hf import load_transformers_model

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")  # an SDXL folder's second text encoder
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

    def fewstep(self, denoise, z: torch.Tensor, init_timestep: int, steps: int, run: int | None = None,
                noise_type: str = "fresh", generator=None, train_last: bool = False, noises=None):  # fmt: skip
        """D_{run-1} of the K-step generator (K = `steps`) at timesteps sid_fast.fewstep.timestep_indices(init_timestep,
        K): x_i = sqrt(abar) D_{i-1} + sqrt(1 - abar) n_i (step 0: generator_input), D_i = denoise(x_i, t_i [N]); the
        rest as sid_fast.fewstep.generate."""
        levels = [torch.full([z.shape[0]], t, dtype=torch.long, device=z.device)
                  for t in fewstep.timestep_indices(init_timestep, steps)]  # fmt: skip

        def scale(t):
            a = self._abar(t, z)
            return a**0.5, (1 - a) ** 0.5

        return fewstep.generate(denoise, scale, levels, z, run, noise_type, generator, train_last, noises)

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
SDXL_HUB_FILES = SD_HUB_FILES + ("text_encoder_2/config.json", "text_encoder_2/model.safetensors", "'tokenizer_2/*'")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def fetch_command(repo: str, local_dir: str, xl: bool = False) -> str:
    """The huggingface_hub CLI command that fetches the files sid_fast reads of the Hub repository `repo` (`xl`: an
    SDXL repository, with its second text encoder)."""
    files = SDXL_HUB_FILES if xl else SD_HUB_FILES
    return f"hf download {repo} --local-dir {local_dir} " + " ".join("--include " + f for f in files)


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
    need = SD_SUBFOLDERS + (XL_SUBFOLDERS if isinstance(spec, dict) and "text_encoder_2" in spec else ())
    missing = [s for s in need if not (p / s).is_dir()]
    if missing or not isinstance(spec, dict) or not set(need) <= set(spec):
        name = spec.get("_class_name") if isinstance(spec, dict) else None
        raise SDError(
            f"{p}: a diffusers folder of {name or 'an unknown pipeline'}, not Stable Diffusion (needs "
            f"{', '.join(need)}; missing {', '.join(missing) or 'their entries in model_index.json'})."
        )
    return p


@dataclass
class StableDiffusion:
    """The components of a Stable Diffusion folder (frozen, eval mode) and its schedule; SDXL's second text encoder
    and tokenizer when the folder has them (see the module docstring)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: Schedule
    folder: Path
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    zero_uncond: bool = False  # SDXL's force_zeros_for_empty_prompt: the unconditional input is zeros
    _time_ids: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> SDXL's size conditioning

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2) if self.xl else (self.tokenizer,)

    @property
    def image_size(self) -> int:
        """The pixel side of the UNet's latents (the VAE halves the side per level after the first)."""
        return self.latent_resolution * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def text_to(self, device) -> None:
        """The text encoder(s) to `device`."""
        for m in (self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device=None):
        """The conditioning of prompts, padded to the tokenizer's maximum length and truncated beyond it: the text
        encoder's last hidden state [N, model_max_length, dim]; SDXL: a dict of the UNet's inputs (module
        docstring)."""
        device = device or next(self.text_encoder.parameters()).device
        if self.tokenizer is None:  # memory accounting on the meta device (bench.memory): token ids have no values
            tokens = self.text_encoder.config.max_position_embeddings
            ids = torch.zeros([len(prompts), tokens], dtype=torch.long, device=device)
            return self.encode_ids((ids, ids) if self.xl else ids, device)
        ids = [
            tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]  # fmt: skip
        return self.encode_ids(tuple(ids) if self.xl else ids[0], device)

    def encode_ids(self, ids, device=None):
        """The conditioning of token ids [N, model_max_length] (SDXL: a pair, one per tokenizer), from the host:
        pinned and copied without blocking on CUDA."""
        device = device or next(self.text_encoder.parameters()).device

        def moved(x):
            if torch.device(device).type == "cuda" and x.device.type == "cpu":  # pinned: the copy does not wait
                x = x.pin_memory()
            return x.to(device, non_blocking=True)

        if not self.xl:
            return self.text_encoder(moved(ids))[0]
        one = self.text_encoder(moved(ids[0]), output_hidden_states=True)
        two = self.text_encoder_2(moved(ids[1]), output_hidden_states=True)
        states = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        return dict(encoder_hidden_states=states, text_embeds=two.text_embeds, time_ids=self.time_ids(states))

    def time_ids(self, like: torch.Tensor) -> torch.Tensor:
        """SDXL's size conditioning [N, 6] = (H, W, 0, 0, H, W) at the UNet's image size, in `like`'s dtype (made on
        the device once per dtype: a step copies nothing from the host)."""
        key = (like.device, like.dtype)
        if key not in self._time_ids:
            size = float(self.image_size)
            self._time_ids[key] = torch.tensor([size, size, 0.0, 0.0, size, size], dtype=like.dtype).to(like.device)
        return self._time_ids[key].expand(like.shape[0], 6)

    @torch.no_grad()
    def encode_uncond(self, device=None):
        """The unconditional input of guidance, batch 1: the encoded "" (SDXL with force_zeros_for_empty_prompt:
        zeros in place of the text states and the pooled embedding, the same size conditioning)."""
        cond = self.encode_text([""], device)
        if self.zero_uncond:
            cond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]),
                        text_embeds=torch.zeros_like(cond["text_embeds"]))  # fmt: skip
        return cond


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
        index = json.loads((p / "model_index.json").read_text())
        text_encoder_2 = tokenizer_2 = None
        if "text_encoder_2" in index:  # SDXL
            from transformers import CLIPTextModelWithProjection

            text_encoder_2 = load_transformers_model(CLIPTextModelWithProjection, p, subfolder="text_encoder_2",
                                                     torch_dtype=dtype)  # fmt: skip
            tokenizer_2 = CLIPTokenizer.from_pretrained(str(p), subfolder="tokenizer_2")
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
    _check_text(p, unet.config, text_encoder.config, text_encoder_2.config if text_encoder_2 is not None else None)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
    zero_uncond = text_encoder_2 is not None and bool(index.get("force_zeros_for_empty_prompt", True))
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, p, text_encoder_2, tokenizer_2, zero_uncond)


def _check_text(p: Path, unet, text, text_2) -> None:
    """The text encoder(s) must make what the UNet reads: the cross-attention width (SDXL: both encoders' widths
    together), and for SDXL's "text_time" conditioning the pooled width plus six size numbers."""
    text_time = getattr(unet, "addition_embed_type", None) == "text_time"
    if text_time and text_2 is None:
        raise SDError(f"{p}: the UNet is an SDXL UNet (addition_embed_type text_time) but the folder has no "
                      "text_encoder_2 in model_index.json.")  # fmt: skip
    width = text.hidden_size + (text_2.hidden_size if text_2 is not None else 0)
    which = "text encoders' widths together" if text_2 is not None else "text encoder's width"
    if width != unet.cross_attention_dim:
        raise SDError(f"{p}: the {which} {width} is not the UNet's cross-attention width {unet.cross_attention_dim}.")
    if text_2 is not None:
        if not text_time:
            kind = getattr(unet, "addition_embed_type", None)
            raise SDError(
                f"{p}: the folder has a text_encoder_2 but its UNet takes no pooled text embedding "
                f"(addition_embed_type {kind!r}, SDXL's is text_time)."
            )
        want = unet.projection_class_embeddings_input_dim
        got = 6 * unet.addition_time_embed_dim + text_2.projection_dim
        if want != got:
            raise SDError(
                f"{p}: the UNet's added embedding takes {want} numbers, but text_encoder_2's pooled width "
                f"{text_2.projection_dim} and six size numbers of {unet.addition_time_embed_dim} make {got}."
            )
