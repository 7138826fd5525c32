"""SiD-LSG (Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation for Data-Free One-Step Text-to-Image
Generation", ICLR 2025; official repository SiD-LSG, training/sid_training_loop.py and training/sid_sd_util.py) in
sid_fast's SiD loop: a Stable Diffusion teacher behind the trainer's denoiser seam, prompts in place of class labels.

The phases are sid_fast.training.sid's; what a Stable Diffusion teacher changes is here:
- `SDDenoiser`: noise levels are integer timesteps t ~ U{tmin, ..., tmax - 1} (a fresh draw in each phase, one draw
  shared by the teacher and the fake score in the generator phase); noising is diffusers' add_noise; G is the UNet at
  --init_timestep on sqrt(1 - abar) z and its x0-prediction is the sample; the teacher runs with guidance kappa4
  (--cfg_eval_real) and the fake score with kappa2 (--cfg_eval_fake) in the generator phase, both read as
  x0-predictions; the fake score runs with kappa1 (--cfg_train_fake) in its own phase, whose loss is the summed
  epsilon-MSE (v-prediction: velocity-MSE weighted by abar_t); the generator loss is SiD's (sid_fast.losses) on the
  x0-predictions. Guidance is one UNet call on the doubled batch [unconditional, conditional].
- `SiDLSGTrainer`: every micro-batch draws its prompts (uniformly, with replacement, from the prompt file) and z from
  its own generator (sid_fast.training.sid's seeding); in the fake-score phase, when kappa1 or kappa2 is not 1, 10% of
  the prompts are replaced by "" (for G's sample and the fake score both, as the official loop). The empty prompt's
  embedding is computed once. Snapshots are diffusers UNet folders (sid_fast.t2i.export) and a grid decoded by the
  teacher's VAE, which stays on the CPU between snapshots.

Where the official loop differs and why: it iterates a shuffled prompt DataLoader per rank; here each micro-batch
draws its prompts with replacement from its own seeded generator, so a run sees the same prompts whatever its number
of processes and resumes without a loader state (the same distribution). Its dropout draws come from the global CPU
RNG; here from the micro-batch's generator.

Precision: fp32 is the official default (TF32 off); bf16 runs the three UNets under torch.autocast(bfloat16) with
fp32 master weights, the frozen teacher stored in bf16, and everything outside the UNet calls (x0 conversion,
guidance combination, losses, optimizer) in fp32. The official --fp16 1 mode (fp16 weights and Adam states) is not
built. --checkpointing nets recomputes the teacher's and the fake score's generator-phase forwards whole; blocks and
selective use diffusers' per-block gradient checkpointing (whole blocks recomputed) on the teacher and the fake score,
selective on G too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from sid_fast import ops, perf
from sid_fast.t2i.sd import StableDiffusion, fake_score_loss_rows, guided_output, map_cond, unet_kwargs
from sid_fast.training.config import ConfigError
from sid_fast.training.denoiser import FakeOutput
from sid_fast.training.sid import SiDTrainer, TeacherSpec

SD_CLASS = "diffusers.UNet2DConditionModel"
DROPOUT = 0.1  # official use_context_dropout_train_fake: 10% of the fake-score step's prompts replaced by ""


def unet_config(unet) -> dict:
    """The UNet's init kwargs as plain JSON values (diffusers' config without its private keys)."""

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in dict(unet.config).items() if not k.startswith("_")}


def check_precision(cfg) -> None:
    """The official --fp16 1 mode (fp16 weights and Adam states) is not built: refused in one sentence."""
    if cfg.precision == "fp16":
        raise ConfigError(
            "--precision fp16: the official --fp16 1 mode (fp16 weights and Adam states) is not built for Stable "
            "Diffusion teachers; use --precision bf16 (fp32 master weights) or fp32."
        )


class SDDenoiser:
    """A Stable Diffusion UNet behind the SiD loop's denoiser seam (sid_fast.training.denoiser): levels are integer
    timesteps, labels are text embeddings [N, 77, width], outputs are read as x0-predictions in fp32."""

    logvar = False
    aug_dim = 0

    def __init__(self, cfg, sd: StableDiffusion, uncond: torch.Tensor, device: torch.device):
        self.cfg, self.schedule, self.uncond, self.device = cfg, sd.schedule, uncond, device
        self.channels, self.resolution = sd.latent_channels, sd.latent_resolution
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None

    def image_shape(self, n: int) -> list[int]:
        return [n, self.channels, self.resolution, self.resolution]

    # Noise levels: integer timesteps, t ~ U{tmin, ..., tmax - 1} in both phases (official torch.randint(tmin, tmax)).
    def fake_sigma(self, n: int, generator) -> torch.Tensor:
        return self.schedule.draw_timesteps(n, self.cfg.tmin, self.cfg.tmax, self.device, generator)

    generator_sigma = fake_sigma

    def noise(self, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps  # add_noise scales it

    def noisy(self, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.add_noise(y, eps, t)

    def aug_zeros(self, n: int):
        return None

    # Calls.
    def _model(self, call):
        """call as fn(x, t, text embedding) -> the UNet's raw output (epsilon or v) in fp32."""

        def model(x, t, emb):
            # The meta device (bench.memory) has no autocast dispatch key: the bench emulates bf16 autocast there.
            on = self.autocast is not None and x.device.type != "meta"
            with torch.autocast("cpu" if x.device.type == "meta" else x.device.type, torch.bfloat16, enabled=on):
                kw = unet_kwargs(emb)  # the call sites take (x, level, labels, **kw): text states in the labels' place
                out = call(x, t, kw.pop("encoder_hidden_states"), **kw, return_dict=False)[0]
            return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 -> fp32; fp32, fp64 kept

        return model

    def guided(self, call, x_t, t, cond, kappa: float) -> torch.Tensor:
        return guided_output(self._model(call), x_t, t, cond, self.uncond, kappa)

    def generate(self, call, z: torch.Tensor, cond) -> torch.Tensor:
        """x_g: the x0-prediction of G at --init_timestep on sqrt(1 - abar) z (official sid_sd_sampler, one step)."""
        t = torch.full([z.shape[0]], self.cfg.init_timestep, dtype=torch.long, device=z.device)
        x = self.schedule.generator_input(z, t)
        return self.schedule.x0(x, self._model(call)(x, t, cond), t)

    def teacher(self, call, x_t, t, cond) -> torch.Tensor:
        return self.schedule.x0(x_t, self.guided(call, x_t, t, cond, self.cfg.cfg_eval_real), t)

    def fake(self, call, x_t, t, cond, aug=None, return_flag=None, training=False) -> FakeOutput:
        """Training (its own phase): the raw output with kappa1; otherwise the x0-prediction with kappa2."""
        if return_flag is not None:
            raise ValueError("SiD-LSG's fake score has no discriminator head (SiDA on Stable Diffusion is not built).")
        if training:
            return FakeOutput(D=None, raw=self.guided(call, x_t, t, cond, self.cfg.cfg_train_fake))
        return FakeOutput(D=self.schedule.x0(x_t, self.guided(call, x_t, t, cond, self.cfg.cfg_eval_fake), t))

    # Losses.
    def fake_loss_sum(self, out: FakeOutput, y, eps, t):
        rows, ok = fake_score_loss_rows(self.schedule, out.raw, y, eps, t)
        return rows.sum(), ok

    def generator_loss_sum(self, x_g, y_real, out: FakeOutput, alpha: float):
        return ops.sid_generator_loss_sum(x_g, y_real, out.D, alpha)

    def begin_phase(self, net) -> None:
        pass


