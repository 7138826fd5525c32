"""A flow-matching text-to-image teacher of the bundled 8x8 digits, small enough for few-step SiD on a laptop: an SD3
folder (diffusers' `StableDiffusion3Pipeline` loads and samples it) whose MMDiT, `SD3Transformer2DModel`, was trained
here with the rectified-flow objective on the digits, conditioned on prompts such as "a handwritten seven" through
SD3's three text encoders. Every piece of sid_fast's flow-matching path (sid_fast.families.flow) runs on it as on
SD3-Medium.

Made with this module (`python -m sid_fast.t2i.digits_flow build`), on the 1,797 digits:
1. the digits Stable Diffusion teacher's word-level tokenizer (sid_fast.t2i.digits, 8 tokens) for all three text
   encoders, and its VAE (1x8x8 images <-> 4x8x8 latents) with shift_factor 0 (SD3's VAE has one; this one needs
   none); the VAE is reused as trained for that teacher, not trained again;
2. two `CLIPTextModelWithProjection` (width 32, projection 32: the CLIP-L and CLIP-G places) and a `T5EncoderModel`
   (width 64: the T5 place), trained from scratch with the transformer;
3. the transformer (patch 2 on 4x8x8 latents: 16 image tokens; 4 joint blocks of width 64) trained with SD3's
   objective: x_t = (1 - t) x0 + t eps, the velocity target eps - x0, t = sigmoid(n) with n ~ N(0, 1) (SD3's
   logit-normal law), a random prompt of the image's digit for each image, 10% of them "" so that guidance works; the
   EMA weights are saved;
4. the teacher evaluated with the pipeline's Euler sampler (FlowMatchEulerDiscreteScheduler, shift 1) at each
   guidance scale of the sweep, 28 steps (SD3's default), into teacher_metrics.json.

Text: every tokenizer pads to its model_max_length, 8 (sid_fast.t2i.sd3.token_length: SD3's own pad to 77), so the
conditioning is 8 CLIP tokens and 8 T5 tokens; call the pipeline with max_sequence_length=8.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import click
import torch

from sid_fast.data.digits import digits_tensor
from sid_fast.t2i import digits
from sid_fast.t2i.sd3 import encode

FOLDER = digits.ASSETS / "digits-flow"
TEACHER_METRICS = digits.TEACHER_METRICS
SWEEP_KAPPAS = (1.0, 1.5, 2.0, 3.0, 4.5)
SAMPLER_STEPS = 28
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
T5 = dict(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)
# 16 image tokens (patch 2 on 8x8), 4 joint blocks of width 64 (4 heads of 16).
TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    pos_embed_max_size=4,
)


def build(folder, seed: int = 0):
    """(tokenizer, [CLIP-L, CLIP-G, T5] with random weights, the digits SD teacher's VAE with shift_factor 0, the
    transformer with random weights, the scheduler); the tokenizer is written to folder/tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok = digits.write_tokenizer(Path(folder) / "tokenizer")
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clips = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=digits.MAX_TOKENS, **ids, **CLIP)
        )
        for _ in range(2)
    ]
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 decoder_start_token_id=tok.pad_token_id, **T5))  # fmt: skip
    vae = AutoencoderKL.from_pretrained(str(digits.FOLDER), subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    net = SD3Transformer2DModel(**TRANSFORMER)
    return tok, [*clips, t5], vae, net, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def tokenize(tok, prompts) -> torch.Tensor:
    return tok(list(prompts), padding="max_length", max_length=digits.MAX_TOKENS, truncation=True,
               return_tensors="pt").input_ids  # fmt: skip


def train(net, encoders, tok, vae, images, labels, *, steps, batch, lr, ema_beta, seed, log=print):
    """SD3's rectified-flow loss on the scaled VAE latents (a posterior sample per image per step), the transformer
    and the three text encoders together, prompts drawn per image (10% ""); returns the EMA copies."""
    g = torch.Generator().manual_seed(seed)
    pairs = digits.all_prompts()
    by_digit = [[p for p, d in pairs if d == k] for k in range(10)]
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        mean, std = post.mean, post.std
    scale = vae.config.scaling_factor
    nets = torch.nn.ModuleDict(dict(net=net, e0=encoders[0], e1=encoders[1], e2=encoders[2]))
    nets.train().requires_grad_(True)
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), [batch], generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        pick = torch.randint(len(digits.TEMPLATES), [batch], generator=g).tolist()
        drop = (torch.rand([batch], generator=g) < 0.1).tolist()
        prompts = ["" if dr else by_digit[int(labels[i])][k] for i, k, dr in zip(idx.tolist(), pick, drop)]
        t = torch.sigmoid(torch.randn([batch], generator=g))
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
        ids = tokenize(tok, prompts)
        cond = encode([nets["e0"], nets["e1"], nets["e2"]], [ids, ids, ids])
        v = nets["net"](x_t, cond["encoder_hidden_states"], cond["pooled_projections"], timestep=1000 * t,
                        return_dict=False)[0]  # fmt: skip
        loss = (v - (eps - x0)).square().mean()
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
            log(f"transformer step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return ema["net"], [ema["e0"], ema["e1"], ema["e2"]]


def save_folder(folder, tok, encoders, vae, net, scheduler) -> Path:
    """The components as StableDiffusion3Pipeline.save_pretrained lays them out: the one tokenizer saved in all three
    tokenizer places."""
    import diffusers

    folder = Path(folder)
    net.save_pretrained(str(folder / "transformer"))
    vae.save_pretrained(str(folder / "vae"))
    for i, enc in enumerate(encoders):
        enc.save_pretrained(str(folder / ("text_encoder" + ("" if i == 0 else f"_{i + 1}"))))
    for name in ("tokenizer_2", "tokenizer_3"):
        shutil.copytree(folder / "tokenizer", folder / name, dirs_exist_ok=True)
    scheduler.save_pretrained(str(folder / "scheduler"))
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def pipeline(folder=FOLDER):
    """diffusers' StableDiffusion3Pipeline of the folder (its Euler scheduler)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_images(pipe, prompts: list[str], seeds, kappa: float, steps: int = SAMPLER_STEPS,
                   batch: int = 500) -> torch.Tensor:  # fmt: skip
    """The teacher's images [N, 1, 8, 8] in [-1, 1] by the pipeline (Euler, guidance kappa; 1 is unguided), z of seed
    s from torch.Generator().manual_seed(s) (sid_fast.t2i.digits.teacher_images with SD3's latents and text length)."""
    shape = (TRANSFORMER["in_channels"], TRANSFORMER["sample_size"], TRANSFORMER["sample_size"])
    return digits.teacher_images(pipe, prompts, seeds, kappa, steps, batch, latent_shape=shape,
                                 max_sequence_length=digits.MAX_TOKENS)  # fmt: skip


def evaluate_teacher(folder=FOLDER, kappas=SWEEP_KAPPAS, num: int = 2000, steps: int = SAMPLER_STEPS,
                     log=print) -> list[dict]:  # fmt: skip
    return digits.sweep_teacher(pipeline(folder), teacher_images, kappas, num, steps, f"euler{steps}", log)


# ----------------------------------------------------------------------------------------------------------------
# CLI.


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """The flow-matching text-to-image digits teacher (a diffusers SD3 folder)."""


@main.command("build")
@click.option("--out", default=None, metavar="DIR", help="[default: the bundled sid_fast/assets/digits-flow]")
@click.option("--steps", type=click.IntRange(min=1), default=5000, show_default=True, help="Training steps")
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-num", type=click.IntRange(min=0), default=2000, show_default=True, help="0: no evaluation")
def build_cmd(out, steps, batch, lr, seed, eval_num):
    """Train the transformer and the text encoders on the digits (the digits SD teacher's VAE and tokenizer); write
    the folder and its teacher_metrics.json."""
    folder = Path(out) if out else FOLDER
    images, labels = digits_tensor()
    tok, encoders, vae, net, scheduler = build(folder, seed)
    net, encoders = train(net, encoders, tok, vae, images, labels, steps=steps, batch=batch, lr=lr, ema_beta=0.999,
                          seed=seed)  # fmt: skip
    save_folder(folder, tok, encoders, vae, net, scheduler)
    cmd = f"python -m sid_fast.t2i.digits_flow build --steps {steps} --batch {batch} --lr {lr} --seed {seed}"
    meta = dict(command=cmd, teacher=[])
    if eval_num:
        meta["teacher"] = evaluate_teacher(folder, num=eval_num)
    (folder / TEACHER_METRICS).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {folder}")


@main.command("evaluate")
@click.option("--teacher", default=None, metavar="DIR", help="[default: the bundled sid_fast/assets/digits-flow]")
@click.option("--guidance", default="1,1.5,2,3,4.5", show_default=True, help="Comma-separated kappas")
@click.option("--num", type=click.IntRange(min=10), default=2000, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=SAMPLER_STEPS, show_default=True, help="Euler steps")
def evaluate_cmd(teacher, guidance, num, steps):
    """FD-digits and prompt accuracy of the teacher with the pipeline's Euler sampler at each guidance (JSON lines)."""
    kappas = [float(k) for k in guidance.split(",")]
    for row in evaluate_teacher(teacher or FOLDER, kappas, num, steps, log=lambda s: None):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
