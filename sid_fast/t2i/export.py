"""The distilled text-to-image generator as diffusers users take it: a UNet folder (diffusers' own config.json and
diffusion_pytorch_model.safetensors, loadable with `UNet2DConditionModel.from_pretrained`) plus sid_fast.json (how it
samples: the init timestep; how it was made) and a model card with a one-step sampling snippet; and the one-step
sampler itself (official sid_sd_sampler with one step): x_T = sqrt(1 - abar_t) z at t = init_timestep, the sample is
the UNet's x0-prediction at (x_T, t), decoded by the teacher's VAE as latents / scaling_factor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sid_fast import fewstep
from sid_fast.checkpoints import CheckpointError, atomic_write_text, plain_value
from sid_fast.storage import atomic_folder
from sid_fast.t2i import pickles
from sid_fast.t2i.sd import SDError, load_sd, map_cond, unet_model

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name
CONFIG = "config.json"
SID_META = "sid_fast.json"
CARD = "README.md"
FOLDER_FILES = (WEIGHTS, CONFIG, SID_META, CARD)
INDEX = "model_index.json"  # a diffusers pipeline folder
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "vae")  # a pipeline's besides the UNet
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # an SDXL pipeline's second text encoder
PIPELINE_FILES = (INDEX, SID_META, CARD, "unet", *COMPONENTS, *XL_COMPONENTS)


def seed_latents(seeds, shape) -> torch.Tensor:
    """[len(seeds), *shape]: z of seed s is torch.randn(shape) from torch.Generator().manual_seed(s) (CPU), so a
    (prompt, seed) pair gives the same image on any device and batch size."""
    return seed_noises(seeds, shape, 1)[0]


def seed_noises(seeds, shape, steps: int):
    """(z [N, *shape], [re-noising of step i, [N, *shape]] for i = 1..K-1) of a K-step generator: per seed, z then
    each step's noise drawn in order from torch.Generator().manual_seed(seed) on the CPU (z is seed_latents')."""
    per = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        per.append([torch.randn(list(shape), generator=g) for _ in range(steps)])
    z = torch.stack([p[0] for p in per])
    return z, [torch.stack([p[i] for p in per]) for i in range(1, steps)]


@torch.no_grad()
def generator_latents(unet, schedule, z: torch.Tensor, cond, init_timestep: int, steps: int = 1,
                      noise_type: str = "fresh", noises=None) -> torch.Tensor:  # fmt: skip
    """The latents of a K-step generator (K = `steps`; 1: onestep_latents) at schedule.fewstep's timesteps, fresh
    re-noising from `noises` (seed_noises), in the UNet's dtype with x0 in fp32."""
    if steps == 1:
        return onestep_latents(unet, schedule, z, cond, init_timestep)
    dtype = next(unet.parameters()).dtype
    model, cond = unet_model(unet), map_cond(lambda c: c.to(dtype), cond)

    def denoise(x, t):
        out = model(x.to(dtype), t, cond)
        return schedule.x0(x, out.to(torch.promote_types(out.dtype, torch.float32)), t)

    return schedule.fewstep(denoise, z, init_timestep, steps, noise_type=noise_type, noises=noises)


