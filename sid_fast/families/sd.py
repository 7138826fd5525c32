"""The Stable Diffusion family, distilled with SiD-LSG (Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation
for Data-Free One-Step Text-to-Image Generation", ICLR 2025; official repository SiD-LSG, training/sid_training_loop.py
and training/sid_sd_util.py): a diffusers Stable Diffusion folder as the teacher, prompts as the condition.

The phases are sid_fast.training.sid's; what a Stable Diffusion teacher changes is here:
- `SDDenoiser`: noise levels are integer timesteps t ~ U{tmin, ..., tmax - 1} (a fresh draw in each phase, one draw
  shared by the teacher and the fake score in the generator phase); noising is diffusers' add_noise; G is the UNet at
  --init-timestep on sqrt(1 - abar) z and its x0-prediction is the sample; the teacher runs with guidance kappa4
  (--cfg-eval-real) and the fake score with kappa2 (--cfg-eval-fake) in the generator phase, both read as
  x0-predictions; the fake score runs with kappa1 (--cfg-train-fake) in its own phase, whose loss is the summed
  epsilon-MSE (v-prediction: velocity-MSE weighted by abar_t); the generator loss is SiD's (sid_fast.losses) on the
  x0-predictions. Guidance is one UNet call on the doubled batch [unconditional, conditional].
- `SDFamily.draw`: every micro-batch draws its prompts (uniformly, with replacement, from the prompt file) and z from
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
selective on G too (sid_fast.perf.prepare_networks).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sid_fast import checkpoints, fewstep, ops
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.families import edm
from sid_fast.families.base import ASSETS, FakeOutput, Family, Networks, fitted_generator
from sid_fast.flags import ConfigError
from sid_fast.t2i import digits, export
from sid_fast.t2i.sd import (
    SDError,
    StableDiffusion,
    fake_score_loss_rows,
    fetch_command,
    guided_output,
    load_sd,
    map_cond,
    unet_kwargs,
)
from sid_fast.t2i.tokens import PromptTokens, TokenFileError

SD_CLASS = "diffusers.UNet2DConditionModel"
DROPOUT = 0.1  # official use_context_dropout_train_fake: 10% of the fake-score step's prompts replaced by ""


def unet_config(unet) -> dict:
    """The UNet's init kwargs as plain JSON values (diffusers' config without its private keys)."""

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in dict(unet.config).items() if not k.startswith("_")}


def is_sd_folder(path) -> bool:
    """Is `path` a diffusers pipeline folder (model_index.json)?"""
    return path is not None and (Path(str(path)) / "model_index.json").is_file()


class SDDenoiser:
    """A Stable Diffusion UNet behind the SiD loop's seam: levels are integer timesteps, conditions are text
    embeddings [N, 77, width], outputs are read as x0-predictions in fp32."""

    logvar = False
    aug_dim = 0

    def __init__(self, cfg, sd: StableDiffusion, uncond: torch.Tensor, device: torch.device):
        self.cfg, self.schedule, self.uncond, self.device = cfg, sd.schedule, uncond, device
        self.channels, self.resolution = sd.latent_channels, sd.latent_resolution
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.multistep = cfg.generator_steps > 1  # the trainer passes the iteration's step count to `generate`

    def image_shape(self, n: int) -> list[int]:
        return [n, self.channels, self.resolution, self.resolution]

    # Noise levels: integer timesteps, t ~ U{tmin, ..., tmax - 1} in both phases (official torch.randint(tmin, tmax)).
    def fake_level(self, n: int, generator) -> torch.Tensor:
        return self.schedule.draw_timesteps(n, self.cfg.tmin, self.cfg.tmax, self.device, generator)

    generator_level = fake_level

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
                kw = unet_kwargs(emb)  # the call sites take (x, level, condition, **kw): text states as the condition
                out = call(x, t, kw.pop("encoder_hidden_states"), **kw, return_dict=False)[0]
            return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 -> fp32; fp32, fp64 kept

        return model

    def guided(self, call, x_t, t, cond, kappa: float) -> torch.Tensor:
        return guided_output(self._model(call), x_t, t, cond, self.uncond, kappa)

    def generate(self, call, z: torch.Tensor, cond, run: int | None = None, generator=None, train: bool = False):
        """x_g: the x0-prediction of G at --init-timestep on sqrt(1 - abar) z (official sid_sd_sampler, one step).
        With --generator-steps K > 1 (`multistep`) the K-step generator run for `run` steps (Schedule.fewstep), fresh
        re-noising drawn from `generator`; `train`: only the last step with gradient."""
        if self.multistep:
            model = self._model(call)
            return self.schedule.fewstep(lambda x, t: self.schedule.x0(x, model(x, t, cond), t), z,
                                         self.cfg.init_timestep, self.cfg.generator_steps, run, self.cfg.noise_type,
                                         generator, train)  # fmt: skip
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

    def generator_loss_sum(self, x_g, y_real, out: FakeOutput, alpha: float, level=None):
        return ops.sid_generator_loss_sum(x_g, y_real, out.D, alpha)

    def begin_phase(self, net) -> None:
        pass


class SDFamily(Family):
    """A Stable Diffusion folder and a prompt file (see the module docstring)."""

    name = "sd"
    generator_classes = (SD_CLASS,)
    fields = ("resolution", "channels", "tmin", "init_timestep", "generator_steps", "noise_type", "cfg_train_fake",
              "cfg_eval_fake", "cfg_eval_real")  # fmt: skip
    folder_files = export.FOLDER_FILES

    @classmethod
    def claims(cls, cfg) -> bool:
        """A diffusers pipeline folder (model_index.json) as --teacher, or one of its presets (whose --teacher must then
        be such a folder: the loader says so)."""
        return is_sd_folder(cfg.teacher) or cfg.preset in PRESETS

    @classmethod
    def missing_teacher(cls, cfg) -> str:
        repo = SD_HUB_REPOS[cfg.official_teacher]
        return (
            f"--teacher is required for preset {cfg.preset!r}: a local diffusers folder of {repo}, e.g. fetched with "
            f"`{fetch_command(repo, cfg.official_teacher, xl=cfg.official_teacher in SDXL_TEACHERS.values())}` "
            "(huggingface_hub's CLI; sid_fast itself downloads nothing)."
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.precision == "fp16":
            raise ConfigError(
                "--precision fp16: the official --fp16 1 mode (fp16 weights and Adam states) is not built for Stable "
                "Diffusion teachers; use --precision bf16 (fp32 master weights) or fp32."
            )
        for flag, value, shown, why in (
            ("--method", cfg.method != "sid", cfg.method, "SiDA with a Stable Diffusion teacher is not built"),
            ("--data", cfg.data is not None, cfg.data, "SiD-LSG is data-free: prompts come from --data-prompt-text"),
            ("--metrics", cfg.metrics not in ("none", "fd-digits"), cfg.metrics, "FID-30k and CLIP score of "
             "text-to-image runs are not computed in the trainer (give --metrics none)"),
        ):  # fmt: skip
            if value:
                raise ConfigError(f"{flag} {shown}: {why}.")
        if cfg.augment > 0:
            raise ConfigError(f"--augment {cfg.augment}: EDM's augmentation is not built for Stable Diffusion latents.")
        if cfg.cuda_graphs == "step":
            raise ConfigError(
                "--cuda-graphs step: Stable Diffusion prompts are tokenised on the host inside every micro-batch, "
                "which a replayed graph cannot run; use --cuda-graphs sites."
            )
        if cfg.data_prompt_text is None:
            raise ConfigError(
                f"--data-prompt-text is required with the Stable Diffusion teacher {cfg.teacher}: a text file of "
                "prompts, one per line (the official runs use Aesthetics 6+ prompts)."
            )
        if cfg.tmin >= cfg.tmax:
            raise ConfigError(
                f"--tmin {cfg.tmin} and --tmax {cfg.tmax}: timesteps are drawn in [tmin, tmax), which is empty."
            )

    @classmethod
    def load(cls, cfg, device) -> SDFamily:
        """The prompt file and the folder, checked against the flags; one ConfigError naming the flag."""
        try:
            prompts = read_prompts(cfg.data_prompt_text)
        except PromptError as e:
            raise ConfigError(f"--data-prompt-text {e}") from None
        try:
            sd = load_sd(cfg.teacher)
        except SDError as e:
            raise ConfigError(f"--teacher {e}") from None
        try:
            tokens = prompt_tokens(prompts, sd)  # a token file beside the prompts that does not match: now
        except TokenFileError as e:
            raise ConfigError(f"--data-prompt-text {e}") from None
        c, r = sd.latent_channels, sd.latent_resolution
        if (c, r) != (cfg.channels, cfg.resolution):
            raise ConfigError(
                f"--teacher {cfg.teacher}: the UNet makes {c}x{r}x{r} latents (preset "
                f"{cfg.preset}: {cfg.channels}x{cfg.resolution}x{cfg.resolution})."
            )
        if cfg.metrics == "fd-digits":
            vae = sd.vae.config
            size = sd.latent_resolution * 2 ** (len(vae.block_out_channels) - 1)
            if (vae.out_channels, size) != (1, 8):
                raise ConfigError(
                    f"--metrics fd-digits: the teacher {cfg.teacher} makes {vae.out_channels}x{size}x{size} images, "
                    "not 8x8 digits (FD-digits and prompt accuracy are for the digits teacher, preset digits-lsg)."
                )
        steps = sd.schedule.num_train_timesteps
        if cfg.tmax > steps:
            raise ConfigError(f"--tmax {cfg.tmax}: the teacher {cfg.teacher} has {steps} timesteps (0 to {steps - 1}).")
        if cfg.init_timestep >= steps:
            raise ConfigError(
                f"--init-timestep {cfg.init_timestep}: the teacher {cfg.teacher} has {steps} timesteps "
                f"(0 to {steps - 1})."
            )
        if cfg.generator_steps > cfg.init_timestep:
            raise ConfigError(
                f"--generator-steps {cfg.generator_steps}: the generator's timesteps round(init_timestep (1 - i / K)) "
                f"from --init-timestep {cfg.init_timestep} would repeat; give at most {cfg.init_timestep} steps."
            )
        family = cls(cfg, device, sd, prompts, tokens)
        if cfg.sid_model is not None:
            family.generator_init = load_sid_model(cfg, sd.unet)
        return family

    def __init__(self, cfg, device, sd: StableDiffusion, prompts, tokens: PromptTokens | None = None):
        """From loaded parts (tests and benchmarks bring their own): the text encoder on the device, the VAE on the
        CPU (on the accelerator only while a snapshot decodes), the empty prompt's embedding computed once; the
        snapshot grid's prompts (--validation-prompts, else the prompt file's first lines); `tokens`: the prompt
        file's token ids as `load` checked them (made here when not given)."""
        self.sd, self.prompts, self.device = sd, prompts, device
        self.prompt_file = cfg.data_prompt_text
        self.generator_init = None  # --sid-model's weights (load)
        self.grid_prompts = prompts
        if cfg.validation_prompts is not None:
            try:
                self.grid_prompts = read_prompts(cfg.validation_prompts)
            except PromptError as e:
                raise ConfigError(f"--validation-prompts {e}") from None
        if sd.text_encoder is not None:
            sd.text_to(device)
        if sd.vae is not None:
            sd.vae.to("cpu")
        self.uncond = sd.encode_uncond(self.device)  # batch 1, once ("" encoded; SDXL: zeros)
        # The prompt file's token ids: its token file memory-mapped, or each line tokenised once (sid_fast.t2i.tokens).
        if tokens is None and sd.tokenizer is not None:
            tokens = prompt_tokens(prompts, sd)
        self.tokens = tokens
        self.drop_p = DROPOUT if (cfg.cfg_train_fake != 1 or cfg.cfg_eval_fake != 1) else 0.0

    # Networks.
    def build_networks(self, cfg, device, log) -> Networks:
        """The teacher UNet (frozen), G and the fake score as its copies (official: both start from the teacher; G
        from a distilled generator's weights with --sid-model), and G_ema as a copy of G. With --fsdp they are built on
        the host: FSDP2 moves each block to the accelerator as it shards it (SDXL: no GPU holds four whole 2.6 B
        copies, 41 GB in fp32)."""
        teacher = self.sd.unet.to(torch.device("cpu") if cfg.fsdp else device).eval().requires_grad_(False)
        G = copy.deepcopy(teacher).train().requires_grad_(True)
        if self.generator_init is not None:
            G.load_state_dict(self.generator_init, strict=True)
            log(f"G and G_ema start from --sid-model {cfg.sid_model}.")
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        kwargs = unet_config(teacher)
        return Networks(teacher, G, fake, G_ema, SD_CLASS, kwargs, kwargs, kwargs)

    def make_denoiser(self, cfg, device):
        return SDDenoiser(cfg, self.sd, self.uncond, device)

    # Conditioning: prompts.
    def encode_prompts(self, prompts: list[str]):
        """The conditioning of prompts: the text encoder's last hidden states [N, tokens, width] (SDXL: the dict of
        the UNet's text inputs, sid_fast.t2i.sd.StableDiffusion.encode_text)."""
        return self.sd.encode_text(prompts, self.device)

    def draw(self, g, n: int, device, fake_phase: bool, image_shape=None):
        """(z, text embeddings [N, tokens, width]): prompt indices, z and (fake-score phase with guidance) the dropout
        draws, in this order from `g` (the indices read from a host copy of its stream); dropped prompts get the
        empty prompt's embedding."""
        drop_p = self.drop_p if fake_phase else 0.0
        # The prompt indices are needed on the host (to tokenise): they come from a host generator seeded as the
        # micro-batch's, so nothing waits for the device (on the CPU they equal the device stream's first draw, which
        # is still made so that z and the rest keep their places in the stream).
        torch.randint(len(self.prompts), [n], device=device, generator=g)
        z = torch.randn(image_shape, device=device, generator=g)
        if device.type == "meta" or self.tokens is None:  # memory accounting: indices without values
            cond = self.encode_prompts([""] * n)
        else:  # the lines' token ids, tokenised once per run (or read from the prompt file's token file)
            host = torch.Generator().manual_seed(g.initial_seed())
            idx = torch.randint(len(self.prompts), [n], generator=host).numpy()
            ids = tuple(t.ids(idx) for t in self.tokens) if self.sd.xl else self.tokens.ids(idx)
            cond = self.sd.encode_ids(ids, self.device)
        if drop_p > 0:
            drop = torch.rand([n], device=device, generator=g) < drop_p
            cond = map_cond(lambda u, c: torch.where(drop.reshape(-1, *[1] * (c.ndim - 1)), u, c), self.uncond, cond)
        return z, cond

    def conditioning(self) -> str:
        return f"prompts of {self.prompt_file} ({len(self.prompts)})"

    def describe(self, cfg) -> str:
        return (
            f"SiD-LSG: alpha {cfg.alpha}, t in [{cfg.tmin}, {cfg.tmax}), init_timestep {cfg.init_timestep}, guidance "
            f"kappa1 {cfg.cfg_train_fake:g} / kappa2 {cfg.cfg_eval_fake:g} / kappa4 {cfg.cfg_eval_real:g}, prompt "
            f"dropout {self.drop_p:g}"
            + (
                f"; {cfg.generator_steps}-step generator at timesteps "
                f"{fewstep.timestep_indices(cfg.init_timestep, cfg.generator_steps)} ({cfg.noise_type} re-noising)"
                if cfg.generator_steps > 1
                else ""
            )
        )

    # Outputs.
    @torch.no_grad()
    def sample_latents(self, G_ema, cfg, prompts: list[str], seeds, device) -> torch.Tensor:
        """G_ema's latents (its --generator-steps steps) for (prompt, seed) pairs, z and each fresh re-noising drawn
        from torch.Generator().manual_seed(seed) on the CPU (export.seed_noises)."""
        shape = [self.sd.latent_channels, self.sd.latent_resolution, self.sd.latent_resolution]
        z, noises = export.seed_noises(seeds, shape, cfg.generator_steps)
        return export.generator_latents(G_ema, self.sd.schedule, z.to(device), self.encode_prompts(prompts),
                                        cfg.init_timestep, cfg.generator_steps, cfg.noise_type,
                                        [n.to(device) for n in noises])  # fmt: skip

    def grid(self, G_ema, cfg, device):
        """16 prompts (the first 16 lines of --validation-prompts or of the prompt file, repeated if fewer), seeds
        0-15, decoded by the VAE."""
        prompts = [self.grid_prompts[i % len(self.grid_prompts)] for i in range(16)]
        return export.decode(self.sd.vae, self.sample_latents(G_ema, cfg, prompts, range(16), device), device)

    def write_generator(self, folder, nets: Networks, cfg, kimg: float) -> Path:
        return export.save_unet_folder(
            folder,
            nets.G_ema,
            overwrite=True,  # the run's own folder: a file someone put there is kept, never a reason to stop training
            **generator_meta(cfg.to_json(), kimg),
            example_prompt=self.grid_prompts[0],
        )

    def update_generator(self, folder, **meta) -> None:
        export.update_unet_meta(folder, **meta)

    @torch.no_grad()
    def evaluate(self, G_ema, cfg, device, rank: int, world: int):
        """FD-digits and prompt accuracy of G_ema (text-to-image digits teachers, whose VAE decodes 1x8x8 images) on
        --metric-num images: image i for the prompt naming digit i % 10 (sid_fast.t2i.digits.eval_prompts) and seed
        10,000,000 + i; rank 0. FID-30k and CLIP score of Stable Diffusion runs are computed apart."""
        if cfg.metrics != "fd-digits" or rank != 0:
            return None
        n, b = cfg.metric_num, cfg.batch_gpu
        prompts, labels = digits.eval_prompts(n)
        seeds = range(10_000_000, 10_000_000 + n)
        latents = torch.cat([self.sample_latents(G_ema, cfg, prompts[i : i + b], seeds[i : i + b], device).cpu()
                             for i in range(0, n, b)])  # fmt: skip
        return digits.score_images(digits.decode_images(self.sd.vae, latents), labels)

    def teacher_metric(self, key: str, cfg):
        """The teacher's value at the run's guidance kappa4, from its folder's teacher_metrics.json (the digits
        teacher: sid_fast.t2i.digits); None when the folder has none."""
        return digits.teacher_metric(self.sd.folder, key, cfg.cfg_eval_real)

    @classmethod
    def export(cls, state: dict, state_path, out, overwrite: bool) -> Path:
        """A diffusers UNet folder (sid_fast.t2i.export.save_unet_folder); a .pt file is refused."""
        if str(out).endswith(".pt"):
            raise checkpoints.CheckpointError(
                f"{out}: a Stable Diffusion generator is exported as a diffusers UNet folder; give a folder name."
            )
        from diffusers import UNet2DConditionModel  # an optional dependency: only this family needs it

        unet = export.g_ema_of_state(UNet2DConditionModel, state, state_path, "UNet")
        return export.save_unet_folder(out, unet, overwrite=overwrite,
                                       **generator_meta(state["config"], state["cur_nimg"] / 1e3))  # fmt: skip