class SiDLSGTrainer(SiDTrainer):
    """SiD's iteration with a Stable Diffusion teacher and prompts (see the module docstring). Build it with
    sid_fast.training.run.build_trainer, which loads the folder and the prompt file."""

    def __init__(self, cfg, device, sd: StableDiffusion, prompts: list[str], **kwargs):
        check_precision(cfg)
        self.sd, self.prompts, self.device = sd, prompts, device
        if sd.text_encoder is not None:
            sd.text_encoder.to(device)
        if sd.vae is not None:
            sd.vae.to("cpu")  # on the accelerator only while a snapshot decodes
        self.uncond = self.encode_prompts([""])  # [1, tokens, width], once
        self.drop_p = DROPOUT if (cfg.cfg_train_fake != 1 or cfg.cfg_eval_fake != 1) else 0.0
        spec = TeacherSpec(SD_CLASS, unet_config(sd.unet), {}, dict(folder=str(sd.folder)))
        super().__init__(cfg, device, sd.unet, spec, **kwargs)

    def make_denoiser(self, teacher):
        return SDDenoiser(self.cfg, self.sd, self.uncond, self.device)

    def _build_networks(self, teacher, generator_init) -> None:
        """The teacher UNet (frozen), G and the fake score as its copies (official: both start from the teacher), and
        G_ema; dtype, memory format and checkpointing as the module docstring says."""
        cfg = self.cfg
        self.init_kwargs = self.g_init_kwargs = self.fake_init_kwargs = self.teacher_spec.init_kwargs
        perf.set_matmul_precision(cfg.precision)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.G = copy.deepcopy(self.teacher).train().requires_grad_(True)
        if generator_init is not None:
            self.G.load_state_dict(generator_init)
        self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        perf.prepare_networks(cfg, self.teacher, (self.G, self.fake), self.G_ema)
        per_block = {"blocks": (self.teacher, self.fake), "selective": (self.teacher, self.G, self.fake)}
        for net in per_block.get(cfg.checkpointing, ()):
            net.enable_gradient_checkpointing()

    def _label_table(self, label_table):
        return None

    # Prompts in place of class labels.
    def draw_z_prompts(self, g, drop_p: float):
        """(z, text embeddings [N, tokens, width]) of a micro-batch: prompt indices, z and (drop_p > 0) the dropout
        draws, in this order from `g`; dropped prompts get the empty prompt's embedding."""
        b = self.cfg.batch_gpu
        idx = torch.randint(len(self.prompts), [b], device=self.device, generator=g)
        z = torch.randn(self.denoiser.image_shape(b), device=self.device, generator=g)
        meta = self.device.type == "meta"  # memory accounting: indices without values
        cond = self.encode_prompts([""] * b if meta else [self.prompts[i] for i in idx.tolist()])
        if drop_p > 0:
            drop = torch.rand([b], device=self.device, generator=g) < drop_p
            cond = map_cond(lambda u, c: torch.where(drop.reshape(-1, *[1] * (c.ndim - 1)), u, c), self.uncond, cond)
        return z, cond

    def encode_prompts(self, prompts: list[str]):
        """The conditioning of prompts: the text encoder's last hidden states [N, tokens, width]."""
        return self.sd.encode_text(prompts, self.device)

    def draw_z_labels(self, g):
        return self.draw_z_prompts(g, 0.0)

    def fake_phase_inputs(self, rnd: int, g):
        z, cond = self.draw_z_prompts(g, self.drop_p)
        return z, cond, None

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"SiD-LSG: alpha {cfg.alpha}, t in [{cfg.tmin}, {cfg.tmax}), init_timestep {cfg.init_timestep}, guidance "
            f"kappa1 {cfg.cfg_train_fake:g} / kappa2 {cfg.cfg_eval_fake:g} / kappa4 {cfg.cfg_eval_real:g}, prompt "
            f"dropout {self.drop_p:g}"
        )

    def conditioning(self) -> str:
        return f"prompts of {self.cfg.data_prompt_text} ({len(self.prompts)})"

    # Snapshots.
    @torch.no_grad()
    def sample_ema(self, prompts: list[str], seeds) -> torch.Tensor:
        """G_ema's one-step latents for (prompt, seed) pairs, z from torch.Generator().manual_seed(seed) on the CPU."""
        from sid_fast.t2i.export import onestep_latents, seed_latents

        z = seed_latents(seeds, self.denoiser.image_shape(1)[1:]).to(self.device)
        cond = self.encode_prompts(prompts)
        return onestep_latents(self.G_ema, self.sd.schedule, z, cond, self.cfg.init_timestep)

    def snapshot(self):
        """The grid (16 prompts of the file, decoded by the VAE) and the generator as a diffusers UNet folder (rank
        0); with --metrics fd-digits (the digits teacher) FD-digits and prompt accuracy, recorded as the other
        metrics are and added to the folder's sid_fast.json. FID-30k and CLIP score of Stable Diffusion runs are
        computed apart (sid_fast.t2i.sample, sid_fast.fid, sid_fast.metrics.clip_score)."""
        if self.rank != 0 or self.run_dir is None:
            return None
        from sid_fast.sampling import image_grid, save_image
        from sid_fast.t2i.export import decode, save_unet_folder
        from sid_fast.training.snapshots import snapshot_name

        with ops.kernels(self.kernels):
            prompts = [self.prompts[i % len(self.prompts)] for i in range(16)]
            latents = self.sample_ema(prompts, range(16))
            images = decode(self.sd.vae, latents, self.device)
            picture = image_grid(images, scale=max(1, 64 // images.shape[-1]), gap=2)
            save_image(picture, self.run_dir / f"fakes-{self.cur_nimg:012d}.png")
            self.tracker.log_image("samples/G_ema", picture, self.cur_nimg)
        cfg = self.cfg
        folder = save_unet_folder(
            self.run_dir / snapshot_name(self.cur_nimg),
            self.G_ema,
            overwrite=True,  # the run's own folder: a file someone put there is kept, never a reason to stop training
            init_timestep=cfg.init_timestep,
            teacher=Path(str(cfg.teacher)).name,
            preset=cfg.preset,
            kimg=self.cur_nimg / 1e3,
            guidance=[cfg.cfg_train_fake, cfg.cfg_eval_fake, cfg.cfg_eval_real],
            alpha=cfg.alpha,
        )
        if cfg.metrics != "fd-digits":
            return None
        from sid_fast.t2i.export import update_unet_meta
        from sid_fast.training.snapshots import record_metric

        with ops.kernels(self.kernels):
            values = {k: record_metric(self, k, v) for k, v in self.digits_metrics().items()}
        update_unet_meta(folder, metrics=values)
        return values

    @torch.no_grad()
    def digits_metrics(self) -> dict[str, float]:
        """FD-digits and prompt accuracy of G_ema (text-to-image digits teachers, whose VAE decodes 1x8x8 images) on
        --metric_num images: image i for the prompt naming digit i % 10 (sid_fast.t2i.digits.eval_prompts) and seed
        10,000,000 + i."""
        from sid_fast.t2i.digits import decode_images, eval_prompts, score_images

        n, b = self.cfg.metric_num, self.cfg.batch_gpu
        prompts, digits = eval_prompts(n)
        seeds = range(10_000_000, 10_000_000 + n)
        latents = torch.cat([self.sample_ema(prompts[i : i + b], seeds[i : i + b]).cpu() for i in range(0, n, b)])
        return score_images(decode_images(self.sd.vae, latents), digits)

    def teacher_metric(self, key: str) -> tuple[float | None, str]:
        """The teacher's value at the run's guidance kappa4, from its folder's teacher_metrics.json (the digits
        teacher: sid_fast.t2i.digits); None when the folder has none."""
        from sid_fast.t2i.digits import TEACHER_METRICS

        path = Path(self.sd.folder) / TEACHER_METRICS
        try:
            rows = json.loads(path.read_text()).get("teacher", [])
        except (OSError, ValueError, AttributeError):
            return None, ""
        for row in rows:
            if row.get("kappa") == self.cfg.cfg_eval_real and key in row:
                return row[key], f"teacher, {row.get('sampler', '')}, kappa {row['kappa']:g}"
        return None, ""