@torch.no_grad()
def onestep_latents(unet, schedule, z: torch.Tensor, cond, init_timestep: int) -> torch.Tensor:
    """The generator's latents: the x0-prediction of `unet` at init_timestep on sqrt(1 - abar) z (fp32); `cond`: text
    states, or SDXL's dict of UNet inputs (sid_fast.t2i.sd.StableDiffusion.encode_text)."""
    t = torch.full([z.shape[0]], int(init_timestep), dtype=torch.long, device=z.device)
    x = schedule.generator_input(z, t)
    dtype = next(unet.parameters()).dtype  # a UNet cast to fp16/bf16 for sampling: its inputs too, x0 in fp32
    out = unet_model(unet)(x.to(dtype), t, map_cond(lambda c: c.to(dtype), cond))
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    return schedule.x0(x, out, t)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    """uint8 images [N, 3, H, W] of latents, by the VAE (moved to `device` for the call, then back to where it was)."""
    home = next(vae.parameters()).device
    vae.to(device)
    try:
        out = []
        for i in range(0, len(latents), batch):
            lat = latents[i : i + batch].to(device, next(vae.parameters()).dtype)
            img = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0].float()
            out.append((img * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu())
        return torch.cat(out)
    finally:
        vae.to(home)


# The one-step scheduler of a pipeline folder: DDIM over the teacher's own betas (trained_betas: the same float32
# values, so the same alphas_cumprod bit for bit) with num_train_timesteps = t + 1, so that its single "trailing" step
# is t (round(t + 1) - 1) and the step after it is the end (alpha_prev = 1, set_alpha_to_one): scheduler.step returns
# exactly the UNet's x0-prediction (DDIM's prev_sample = sqrt(1) x0 + sqrt(0) eps). Checked bit for bit against
# onestep_latents through StableDiffusionPipeline (tests/test_sd_outputs.py). Not chosen: steps_offset = t with
# "leading" spacing (StableDiffusionPipeline resets steps_offset to 1 when it loads), LCMScheduler with
# timesteps=[t] (adds c_skip(t) x_t ~ 6e-9 x_t), DDPMScheduler with timesteps=[t] (adds 1e-10 noise at t > 0).
def onestep_scheduler(teacher_scheduler, init_timestep: int):
    """A DDIMScheduler of the teacher's noise schedule whose one step (num_inference_steps=1) is the generator's."""
    from diffusers import DDIMScheduler  # an optional dependency: text-to-image only

    betas = [float(b) for b in teacher_scheduler.betas.to(torch.float32)]  # float32 values, exact in JSON
    return DDIMScheduler.from_config(
        teacher_scheduler.config,
        trained_betas=betas,
        num_train_timesteps=int(init_timestep) + 1,
        timestep_spacing="trailing",
        steps_offset=1,  # what StableDiffusionPipeline requires (trailing spacing does not read it)
        set_alpha_to_one=True,
        clip_sample=False,
        thresholding=False,
        rescale_betas_zero_snr=False,
    )


def card_data(meta: dict):
    """The card's YAML front matter, through huggingface_hub's own classes."""
    from huggingface_hub import ModelCardData  # diffusers' own dependency

    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=meta.get("base_model"),
        license=meta.get("license"),
        tags=["sid-lsg", "score-identity-distillation", "one-step" if int(meta.get("steps", 1)) == 1 else "few-step",
              "text-to-image", "sid_fast"],
    )  # fmt: skip


