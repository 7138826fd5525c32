"""Distill an EDM teacher into a one-step generator with Score identity Distillation (SiD).

    python train.py                                   # the embedded default: distill the bundled digits teacher on CPU
    torchrun --standalone --nproc_per_node=8 train.py --preset cifar10-uncond \
        --teacher edm-cifar10-32x32-uncond-vp.pkl --outdir runs

Flags keep the official SiD/EDM names and units (--duration and --ema in Mimg, --tick in kimg, --snap/--dump in ticks).
Any flag given overrides the preset; --dry-run prints the resolved configuration and exits.
"""

from __future__ import annotations

import json
import os
import sys

import click

from sid_fast import families
from sid_fast.flags import AliasOption, ImagesType
from sid_fast.training.config import (
    CHECKPOINTING,
    COMPILE_BACKENDS,
    CUDA_GRAPHS,
    DOMAINS,
    METHODS,
    METRICS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    ConfigError,
    resolve_config,
)
from sid_fast.training.config import flag as flag_name
from sid_fast.training.trackers import TRACKERS

# Exit status of a run stopped by SIGTERM/SIGINT before --duration (EX_TEMPFAIL: run the same command again), so
# that a scheduler's epilogue can requeue it; a finished run exits 0, a refused or failed one 1.
EXIT_STOPPED = 75


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
# Main options.
@click.option(
    "--outdir", help="Where to make run directories", metavar="DIR", type=str, default="runs", show_default=True
)
@click.option(
    "--preset",
    help="Official settings to start from",
    type=click.Choice(sorted(PRESETS)),
    default="digits",
    show_default=True,
)
@click.option(
    "--teacher",
    help="Teacher network: EDM/SiD pickle or sid_fast checkpoint (path or URL), or a Stable Diffusion folder",
    metavar="PATH|URL",
    type=str,
)
@click.option("--cond", help="Class-conditional distillation", type=bool)
@click.option("--desc", help="String to include in the run directory name", metavar="STR", type=str)
@click.option(
    "--data",
    help="EDM dataset (zip or folder; 'digits': the bundled digits): conditional labels follow its label "
    "frequencies; SiDA's real images",
    metavar="ZIP|DIR",
    type=str,
)
# SiD hyperparameters.
@click.option("--alpha", help="SiD alpha", metavar="FLOAT", type=float)
@click.option("--tmax", help="Largest t (x1000) for the generator loss's noise level", metavar="INT", type=int)
@click.option(
    "--init-sigma",
    "--init_sigma",
    "init_sigma",
    cls=AliasOption,
    help="Generator noise level sigma_init",
    metavar="FLOAT",
    type=float,
)
@click.option("--ls", help="Fake-score loss scale", metavar="FLOAT", type=float)
@click.option("--lsg", help="Generator loss scale", metavar="FLOAT", type=float)
# SiD-LSG (Stable Diffusion teachers).
@click.option(
    "--data-prompt-text",
    "--data_prompt_text",
    "data_prompt_text",
    cls=AliasOption,
    help="SiD-LSG: prompt file, one prompt per line",
    metavar="FILE",
    type=str,
)
@click.option(
    "--validation-prompts",
    "validation_prompts",
    help="SiD-LSG: the snapshot grid's prompts (the first 16 lines; default: the prompt file's)",
    metavar="FILE",
    type=str,
)
@click.option("--tmin", help="SiD-LSG: smallest timestep drawn (draws in [tmin, tmax))", metavar="INT", type=int)
@click.option(
    "--init-timestep",
    "--init_timestep",
    "init_timestep",
    cls=AliasOption,
    help="SiD-LSG: the generator's timestep",
    metavar="INT",
    type=int,
)
@click.option(
    "--cfg-train-fake",
    "--cfg_train_fake",
    "cfg_train_fake",
    cls=AliasOption,
    help="SiD-LSG: kappa1, guidance of the fake score trained",
    type=float,
)
@click.option(
    "--cfg-eval-fake",
    "--cfg_eval_fake",
    "cfg_eval_fake",
    cls=AliasOption,
    help="SiD-LSG: kappa2, guidance of the fake score in the G loss",
    type=float,
)
@click.option(
    "--cfg-eval-real",
    "--cfg_eval_real",
    "cfg_eval_real",
    cls=AliasOption,
    help="SiD-LSG: kappa4, guidance of the teacher",
    type=float,
)
@click.option("--guidance", help="SiD-LSG: kappa1 = kappa2 = kappa4 (LSG)", metavar="KAPPA", type=float)
@click.option(
    "--generator-steps",
    "--num_steps",
    "generator_steps",
    cls=AliasOption,
    help="K of the K-step generator, trained on k ~ U{1..K} steps per iteration (1: one-step SiD)",
    metavar="K",
    type=int,
)
@click.option(
    "--noise-type",
    "--noise_type",
    "noise_type",
    cls=AliasOption,
    help="Re-noising between generator steps",
    type=click.Choice(["fresh", "fixed", "ddim"]),
)
@click.option(
    "--weighting",
    "--weighting_scheme",
    "weighting",
    cls=AliasOption,
    help="Flow-matching teachers: w(t) of the generator loss (default 1_minus_sigma: 1 - t)",
    type=click.Choice(
        ["1_minus_sigma", "1_minus_sigma_squared", "1_over_sigma", "1_over_sigma2", "snr_sqrt", "snr", "sid_legacy"]
    ),  # fmt: skip
)
@click.option(
    "--return-logvar/--no-return-logvar",
    "--return_logvar",
    "return_logvar",
    cls=AliasOption,
    help="EDM2 teachers: weight the losses by the fake score's learned log-variance u(sigma) (official default: on)",
    default=None,
)
@click.option(
    "--force-normalization/--no-force-normalization",
    "--force_normalization",
    "force_normalization",
    cls=AliasOption,
    help="EDM2 teachers, SiDA: forced weight normalisation of the trained networks (official default: on; SiD always)",
    default=None,
)
@click.option(
    "--p-mean",
    "--P_mean",
    "P_mean",
    cls=AliasOption,
    help="Fake-score loss: mean of ln sigma (default -1.2 on EDM teachers, -0.4 on EDM2)",
    metavar="FLOAT",
    type=float,
)
@click.option(
    "--p-std",
    "--P_std",
    "P_std",
    cls=AliasOption,
    help="Fake-score loss: std of ln sigma (default 1.2 on EDM teachers, 1.0 on EDM2)",
    metavar="FLOAT",
    type=float,
)
# SiDA (official sida branch): the fake score is also a discriminator on real images (--data).
@click.option(
    "--method",
    help="sid (data-free, default) or sida (adversarial, real images from --data)",
    type=click.Choice(METHODS),
)
@click.option(
    "--use-gan",
    "--use_gan",
    "use_gan",
    cls=AliasOption,
    help="The official sida flag: 1 = --method sida, 0 = --method sid",
    type=bool,
)
@click.option("--lsd", help="SiDA: discriminator loss scale", metavar="FLOAT", type=float)
@click.option(
    "--lsg-gan",
    "--lsg_gan",
    "lsg_gan",
    cls=AliasOption,
    help="SiDA: generator GAN term scale (times C*H*W)",
    metavar="FLOAT",
    type=float,
)
@click.option("--xflip", help="SiDA: real images also mirrored (EDM's dataset x-flip)", type=bool)
@click.option(
    "--sid-model",
    "--sid_model",
    "sid_model",
    cls=AliasOption,
    help="SiD²A: a SiD generator that G and G_ema start from (the fake score starts from the teacher): a snapshot "
    "folder, a Hub id, a sid_fast .pt or a SiD .pkl",
    metavar="PATH|ID|URL",
    type=str,
)
@click.option(
    "--workers",
    help="SiDA: DataLoader worker processes for real images (CUDA runs)",
    metavar="INT",
    type=click.IntRange(min=0),
)
@click.option(
    "--sida-g-start-kimg",
    "sida_g_start_kimg",
    help="SiDA: no generator step before this (official 100)",
    metavar="KIMG",
    type=float,
)
@click.option(
    "--sida-gan-start-kimg",
    "sida_gan_start_kimg",
    help="SiDA: SiD alone before this, then 0.5 SiD + 0.5 GAN (official 200)",
    metavar="KIMG",
    type=float,
)
# Optimisation.
@click.option("--batch", help="Total batch size", metavar="INT", type=click.IntRange(min=1))
@click.option(
    "--batch-gpu",
    "batch_gpu",
    help="Micro-batch per process (accumulation rounds = batch / (gpus x batch-gpu))",
    metavar="INT",
    type=click.IntRange(min=1),
)
@click.option("--lr", help="Fake-score learning rate", metavar="FLOAT", type=float)
@click.option("--glr", help="Generator learning rate", metavar="FLOAT", type=float)
@click.option(
    "--g-beta1", "--g_beta1", "g_beta1", cls=AliasOption, help="Generator Adam beta1", metavar="FLOAT", type=float
)
@click.option("--ema", help="EMA half-life of G_ema", metavar="MIMG", type=float)
@click.option("--augment", help="EDM augmentation probability for the fake-score loss", metavar="P", type=float)
@click.option("--dropout", help="Dropout in the trained networks", metavar="P", type=float)
@click.option(
    "--precision",
    help="fp32 = reference (TF32 off, as SiD); fp16 = EDM's --fp16 mode (CUDA); tf32; bf16 (bf16 UNet bodies, "
    "fp32 weights/losses)",
    type=click.Choice(PRECISIONS),
)
@click.option(
    "--channels-last", "channels_last", help="NHWC memory format for networks and images", is_flag=True, default=None
)
@click.option("--compile", "compile", help="torch.compile the networks", is_flag=True, default=None)
@click.option(
    "--compile-backend",
    "compile_backend",
    help="torch.compile backend",
    type=click.Choice(COMPILE_BACKENDS),
)
@click.option(
    "--cuda-graphs",
    "cuda_graphs",
    help="CUDA graphs (CUDA only): sites (torch.compile reduce-overhead per network call; the bare flag) or step "
    "(the whole iteration, replayed)",
    type=click.Choice(CUDA_GRAPHS),
    is_flag=False,
    flag_value="sites",
    default=None,
)
@click.option(
    "--checkpointing",
    help="Activation checkpointing: nets/blocks (teacher and fake score, generator phase) or selective (every "
    "network with gradient, per UNet block, recomputing memory-bound ops only)",
    type=click.Choice(CHECKPOINTING),
)
@click.option(
    "--optimizer",
    help="adam (official), foreach or fused Adam (the latter two with foreach EMA)",
    type=click.Choice(OPTIMIZERS),
)
@click.option(
    "--fsdp/--no-fsdp",
    "fsdp",
    help="Shard G, the fake score and their optimizer states over the processes with FSDP2 (fully_shard) instead "
    "of replicating them with DDP; for networks that do not fit one GPU (EDM2 XL, XXL)",
    default=None,
)
@click.option(
    "--kernels",
    help="Fused Triton kernels: none, all, or a comma list (sid_loss,edm_loss,group_norm_silu,attention,ada_norm; sdpa "
    "for PyTorch's attention)",
    metavar="LIST",
    type=str,
)
# Schedule and I/O.
@click.option(
    "--duration", help="Training duration: Mimg (a bare number, as SiD/EDM), or images: 8k, 10M, 1G", type=ImagesType()
)
@click.option("--tick", help="How often to print progress", metavar="KIMG", type=float)
@click.option(
    "--snap", help="How often to save snapshots (and evaluate metrics)", metavar="TICKS", type=click.IntRange(min=1)
)
@click.option("--dump", help="How often to write training states", metavar="TICKS", type=click.IntRange(min=1))
@click.option(
    "--extra-snapshots/--no-extra-snapshots",
    "extra_snapshots",
    help="Also snapshot at kimg 0 and ticks 10, 20, ..., 100, as the official loop (official presets: on)",
    default=None,
)
@click.option(
    "--tracker",
    help="Also send statistics, metrics and grids to TensorBoard (<run>/tensorboard), Weights & Biases, or both "
    "(rank 0)",
    type=click.Choice(TRACKERS),
)
@click.option("--tracker-project", "tracker_project", help="The W&B project (--tracker wandb)", metavar="STR", type=str)
@click.option(
    "--metrics",
    help="Metrics of G_ema at snapshots (fid,fd-dinov2: both from one set of images, as EDM2)",
    type=click.Choice(METRICS),
)
@click.option(
    "--dinov2",
    help="DINOv2 ViT-L/14 for fd-dinov2 (Meta's dinov2_vitl14_pretrain.pth) [default: $SID_FAST_DINOV2 or the cache]",
    metavar="PATH|URL",
    type=str,
)
@click.option(
    "--metric-num",
    "metric_num",
    help="Images per metric evaluation (50000 as the paper, 10000 for quick runs)",
    metavar="INT",
    type=click.IntRange(min=2),
)
@click.option(
    "--data-stat",
    "--data_stat",
    "data_stat",
    cls=AliasOption,
    help="Reference statistics: EDM's npz (FID), or EDM2's pkl (FID and FD-DINOv2)",
    metavar="NPZ|PKL|URL",
    type=str,
)
@click.option(
    "--vae",
    help="EDM2 latent teachers: the Stability VAE (local diffusers folder of stabilityai/sd-vae-ft-mse) that "
    "decodes grids and FID images",
    metavar="DIR",
    type=str,
)
@click.option(
    "--detector", help="Inception detector for FID (TorchScript .pt or pytorch-fid .pth)", metavar="PATH|URL", type=str
)
@click.option(
    "--max-bad-steps",
    "max_bad_steps",
    help="Abort after this many consecutive steps with non-finite gradients",
    metavar="INT",
    type=click.IntRange(min=1),
)
@click.option("--seed", help="Random seed", metavar="INT", type=int)
@click.option(
    "--resume",
    help="auto: continue this configuration's run in --outdir (or --run-dir) from its newest state, if any; new: a "
    "new run; PATH: a new run from a training state (file, or run directory for its newest)  [default: auto]",
    metavar="auto|new|PATH",
    type=str,
)
@click.option(
    "--run-dir",
    "run_dir",
    help="The run's directory exactly (instead of a numbered one in --outdir): the same command continues it",
    metavar="DIR",
    type=str,
)
@click.option(
    "--keep-states",
    "keep_states",
    help="Training states kept in the run directory, the newest (0: all)  [default: 3]",
    metavar="INT",
    type=click.IntRange(min=0),
)
@click.option("--dry-run", "dry_run", help="Print the resolved configuration and exit", is_flag=True)
def main(preset, dry_run, **flags):
    """Distill an EDM teacher into a one-step generator with SiD."""
    # SID_FAST_DURATION (Mimg) shortens a run whose --duration is not given: how tests run the README's commands
    # exactly as written. The run's log and training_options.json show the duration used.
    env_duration = os.environ.get("SID_FAST_DURATION")
    if flags.get("duration") is None and env_duration:
        try:
            flags["duration"] = float(env_duration)
        except ValueError:
            raise click.ClickException(f"SID_FAST_DURATION={env_duration!r} is not a number of Mimg.") from None
        print(
            f"SID_FAST_DURATION={env_duration}: training for {flags['duration'] * 1000:g} kimg instead of the "
            f"preset's duration."
        )
    guidance = flags.pop("guidance")
    if guidance is not None:
        if not DOMAINS["cfg_eval_real"].admits(guidance):
            raise click.ClickException(f"--guidance must be {DOMAINS['cfg_eval_real'].describe()}, got {guidance!r}.")
        for flag in ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real"):
            if flags.get(flag) is not None and flags[flag] != guidance:
                raise click.ClickException(
                    f"--guidance {guidance:g} sets all three scales but {flag_name(flag)} {flags[flag]:g} differs; "
                    "give one."
                )
            flags[flag] = guidance
    use_gan = flags.pop("use_gan")
    if use_gan is not None:
        if flags.get("method") is not None and flags["method"] != ("sida" if use_gan else "sid"):
            raise click.ClickException(
                f"--use-gan {int(use_gan)} contradicts --method {flags['method']}; give one of them."
            )
        flags["method"] = "sida" if use_gan else "sid"
    try:
        cfg = resolve_config(preset, flags)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:  # by section; the family section holds the detected teacher family's settings only
        family = families.detect(cfg)
        print(json.dumps(dict(teacher_family=family.name, **cfg.sections(family.fields)), indent=2))
        return

    import torch

    from sid_fast.checkpoints import CheckpointError
    from sid_fast.training.run import TrainingAborted, run

    try:
        _, status = run(cfg)
    except (ConfigError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    except TrainingAborted as e:
        raise click.ClickException(f"Training aborted: {e}") from None
    except torch.cuda.OutOfMemoryError:
        raise click.ClickException(
            "Out of GPU memory. Lower --batch-gpu (more accumulation rounds give the same batch), "
            "or recompute activations with --checkpointing selective (or nets); python -m bench.memory predicts the "
            "largest batch that fits."
        ) from None

    if status == "stopped":
        print(
            f"Stopped by a signal before --duration: the training state is written; run the same command to continue "
            f"(exit status {EXIT_STOPPED})."
        )
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    sys.exit(main())
