"""A text-to-image Stable Diffusion of the bundled 8x8 digits, small enough for SiD-LSG on a laptop: prompts such as
"a handwritten seven" or "the number 7" condition a diffusers `UNet2DConditionModel` through a CLIP text encoder, on
the latents of an `AutoencoderKL`, with SD 1.5's noise schedule. It is a diffusers Stable Diffusion folder
(sid_fast/assets/digits-sd: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so every piece of
sid_fast's SiD-LSG path runs on it as on SD 1.5, and diffusers' `StableDiffusionPipeline` samples it.

Made with this module (`python -m sid_fast.t2i.digits build`), from scratch on the 1,797 digits:
1. a word-level CLIP tokenizer of the prompts' words (byte symbols plus one BPE merge chain per word);
2. the VAE (1-channel 8x8 images <-> 4x8x8 latents, no downsampling), trained on reconstruction with a small KL
   term; its scaling factor is 1 / the standard deviation of the digits' latents (as SD's 0.18215 was chosen);
3. the UNet and the text encoder trained together on the epsilon-prediction loss of DDPM (SD's training objective:
   uniform t in [0, 1000), scaled-linear betas 0.00085..0.012), a random prompt of the image's digit for each image,
   10% of them replaced by "" so that classifier-free guidance works; the EMA weights are saved;
4. the teacher evaluated with 25-step DDIM at each guidance scale of the kappa sweep (teacher_metrics.json).

Metrics (the CPU stand-ins of FID-30k and CLIP score): FD-digits (sid_fast.metrics.digits) of decoded images, and
prompt accuracy: the share of images whose digit, by the FD-digits classifier, is the prompt's digit.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from sid_fast.data.digits import digits_tensor
from sid_fast.hf import load_transformers_model
from sid_fast.metrics.digits import digits_features, fd_digits, load_feature_net
from sid_fast.t2i.export import seed_latents
from sid_fast.t2i.sd import Schedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FOLDER = ASSETS / "digits-sd"
PROMPT_FILE = ASSETS / "digits-prompts.txt"
TEACHER_METRICS = "teacher_metrics.json"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {w}",
    "the digit {w}",
    "a drawing of the number {w}",
    "the number {d}",
    "a scanned {d}",
    "{w}",
)
MAX_TOKENS = 8  # the longest prompt ("a drawing of the number seven") is 6 words, plus start and end tokens
SWEEP_KAPPAS = (1.0, 1.5, 2.0, 3.0, 4.5)

# SD 1.5's scheduler/scheduler_config.json (a PNDM config that SiD-LSG, like SD's training, reads as DDPM; its
# clip_sample false is added when the folder is written: without it DDPM and DDIM clamp x0-predictions to [-1, 1]).
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(32,),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=8,
)
# Levels 8x8 and 4x4; cross-attention to the prompt at 4x4 and in the middle block; 985,444 parameters.
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=16,
    norm_num_groups=8,
)


# ----------------------------------------------------------------------------------------------------------------
# Prompts.


def prompt_text(template: int, digit: int) -> str:
    return TEMPLATES[template].format(w=WORDS[digit], d=digit)


def all_prompts() -> list[tuple[str, int]]:
    """Every (prompt, digit): each template for each digit (60)."""
    return [(prompt_text(k, d), d) for k in range(len(TEMPLATES)) for d in range(10)]


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt names (its last digit word or numeral), None when it names none."""
    found = [WORDS.index(w) if w in WORDS else int(w) for w in re.findall(r"[a-z]+|\d", prompt.lower())
             if w in WORDS or w.isdigit()]  # fmt: skip
    return found[-1] if found else None