def model_card(
    meta: dict, where: str, pipeline: bool, latent_shape, teacher: str | None = None, xl: bool = False
) -> str:
    """The README.md of a generator folder (huggingface_hub's ModelCard): front matter (library, pipeline tag, base
    model, license), what the generator is, how it was made, its metrics as a table, and a diffusers snippet that
    samples it as sid_fast does: the pipeline's one DDIM step at the generator's timestep on latents sqrt(1 - abar) z.
    `where`: the folder's path or Hub id; `teacher`: the base pipeline's (a UNet folder's snippet loads it); `xl`: an
    SDXL UNet, sampled by StableDiffusionXLPipeline (whose default size conditioning is the training's)."""
    from huggingface_hub import ModelCard

    if int(meta.get("steps", 1)) > 1:
        return _steps_card(meta, where, teacher)
    t = meta.get("init_timestep")
    c, h, w = latent_shape
    prompt = meta.get("example_prompt") or "a photo of a cat"
    teacher = teacher or meta.get("base_model") or meta.get("teacher") or "TEACHER"
    pipe = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    load = (
        [f'pipe = {pipe}.from_pretrained("{where}")  # its scheduler: one DDIM step at t = {t}']
        if pipeline
        else [
            f'unet = UNet2DConditionModel.from_pretrained("{where}")',
            f'pipe = {pipe}.from_pretrained("{teacher}", unet=unet{"" if xl else ", safety_checker=None"})',
            "# One DDIM step at t, ending at alpha = 1: the step returns the UNet's x0-prediction exactly.",
            "pipe.scheduler = DDIMScheduler.from_config(",
            f"    pipe.scheduler.config, trained_betas=pipe.scheduler.betas.tolist(), num_train_timesteps={t} + 1,",
            '    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)',
        ]
    )
    about = [
        "A Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) that makes an image in one call: the latents are",
        f"its x0-prediction at timestep {t} on sqrt(1 - abar_{t}) z, decoded by the teacher's VAE, with no",
        "classifier-free guidance at sampling time (the guidance was distilled into it).",
    ]
    lines = _card_head(meta, "One-step text-to-image generator", about, ("source", "converted_from"))
    lines += [
        "## Sampling with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipe}"
        if pipeline
        else f"from diffusers import DDIMScheduler, {pipe}, UNet2DConditionModel",
        "",
        *load,
        f"t = {t}  # the generator's timestep",
        "abar = pipe.scheduler.alphas_cumprod[t]",
        f"z = torch.randn(1, {c}, {h}, {w}, generator=torch.Generator().manual_seed(0))  # seed 0",
        f'prompt = "{prompt}"',
        "image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0, latents=(1 - abar).sqrt() * z).images[0]",
        'image.save("sample.png")',
        "",
        "# The pixels sid_fast.t2i.sample and the official sampler save (x * 127.5 + 128, truncated; diffusers rounds",
        "# (x + 1) * 127.5, so a pixel of `image` can differ from theirs by one level):",
        "latents = pipe(prompt, num_inference_steps=1, guidance_scale=1.0, latents=(1 - abar).sqrt() * z,",
        '               output_type="latent").images',
        "with torch.no_grad():",
        "    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample",
        "pixels = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # [1, C, H, W]",
        "```",
        "",
        f"The scheduler is DDIM over the teacher's betas with num_train_timesteps {t} + 1, so that its one step is t =",
        f"{t}; the teacher's own scheduler samples this generator wrongly (its one step is at another timestep, and",
        "its default call takes many steps from pure noise).",
        "",
        "```bash",
        f"python -m sid_fast.t2i.sample --network {where} {'' if pipeline else f'--teacher {teacher} '}"
        f'--prompt "{prompt}" --seeds 0-15 --outdir out --grid grid.png',
        "```",
        "",
        'References: Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation for Data-Free One-Step',
        'Text-to-Image Generation", ICLR 2025; Zhou et al., "Score identity Distillation", ICML 2024.',
        "",
    ]
    return str(ModelCard("\n".join(lines)))


def _card_head(meta: dict, title: str, about: list[str], more: tuple[str, ...]) -> list[str]:
    """A generator card's lines up to its sampling section: front matter, title, `about`, how it was made (the
    common facts, then `more`) and its metrics, each a table."""
    keys = ("preset", "teacher", "kimg", "guidance", "alpha", "init_timestep", *more)
    facts = [(k, meta.get(k)) for k in keys if meta.get(k) is not None]
    lines = ["---", card_data(meta).to_yaml(), "---", "", f"# {title} distilled with SiD-LSG (sid_fast)", "", *about,
             "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]  # fmt: skip
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in metrics.items()], ""]
    return lines


def _steps_card(meta: dict, where: str, teacher: str | None) -> str:
    """The README.md of a K-step generator's UNet folder: what its K calls are and sid_fast's sampler (no diffusers
    snippet: no diffusers scheduler takes its timesteps with its per-seed re-noising)."""
    from huggingface_hub import ModelCard

    k, t = int(meta["steps"]), int(meta["init_timestep"])
    teacher = teacher or meta.get("base_model") or meta.get("teacher") or "TEACHER"
    prompt = meta.get("example_prompt") or "a photo of a cat"
    about = [
        f"A Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) that makes an image in {k} calls: at timesteps",
        f"{', '.join(map(str, fewstep.timestep_indices(t, k)))} it predicts x0 from the previous prediction re-noised",
        f"({meta.get('noise_type')} noise; the first call sees sqrt(1 - abar) z), decoded by the teacher's VAE, with",
        "no classifier-free guidance at sampling time (sid_fast.fewstep; docs/few-step.md of sid_fast).",
    ]
    lines = _card_head(meta, f"{k}-step text-to-image generator", about, ("steps", "noise_type"))
    lines += [
        "## Sampling",
        "",
        "```bash",
        f'python -m sid_fast.t2i.sample --network {where} --teacher {teacher} --prompt "{prompt}" --seeds 0-15 \\',
        "    --outdir out --grid grid.png",
        "```",
        "",
        "z and each step's fresh noise come from torch.Generator().manual_seed(seed), in order; no diffusers scheduler",
        "takes these timesteps with that re-noising, so the folder has no diffusers pipeline snippet.",
        "",
    ]
    return str(ModelCard("\n".join(lines)))


