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

from sid_fast.checkpoints import CheckpointError, atomic_write_text, plain_value
from sid_fast.storage import atomic_folder
from sid_fast.t2i.sd import SDError, load_sd, unet_model

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name
CONFIG = "config.json"
SID_META = "sid_fast.json"
CARD = "README.md"
FOLDER_FILES = (WEIGHTS, CONFIG, SID_META, CARD)
INDEX = "model_index.json"  # a diffusers pipeline folder
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "vae")  # taken from the teacher's folder
PIPELINE_FILES = (INDEX, SID_META, CARD, "unet", *COMPONENTS)


def seed_latents(seeds, shape) -> torch.Tensor:
    """[len(seeds), *shape]: z of seed s is torch.randn(shape) from torch.Generator().manual_seed(s) (CPU), so a
    (prompt, seed) pair gives the same image on any device and batch size."""
    return torch.stack([torch.randn(list(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def onestep_latents(unet, schedule, z: torch.Tensor, cond: torch.Tensor, init_timestep: int) -> torch.Tensor:
    """The generator's latents: the x0-prediction of `unet` at init_timestep on sqrt(1 - abar) z (fp32)."""
    t = torch.full([z.shape[0]], int(init_timestep), dtype=torch.long, device=z.device)
    x = schedule.generator_input(z, t)
    dtype = next(unet.parameters()).dtype  # a UNet cast to fp16/bf16 for sampling: its inputs too, x0 in fp32
    out = unet_model(unet)(x.to(dtype), t, cond.to(dtype))
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


def model_card(meta: dict, where: str = "PATH") -> str:
    teacher = meta.get("teacher") or "TEACHER_FOLDER"
    t = meta.get("init_timestep")
    facts = [(k, meta.get(k)) for k in ("teacher", "preset", "kimg", "guidance", "alpha", "init_timestep", "metrics")]
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [sid-lsg, one-step, text-to-image, score-identity-distillation]",
        "---",
        "",
        "# One-step text-to-image generator distilled with SiD-LSG (sid_fast)",
        "",
        "A Stable Diffusion UNet (diffusers' `UNet2DConditionModel`) that makes an image in one call: the latents are",
        f"its x0-prediction at timestep {t} on sqrt(1 - abar_{t}) z, decoded by the teacher's VAE.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts if v is not None],
        "",
        "## One step with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline, UNet2DConditionModel",
        "",
        f'unet = UNet2DConditionModel.from_pretrained("{where}")',
        f'pipe = StableDiffusionPipeline.from_pretrained("{teacher}", unet=unet, safety_checker=None)',
        f"t = {t}",
        "abar = pipe.scheduler.alphas_cumprod[t]",
        "emb = pipe.encode_prompt(['a photo of a cat'], 'cpu', 1, False)[0]",
        "z = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,",
        "                generator=torch.Generator().manual_seed(0))",
        "x = (1 - abar).sqrt() * z",
        "with torch.no_grad():",
        "    eps = unet(x, torch.tensor([t]), encoder_hidden_states=emb).sample",
        "    latents = (x - (1 - abar).sqrt() * eps) / abar.sqrt()",
        "    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # [-1, 1]",
        "```",
        "",
        'References: Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation for Data-Free One-Step',
        'Text-to-Image Generation", ICLR 2025; Zhou et al., "Score identity Distillation", ICML 2024.',
        "",
    ]
    return "\n".join(lines)


def save_unet_folder(path, unet, overwrite: bool = False, **meta) -> Path:
    """`unet` (fp32, on the CPU) as a diffusers UNet folder with sid_fast.json and a model card, written atomically
    (sid_fast.storage.atomic_folder)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        unet.save_config(str(tmp))
        (tmp / SID_META).write_text(json.dumps(dict(format="sid_fast.t2i", **plain_value(meta)), indent=2) + "\n")
        (tmp / CARD).write_text(model_card(meta))

    return atomic_folder(path, fill, CheckpointError, own=FOLDER_FILES, overwrite=overwrite)


def update_unet_meta(path, **meta) -> None:
    """Set entries of a generator folder's sid_fast.json (e.g. a snapshot's metrics once evaluated) and rewrite its
    model card, each atomically; the weights are not touched."""
    path = Path(path)
    full = dict(json.loads((path / SID_META).read_text()), **plain_value(meta))
    atomic_write_text(path / SID_META, json.dumps(full, indent=2) + "\n")
    atomic_write_text(path / CARD, model_card({k: v for k, v in full.items() if k != "format"}))


def is_generator_folder(path) -> bool:
    """A text-to-image generator folder of sid_fast: a UNet folder (save_unet_folder) or a pipeline folder
    (save_pipeline_folder), both marked by sid_fast.json."""
    p = Path(path)
    return p.is_dir() and (p / SID_META).is_file() and ((p / CONFIG).is_file() or (p / INDEX).is_file())


def is_pipeline_folder(path) -> bool:
    return is_generator_folder(path) and (Path(path) / INDEX).is_file()


def load_unet_folder(path, device="cpu"):
    """(UNet2DConditionModel in eval mode, sid_fast.json's meta) of a folder written by save_unet_folder, or of the
    unet/ of a pipeline folder written by save_pipeline_folder."""
    from diffusers import UNet2DConditionModel

    p = Path(path)
    if is_pipeline_folder(p):
        meta = json.loads((p / SID_META).read_text())
        try:
            unet = UNet2DConditionModel.from_pretrained(str(p), subfolder="unet")
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SDError(f"{p}: the generator does not load ({type(e).__name__}: {reason}).") from None
        return unet.to(device).eval().requires_grad_(False), meta
    if not (p / CONFIG).is_file() or not (p / SID_META).is_file():
        raise SDError(f"{p}: not a sid_fast text-to-image generator folder (needs {CONFIG} and {SID_META}).")
    try:
        meta = json.loads((p / SID_META).read_text())
        unet = UNet2DConditionModel.from_pretrained(str(p))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SDError(f"{p}: the generator does not load ({type(e).__name__}: {reason}).") from None
    return unet.to(device).eval().requires_grad_(False), meta


def save_pipeline_folder(path, unet_folder, teacher, overwrite: bool = False) -> Path:
    """A full diffusers Stable Diffusion pipeline folder (StableDiffusionPipeline.from_pretrained loads it): the
    teacher's scheduler, text encoder, tokenizer and VAE, copied, with the distilled UNet of `unet_folder` as unet/;
    its model_index.json is the teacher's without the safety checker and feature extractor (sid_fast reads neither);
    sid_fast.json (how the generator samples) and a model card at the top. Written atomically."""
    unet_folder, teacher = Path(unet_folder), Path(teacher)
    unet, meta = load_unet_folder(unet_folder)
    sd = load_sd(teacher, unet=False)
    mine, theirs = dict(unet.config), sd.unet.config
    for key in ("in_channels", "sample_size", "cross_attention_dim"):
        if mine.get(key) != getattr(theirs, key, None):
            raise SDError(
                f"{unet_folder}: the generator's {key} {mine.get(key)} is not the teacher {teacher}'s "
                f"{getattr(theirs, key, None)}; give the teacher it was distilled from."
            )
    index = json.loads((teacher / INDEX).read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    meta = {k: v for k, v in meta.items() if k != "format"}

    def fill(tmp: Path) -> None:
        for name in COMPONENTS:
            shutil.copytree(teacher / name, tmp / name)
        (tmp / "unet").mkdir()
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(unet_folder / name, tmp / "unet" / name)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / SID_META).write_text(json.dumps(dict(format="sid_fast.t2i", **plain_value(meta)), indent=2) + "\n")
        (tmp / CARD).write_text(model_card(meta))

    return atomic_folder(path, fill, CheckpointError, own=PIPELINE_FILES, overwrite=overwrite)