def eval_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    """(prompts, digits) of the metrics: image i shows digit i % 10 in template (i // 10) % 6, so any 60 consecutive
    images hold every prompt once and any 10 every digit."""
    pairs = [(prompt_text((i // 10) % len(TEMPLATES), i % 10), i % 10) for i in range(n)]
    return [p for p, _ in pairs], torch.tensor([d for _, d in pairs])


def write_prompt_file(path=PROMPT_FILE) -> Path:
    path = Path(path)
    path.write_text("".join(p + "\n" for p, _ in all_prompts()))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Components.


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters (the tokenizer's base vocabulary)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(256 + n))
        n += b not in keep
    return out


def prompt_words() -> list[str]:
    words = {w for p, _ in all_prompts() for w in p.split()}
    return sorted(words)


def write_tokenizer(folder) -> object:
    """A CLIPTokenizer whose every prompt word is one token: the byte symbols (with and without CLIP's end-of-word
    mark), then per word the chain of merges that joins its letters left to right; saved with save_pretrained."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges = []
    for word in prompt_words():
        if len(word) == 1:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = f"{left} {right}"
            left = left + right
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    for word in prompt_words():
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"the tokenizer splits {word!r} into {len(ids)} tokens")
    tok.save_pretrained(str(folder))
    return tok


def build(folder, seed: int = 0):
    """(tokenizer, text encoder, VAE, UNet, scheduler) with random weights; the tokenizer is written to folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = write_tokenizer(Path(folder) / "tokenizer")
    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **TEXT,
        )
    )
    return tok, text, AutoencoderKL(**VAE), UNet2DConditionModel(**UNET), PNDMScheduler(**SD15_SCHEDULER)


# ----------------------------------------------------------------------------------------------------------------
# Training.


def train_vae(vae, images: torch.Tensor, *, steps: int, batch: int, lr: float, kl: float, seed: int, log=print):
    """Reconstruction (mean squared error) + kl * KL(posterior || N(0, I)), Adam; returns the reconstruction RMSE of
    the posterior means over all images."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        x = images[torch.randint(len(images), [batch], generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + kl * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        rmse = (vae.decode(post.mean).sample - images).square().mean().sqrt().item()
        scale = 1.0 / post.mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    return rmse


def train_unet(unet, text, tok, vae, schedule, images, labels, *, steps, batch, lr, ema_beta, seed, log=print):
    """DDPM's epsilon-prediction loss on the scaled VAE latents (a posterior sample per image per step), the UNet and
    the text encoder together, prompts drawn per image (10% ""); returns the EMA copies (unet, text)."""
    g = torch.Generator().manual_seed(seed)
    pairs = all_prompts()
    by_digit = [[p for p, d in pairs if d == k] for k in range(10)]
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        mean, std = post.mean, post.std
    scale = vae.config.scaling_factor
    nets = torch.nn.ModuleDict(dict(unet=unet, text=text)).train().requires_grad_(True)
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=lr, weight_decay=0.0)
    abar = schedule.alphas_cumprod
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), [batch], generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        pick = torch.randint(len(TEMPLATES), [batch], generator=g).tolist()
        drop = (torch.rand([batch], generator=g) < 0.1).tolist()
        prompts = ["" if dr else by_digit[int(labels[i])][k] for i, k, dr in zip(idx.tolist(), pick, drop)]
        t = torch.randint(0, len(abar), [batch], generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ids = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        states = nets["text"](ids.input_ids)[0]
        loss = F.mse_loss(nets["unet"](x_t, t, states).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), nets.parameters()):
                pe.lerp_(p, 1 - ema_beta)
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return ema["unet"], ema["text"]


def save_folder(folder, tok, text, vae, unet, scheduler) -> Path:
    """The components as StableDiffusionPipeline.save_pretrained lays them out (no safety checker)."""
    folder = Path(folder)
    unet.save_pretrained(str(folder / "unet"))
    vae.save_pretrained(str(folder / "vae"))
    text.save_pretrained(str(folder / "text_encoder"))
    tok.save_pretrained(str(folder / "tokenizer"))
    write_index_and_scheduler(folder, scheduler)
    return folder


def write_index_and_scheduler(folder, scheduler) -> None:
    """scheduler/ (with SD 1.5's clip_sample false, a key PNDM ignores, added) and model_index.json as
    StableDiffusionPipeline.save_pretrained writes them without a safety checker."""
    folder = Path(folder)
    scheduler.save_pretrained(str(folder / "scheduler"))
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), clip_sample=False), indent=2) + "\n")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Images [N, 1, 8, 8] in [-1, 1] (fp32, CPU) of latents, by the VAE (latents / scaling_factor + shift_factor,
    the latter where the VAE has one, as SD3's)."""
    dev = next(vae.parameters()).device
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    out = [
        vae.decode(latents[i : i + batch].to(dev, torch.float32) / scale + shift).sample.float().cpu()
        for i in range(0, len(latents), batch)
    ]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def teacher_metric(folder, key: str, kappa: float) -> tuple[float | None, str]:
    """(value, label) of a digits teacher's metric at guidance kappa from its folder's teacher_metrics.json; (None,
    "") when the folder has none."""
    try:
        rows = json.loads((Path(folder) / TEACHER_METRICS).read_text()).get("teacher", [])
    except (OSError, ValueError, AttributeError):
        return None, ""
    for row in rows:
        if row.get("kappa") == kappa and key in row:
            return row[key], f"teacher, {row.get('sampler', '')}, kappa {row['kappa']:g}"
    return None, ""


def score_images(images: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """{"fd_digits": FD-digits against all digits, "prompt_acc": share classified as the prompt's digit}."""
    net = load_feature_net()
    logits = net.head(F.silu(digits_features(images)))
    acc = (logits.argmax(1) == digits.to(logits.device)).float().mean().item()
    return dict(fd_digits=fd_digits(images), prompt_acc=acc)


def pipeline(folder=FOLDER, scheduler: str = "ddim"):
    """diffusers' StableDiffusionPipeline of the folder (DDIM scheduler by default)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = load_transformers_model(CLIPTextModel, folder, subfolder="text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), text_encoder=text_encoder, safety_checker=None, requires_safety_checker=False
    )
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def teacher_images(pipe, prompts: list[str], seeds, kappa: float, steps: int = 25, batch: int = 500,
                   latent_shape=(UNET["in_channels"], UNET["sample_size"], UNET["sample_size"]),
                   **call) -> torch.Tensor:  # fmt: skip
    """A digits teacher's images [N, 1, 8, 8] in [-1, 1] by its diffusers pipeline (guidance kappa; kappa 1 is
    unguided), z of seed s from torch.Generator().manual_seed(s) in `latent_shape`; `call`: more pipeline arguments."""
    out = []
    seeds = list(seeds)
    for i in range(0, len(prompts), batch):
        lat = pipe(
            prompts[i : i + batch],
            height=8,
            width=8,
            num_inference_steps=steps,
            guidance_scale=kappa,
            latents=seed_latents(seeds[i : i + batch], list(latent_shape)),
            output_type="latent",
            **call,
        ).images
        out.append(decode_images(pipe.vae, lat))
    return torch.cat(out)


def evaluate_teacher(folder=FOLDER, kappas=SWEEP_KAPPAS, num: int = 2000, steps: int = 25, log=print) -> list[dict]:
    return sweep_teacher(pipeline(folder), teacher_images, kappas, num, steps, f"ddim{steps}", log)


def sweep_teacher(pipe, images, kappas, num: int, steps: int, sampler: str, log=print) -> list[dict]:
    """FD-digits and prompt accuracy of a digits teacher's pipeline at each guidance scale, images(pipe, prompts,
    seeds, kappa, steps) making them: image i for eval_prompts' prompt i and seed 10,000,000 + i."""
    prompts, labels = eval_prompts(num)
    rows = []
    for kappa in kappas:
        t0 = time.time()
        scores = score_images(images(pipe, prompts, range(10_000_000, 10_000_000 + num), kappa, steps), labels)
        rows.append(dict(kappa=kappa, sampler=sampler, num=num, **scores))
        log(f"teacher kappa {kappa:g}: {json.dumps(scores)} ({time.time() - t0:.0f} s)")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# CLI.


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """The text-to-image digits teacher (a diffusers Stable Diffusion folder)."""


@main.command("build")
@click.option("--out", default=None, metavar="DIR", help="[default: the bundled sid_fast/assets/digits-sd]")
@click.option("--vae-steps", type=click.IntRange(min=1), default=1500, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=4000, show_default=True, help="UNet training steps")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-num", type=click.IntRange(min=0), default=2000, show_default=True, help="0: no evaluation")
def build_cmd(out, vae_steps, steps, batch, lr, seed, eval_num):
    """Train the VAE, then the UNet and the text encoder, on the digits; write the folder and its prompt file."""
    folder = Path(out) if out else FOLDER
    images, labels = digits_tensor()
    tok, text, vae, unet, scheduler = build(folder, seed)
    rmse = train_vae(vae, images, steps=vae_steps, batch=256, lr=1e-3, kl=1e-3, seed=seed)
    print(f"vae: reconstruction RMSE {rmse:.4f} (images in [-1, 1]), scaling factor {vae.config.scaling_factor:.4f}")
    unet, text = train_unet(
        unet, text, tok, vae, Schedule(scheduler), images, labels,
        steps=steps, batch=batch, lr=lr, ema_beta=0.999, seed=seed,
    )  # fmt: skip
    save_folder(folder, tok, text, vae, unet, scheduler)
    if out is None:
        write_prompt_file()
    cmd = (
        f"python -m sid_fast.t2i.digits build --vae-steps {vae_steps} --steps {steps} --batch {batch} --lr {lr} "
        f"--seed {seed}"
    )
    meta = dict(command=cmd, vae_rmse=rmse, teacher=[])
    if eval_num:
        meta["teacher"] = evaluate_teacher(folder, num=eval_num)
    (folder / TEACHER_METRICS).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {folder}")


@main.command("evaluate")
@click.option("--teacher", default=None, metavar="DIR", help="[default: the bundled sid_fast/assets/digits-sd]")
@click.option("--guidance", default="1,1.5,2,3,4.5", show_default=True, help="Comma-separated kappas")
@click.option("--num", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True, help="DDIM steps")
def evaluate_cmd(teacher, guidance, num, steps):
    """FD-digits and prompt accuracy of the teacher with DDIM at each guidance scale (JSON lines)."""
    kappas = [float(k) for k in guidance.split(",")]
    for row in evaluate_teacher(teacher or FOLDER, kappas, num, steps, log=lambda s: None):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