def _latent_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def _meta_file(meta: dict) -> str:
    return json.dumps(dict(format="sid_fast.t2i", **plain_value(meta)), indent=2) + "\n"


def _write_unet(folder: Path, unet) -> None:
    """diffusers' UNet folder files (its config.json and the fp32 weights as safetensors) into `folder`."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    unet.save_config(str(folder))


def save_unet_folder(path, unet, overwrite: bool = False, teacher: str | None = None, **meta) -> Path:
    """`unet` (fp32, on the CPU) as a diffusers UNet folder with sid_fast.json and a model card whose snippet loads
    it from `path` with the base pipeline `teacher` (default: the meta's base_model or teacher name), written
    atomically (sid_fast.storage.atomic_folder)."""

    def fill(tmp: Path) -> None:
        _write_unet(tmp, unet)
        (tmp / SID_META).write_text(_meta_file(meta))
        (tmp / CARD).write_text(model_card(meta, str(path), False, _latent_shape(unet), teacher, is_xl(unet.config)))

    return atomic_folder(path, fill, CheckpointError, own=FOLDER_FILES, overwrite=overwrite)


def is_xl(config) -> bool:
    """Is this UNet config (a dict or diffusers' FrozenDict) an SDXL UNet (pooled text and size conditioning)?"""
    return dict(config).get("addition_embed_type") == "text_time"


def g_ema_of_state(cls, state: dict, state_path, what: str):
    """G_ema of a training state as a diffusers `cls` (built from the recorded config on the meta device, its tensors
    assigned); one CheckpointError naming the file when they do not fit the recorded `what`."""
    try:
        with torch.device("meta"):
            net = cls.from_config(state["g_init_kwargs"])
        net.load_state_dict(state["G_ema"], assign=True)
    except (RuntimeError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{state_path}: G_ema does not fit its recorded {what} ({reason}).") from None
    return net


def folder_card(path, where: str | None = None, teacher: str | None = None) -> str:
    """The model card of the generator folder at `path` (UNet or pipeline folder) naming it `where` (default: the
    path itself; a Hub id when it is pushed)."""
    path = Path(path)
    meta = {k: v for k, v in json.loads((path / SID_META).read_text()).items() if k != "format"}
    pipeline = (path / INDEX).is_file()
    config = json.loads(((path / "unet") if pipeline else path).joinpath(CONFIG).read_text())
    size = config.get("sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return model_card(meta, where or str(path), pipeline, (config.get("in_channels"), h, w), teacher, is_xl(config))


def update_unet_meta(path, **meta) -> None:
    """Set entries of a generator folder's sid_fast.json (e.g. a snapshot's metrics once evaluated) and rewrite its
    model card, each atomically; the weights are not touched."""
    path = Path(path)
    full = dict(json.loads((path / SID_META).read_text()), **plain_value(meta))
    atomic_write_text(path / SID_META, json.dumps(full, indent=2) + "\n")
    atomic_write_text(path / CARD, folder_card(path))


def is_generator_folder(path) -> bool:
    """A text-to-image generator folder of sid_fast: a UNet folder (save_unet_folder) or a pipeline folder
    (save_pipeline_folder), both marked by sid_fast.json."""
    p = Path(path)
    return p.is_dir() and (p / SID_META).is_file() and ((p / CONFIG).is_file() or (p / INDEX).is_file())


def is_pipeline_folder(path) -> bool:
    return is_generator_folder(path) and (Path(path) / INDEX).is_file()


def is_generator(path) -> bool:
    """A text-to-image generator sid_fast reads: one of its folders, or an official SiD-LSG pickle."""
    return is_generator_folder(path) or pickles.is_diffusers_pickle(path)


def load_unet_folder(path, device="cpu"):
    """(UNet2DConditionModel in eval mode, sid_fast.json's meta) of a folder written by save_unet_folder, of the unet/
    of a pipeline folder written by save_pipeline_folder, or of an official SiD-LSG pickle (`dict(ema=UNet)`, read
    without running anything from it: sid_fast.t2i.pickles)."""
    from diffusers import UNet2DConditionModel

    p = Path(path)
    if pickles.is_diffusers_pickle(p):
        try:
            return pickles.load_official_generator(p, device)
        except CheckpointError as e:
            raise SDError(str(e)) from None
    pipeline = is_pipeline_folder(p)
    if not pipeline and (not (p / CONFIG).is_file() or not (p / SID_META).is_file()):
        raise SDError(
            f"{p}: not a sid_fast text-to-image generator (a folder with {CONFIG} and {SID_META}, a pipeline folder "
            "of hub convert, or an official SiD-LSG .pkl)."
        )
    try:
        meta = json.loads((p / SID_META).read_text())
        unet = UNet2DConditionModel.from_pretrained(str(p), subfolder="unet" if pipeline else None)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SDError(f"{p}: the generator does not load ({type(e).__name__}: {reason}).") from None
    return unet.to(device).eval().requires_grad_(False), meta


def save_pipeline_folder(path, generator, teacher, overwrite: bool = False, **extra) -> Path:
    """A full diffusers Stable Diffusion pipeline folder (StableDiffusionPipeline.from_pretrained loads it; an SDXL
    teacher's, StableDiffusionXLPipeline) of the generator at `generator` (a UNet folder or an official pickle): the
    teacher's text encoder(s), tokenizer(s) and VAE, copied; the generator as unet/; the one-step scheduler
    (onestep_scheduler) as scheduler/, so that `pipe(prompt, num_inference_steps=1, guidance_scale=1.0,
    latents=sqrt(1 - abar) z)` samples it exactly as sid_fast does; a model_index.json without the safety checker and
    feature extractor (sid_fast reads neither); sid_fast.json (how it samples, how it was made, `extra` entries such as
    base_model or license) and a model card. Written atomically."""
    generator, teacher = Path(generator), Path(teacher)
    unet, meta = load_unet_folder(generator)
    sd = load_sd(teacher, unet=False)
    mine, theirs = dict(unet.config), sd.unet.config
    for key in ("in_channels", "sample_size", "cross_attention_dim", "addition_embed_type"):
        if mine.get(key) != getattr(theirs, key, None):
            raise SDError(
                f"{generator}: the generator's {key} {mine.get(key)} is not the teacher {teacher}'s "
                f"{getattr(theirs, key, None)}; give the teacher it was distilled from."
            )
    from diffusers import DDPMScheduler

    if int(meta.get("steps", 1)) > 1:
        raise SDError(
            f"{generator}: a {meta['steps']}-step generator; a pipeline folder's scheduler holds one-step generators "
            "(sample it with python -m sid_fast.t2i.sample, or share its UNet folder)."
        )
    meta = {k: v for k, v in dict(meta, **{k: v for k, v in extra.items() if v is not None}).items() if k != "format"}
    scheduler = onestep_scheduler(DDPMScheduler.from_pretrained(str(teacher), subfolder="scheduler"),
                                  meta["init_timestep"])  # fmt: skip
    index = json.loads((teacher / INDEX).read_text())
    index.update(scheduler=["diffusers", type(scheduler).__name__])
    if not sd.xl:  # StableDiffusionPipeline's optional parts, left out (SDXL's pipeline has neither)
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)

    def fill(tmp: Path) -> None:
        for name in ("text_encoder", "tokenizer", "vae", *(XL_COMPONENTS if sd.xl else ())):
            shutil.copytree(teacher / name, tmp / name)
        scheduler.save_config(str(tmp / "scheduler"))
        (tmp / "unet").mkdir()
        _write_unet(tmp / "unet", unet)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / SID_META).write_text(_meta_file(meta))
        (tmp / CARD).write_text(model_card(meta, str(path), True, _latent_shape(unet), xl=sd.xl))

    return atomic_folder(path, fill, CheckpointError, own=PIPELINE_FILES, overwrite=overwrite)