def prompt_tokens(prompts, sd: StableDiffusion):
    """The prompt file's token ids for the folder's tokenizer (its token file when one matches); SDXL: a pair, the
    second tokenizer's (which pads with another id) tokenised in memory (a token file holds one tokenizer's ids)."""
    if not sd.xl:
        return PromptTokens(prompts, sd.tokenizer)
    return PromptTokens(prompts, sd.tokenizer), PromptTokens(prompts, sd.tokenizer_2, sd.tokenizer_2.model_max_length)


def generator_meta(cfg_json: dict, kimg: float) -> dict:
    """sid_fast.json of a Stable Diffusion generator folder: how it samples (init_timestep, steps, re-noising), how it
    was made, and for the presets' public teachers their Hub id and license (the model card's base_model and
    license)."""
    official = cfg_json.get("official_teacher")
    meta = dict(
        init_timestep=cfg_json["init_timestep"],
        steps=cfg_json.get("generator_steps", 1),
        noise_type=cfg_json.get("noise_type", "fresh"),
        teacher=Path(str(cfg_json["teacher"])).name,
        preset=cfg_json["preset"],
        kimg=kimg,
        guidance=[cfg_json["cfg_train_fake"], cfg_json["cfg_eval_fake"], cfg_json["cfg_eval_real"]],
        alpha=cfg_json["alpha"],
    )
    if official in SD_HUB_REPOS:
        meta.update(base_model=SD_HUB_REPOS[official], license=SD_LICENSES[official])
    return meta


