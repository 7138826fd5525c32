"""EDM teacher training (EDM's recipe: EDMLoss, Adam 0.9/0.999, linear lr ramp-up, EMA, gradient cleaning).
EDM2 networks train with the same loop, EDM2's loss form (learned log-variance) and forced weight normalisation; EDM2's
own schedule (inverse-square-root learning rate decay, power-function EMA) is not reproduced: these are small teachers
for tests and the CPU presets.

Used to make the bundled digits teacher:
    python -m sid_fast.training.teacher --out sid_fast/assets/digits_teacher.pt
"""

from __future__ import annotations

import copy
import time
import types

import click
import torch

from sid_fast.checkpoints import load_network_file, save_network
from sid_fast.data.digits import digits_tensor
from sid_fast.ema import ema_beta, update_ema
from sid_fast.losses import EDMLoss
from sid_fast.metrics.digits import fd_digits
from sid_fast.networks import build_network, edm2
from sid_fast.progress import bar, summary
from sid_fast.sampling import edm_sampler, latents_and_labels

DIGITS_TEACHER = dict(
    model_type="SongUNet",
    img_resolution=8,
    img_channels=1,
    label_dim=0,
    model_channels=32,
    channel_mult=[1, 2, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.1,
)
# A tiny EDM2-architecture teacher of the same digits (magnitude-preserving UNet, learned log-variance): levels 8 and 4,
# one block per level, attention at 4x4 (2 heads of 16 channels); 180,683 parameters.
DIGITS_EDM2_TEACHER = dict(
    img_resolution=8,
    img_channels=1,
    label_dim=0,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
    dropout=0.0,
    use_fp16=False,
    logvar_channels=16,
)
ARCHS = {"edm": ("EDMPrecond", DIGITS_TEACHER), "edm2": ("Precond", DIGITS_EDM2_TEACHER)}


def train_edm(
    net,
    images,
    labels=None,
    *,
    steps,
    batch,
    lr,
    lr_rampup_kimg=10,
    ema_halflife_kimg=10,
    ema_rampup_ratio=0.05,
    seed=0,
    log_every=100,
    log=print,
):
    """Train `net` on `images` ([N, C, H, W] in [-1, 1]) with EDM's loss. Returns the EMA network."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss()
    net.train()
    t0 = time.time()
    progress = bar(steps * batch, "training", "img")
    for step in range(steps):
        idx = torch.randint(len(images), [batch], generator=g)
        y = images[idx]
        c = labels[idx] if labels is not None else None
        if isinstance(net, edm2.Precond):
            edm2.force_weight_norm_(net)  # EDM2's forced weight normalisation, once per step
        loss, _ = loss_fn(net, y, c, generator=g)
        opt.zero_grad(set_to_none=True)
        (loss.sum() / batch).backward()
        cur_nimg = (step + 1) * batch
        for group in opt.param_groups:
            group["lr"] = lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        update_ema(ema, net, ema_beta(batch, cur_nimg, ema_halflife_kimg, ema_rampup_ratio))
        progress.update(batch)
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:6d}  kimg {cur_nimg / 1e3:8.1f}  loss {loss.mean().item():.4f}  {time.time() - t0:7.1f} s")
    progress.close()
    if log:
        log(summary(f"Trained {steps} steps", steps * batch, "images", time.time() - t0))
    return ema


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--out", default="sid_fast/assets/digits_teacher.pt", show_default=True, metavar="FILE.pt")
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCHS)),
    default="edm",
    show_default=True,
    help="edm: DDPM++ SongUNet; edm2: EDM2's UNet",
)
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--ema", type=float, default=10.0, show_default=True, help="EMA half-life in kimg")
@click.option("--rampup", type=float, default=10.0, show_default=True, help="Learning-rate ramp-up in kimg")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--evaluate-only", "evaluate_only", is_flag=True, help="Only (re)compute the teacher's FD-digits (Heun, 35 NFE)"
)
def main(out, arch, steps, batch, lr, ema, rampup, seed, evaluate_only):
    """Train the bundled digits EDM teacher."""
    a = types.SimpleNamespace(out=out, arch=arch, steps=steps, batch=batch, lr=lr, ema=ema, rampup=rampup, seed=seed)
    if evaluate_only:
        print(f"FD-digits of the teacher (Heun, 35 NFE): {evaluate_digits_teacher(a.out):.3f}")
        return

    images, _ = digits_tensor()
    torch.manual_seed(a.seed)
    class_name, kwargs = ARCHS[a.arch]
    net = build_network(class_name, kwargs)
    ema = train_edm(
        net,
        images,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        lr_rampup_kimg=a.rampup,
        ema_halflife_kimg=a.ema,
        seed=a.seed,
    )
    cmd = (
        f"python -m sid_fast.training.teacher --arch {a.arch} --out {a.out} --steps {a.steps} --batch {a.batch} "
        f"--lr {a.lr} --ema {a.ema} --rampup {a.rampup} --seed {a.seed}"
    )
    save_network(a.out, ema, kwargs, kind="teacher", dataset="digits-8x8", command=cmd, torch_version=torch.__version__)
    print(f"saved {a.out}")
    print(f"FD-digits of the teacher (Heun, 35 NFE): {evaluate_digits_teacher(a.out):.3f}")


def evaluate_digits_teacher(path: str, num: int = 2000, steps: int = 18) -> float:
    """FD-digits of the teacher with EDM's Heun sampler (steps=18: 35 NFE); stored in the file's metadata."""
    net, info = load_network_file(path)
    seeds = list(range(10_000_000, 10_000_000 + num))  # the seeds the trainer evaluates G_ema on
    out = []
    for i in range(0, num, 250):
        z, labels, _ = latents_and_labels(net, seeds[i : i + 250])
        with torch.no_grad():
            out.append(edm_sampler(net, z, labels, num_steps=steps).float())
    fd = fd_digits(torch.cat(out))
    meta = dict(info["meta"], fd_digits_heun35=fd, fd_digits_num=num)
    save_network(path, net, info["init_kwargs"], **meta)
    return fd


if __name__ == "__main__":
    main()