def load_sid_model(cfg, teacher_unet) -> dict:
    """--sid-model: a distilled generator's weights (a sid_fast UNet or pipeline folder, or an official SiD-LSG
    pickle, read safely), which must fit the teacher's UNet exactly."""
    try:
        unet, _ = export.load_unet_folder(cfg.sid_model)
    except SDError as e:
        raise ConfigError(f"--sid-model {e}") from None
    return fitted_generator(cfg, teacher_unet.state_dict(), unet.state_dict(), "the teacher's UNet")


# ----------------------------------------------------------------------------------------------------------------
# Presets: a base plus what each preset changes.

# SiD-LSG on Stable Diffusion (official SiD-LSG run_sid.sh, sid_train.py): G and the fake score from the teacher UNet,
# alpha 1, t in [20, 980), init_timestep 625, ls = lsg = 1, batch 512 (batch-gpu 1 on 4 GPUs there), lr = glr = 1e-6,
# Adam (0, 0.999), EMA half-life 0.05 Mimg, fp32 with TF32 off, tick 2, snap 50, dump 100, --duration 10 (the script's;
# "modify --duration to reproduce the reported results": the released checkpoints' names end in 4812 to 18789, read
# as kimg). One preset per published guidance scale, kappa1 = kappa2 = kappa4 = kappa, in latent units (4x64x64 for
# 512-pixel images). Teachers: local diffusers folders of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1-base.
SD_TEACHERS = {"sd15": "stable-diffusion-v1-5", "sd21base": "stable-diffusion-2-1-base"}
_LSG = dict(
    cond=False,
    resolution=64,
    channels=4,
    label_dim=0,
    alpha=1.0,
    tmin=20,
    tmax=980,
    init_timestep=625,
    ls=1.0,
    lsg=1.0,
    batch=512,
    batch_gpu=1,
    lr=1e-6,
    glr=1e-6,
    precision="fp32",
    dropout=0.0,
    augment=0.0,
    ema=0.05,
    duration=10,
    tick=2,
    snap=50,
    dump=100,
    metrics="none",
)
PRESETS: dict[str, dict] = {
    f"{model}-lsg{kappa:g}": dict(
        _LSG, official_teacher=folder, cfg_train_fake=kappa, cfg_eval_fake=kappa, cfg_eval_real=kappa
    )
    for model, folder in SD_TEACHERS.items()
    for kappa in (1.5, 2.0, 3.0, 4.5)
}
# SiD-LSG on the text-to-image digits teacher (sid_fast.t2i.digits: a diffusers Stable Diffusion folder with SD 1.5's
# schedule, 4x8x8 latents and prompts such as "a handwritten seven"): the official SiD-LSG settings (alpha 1, t in
# [20, 980), init_timestep 625, kappa1 = kappa2 = kappa4) at the digits preset's CPU scale (batch, learning rates and
# EMA), evaluated by FD-digits and prompt accuracy. kappa 1.5, the published scale with the lowest FID, is the default
# here too: prompt accuracy 0.994 at FD-digits 11.3 (kappa 1: 0.952 at 7.0; kappa 2: 0.999 at 21.3); the kappa sweep,
# studies/lsg_kappa, runs all of them.
PRESETS["digits-lsg"] = dict(
    edm.PRESETS["digits"],
    teacher=str(ASSETS / "digits-sd"),
    data_prompt_text=str(ASSETS / "digits-prompts.txt"),
    channels=4,
    alpha=1.0,
    tmin=20,
    tmax=980,
    init_timestep=625,
    cfg_train_fake=1.5,
    cfg_eval_fake=1.5,
    cfg_eval_real=1.5,
    ls=1.0,
    lsg=1.0,
    batch=128,
    batch_gpu=128,
    duration=0.008,
    tick=1,
    metric_num=1000,
)
# SiD-LSG on SDXL-base (1024 px, latents 4x128x128): no official SiD code or paper distills SDXL; these presets run
# SiD-LSG's iteration and settings unchanged (alpha 1, t in [20, 980), init_timestep 625, kappa1 = kappa2 = kappa4,
# lr 1e-6, EMA 0.05 Mimg) at the published kappas, with what the memory count (bench.memory --configs sdxl,
# docs/text-to-image.md) says an SDXL distillation needs: four 2.6 B UNets and two Adam states are 76.5 GiB before
# any activation, so run them with --fsdp (FSDP2; with selective recomputation 19 images per 80 GB GPU at x8:
# batch-gpu 8 leaves room), bf16 autocast with fp32 masters. The teacher is a local diffusers folder of
# stabilityai/stable-diffusion-xl-base-1.0.
SDXL_TEACHERS = {"sdxl": "stable-diffusion-xl-base-1.0"}
for _kappa in (1.5, 2.0, 3.0, 4.5):
    PRESETS[f"sdxl-lsg{_kappa:g}"] = dict(
        _LSG,
        official_teacher=SDXL_TEACHERS["sdxl"],
        resolution=128,
        batch_gpu=8,
        precision="bf16",
        checkpointing="selective",
        cfg_train_fake=_kappa,
        cfg_eval_fake=_kappa,
        cfg_eval_real=_kappa,
    )
FID_REFS: dict[str, str] = {}

# The Hub repositories of the SD teachers (runwayml's SD 1.5 repository was withdrawn; this is its maintained copy),
# and the files of a diffusers folder that sid_fast reads (no fp16 variants, no safety checker).
SD_HUB_REPOS = {
    "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-2-1-base": "stabilityai/stable-diffusion-2-1-base",
    "stable-diffusion-xl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
}
# Their licenses (the Hub repositories' model cards), which a generator distilled from them carries on.
SD_LICENSES = {
    "stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-2-1-base": "openrail++",
    "stable-diffusion-xl-base-1.0": "openrail++",
}
