"""The flow-matching family: SiD on flow-matching DiT teachers ("Score Distillation of Flow Matching Models", Zhou,
Gu, Zheng et al., arXiv 2509.25127; official repository ml-sid-dit, training/sid_dit_sd3_training_loop.py), with
Stable Diffusion 3 / 3.5 (MMDiT), FLUX.1 and SANA teachers from a local diffusers folder (sid_fast.t2i.sd3, flux,
sana) and prompts as the condition.

The phases are sid_fast.training.sid's; what a flow-matching teacher changes is here and in sid_fast.t2i.flow:
- `FlowDenoiser`: noise levels are flow times t = sigmoid(N(log 2, 1.6^2)) (a fresh draw in each phase, one shared by
  the teacher and the fake score in the generator phase); x_t = (1 - t) x0 + t eps; networks return velocities, read
  as x0-predictions D = x_t - t v; guidance kappa1 / kappa2 / kappa4 in velocity space with the empty prompt; the
  fake-score loss is flow matching on G's samples, the generator loss SiD's with w(t) (--weighting).
- The generator has K = --generator-steps steps (4 in the presets) from t_init = --init-timestep / 999 (999: pure
  noise); each iteration trains the mixture of 1..K steps (sid_fast.t2i.flow).
- `FlowFamily.draw`: every micro-batch draws its prompts (uniformly, with replacement) and z from its own generator,
  as the Stable Diffusion family; each line meets the tokenizers once per run (SANA: with its instruction before
  it). No prompt dropout (the
  official flow loops set use_context_dropout_train_fake = False).

Where the official loop differs and why: it draws k on rank 0 and broadcasts it (a collective and a device-to-host
read per iteration); here k comes from a hash of (seed, iteration), the same on every rank. Its re-noising draws
come from the global CUDA RNG, here from the micro-batch's generator. It runs the generator phase's earlier steps with
gradient enabled and then detaches their result; here they run without gradient (the same values, no graph kept).
Its EMA is off (ema 0): the presets set --ema 0 (G_ema is G).

--method sida runs the official data-aided variant (--train_diffusiongan 1) on latent/caption pairs
(sid_fast.t2i.pairs): the fake network is also the discriminator (flow.PooledTokens), its terms are
`data_aided_fake_loss_sums` and `data_aided_generator_loss_sums` below, the iteration sid_fast.training.sida's
FlowSiDATrainer; every phase's prompts are the pairs' captions.

Precision: bf16 runs the three transformers under torch.autocast(bfloat16) with fp32 master weights (the official
AMP mode), the frozen teacher and the text encoders stored in bf16; fp32 is exact. The official pure-bf16 mode (bf16
weights and Adam states, Adam eps 1e-4, value clipping of gradients at 1) is not built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.families.base import ASSETS, FakeOutput, Family, Networks, SiDASupport
from sid_fast.flags import ConfigError
from sid_fast.storage import atomic_folder, atomic_write_text
from sid_fast.t2i import digits, export, flow, pairs
from sid_fast.t2i.flux import CLIP_TOKENS, T5_TOKENS, Flux, FluxError, is_flux_folder, load_flux
from sid_fast.t2i.sana import InstructedPrompts, Sana, SanaError, is_sana_folder, load_sana
from sid_fast.t2i.sd3 import SD3, SD3Error, is_sd3_folder, load_sd3, token_length
from sid_fast.t2i.tokens import PromptTokens

SD3_CLASS = "diffusers.SD3Transformer2DModel"
FLUX_CLASS = "diffusers.FluxTransformer2DModel"
SANA_CLASS = "diffusers.SanaTransformer2DModel"
SID_META = export.SID_META
FOLDER_FILES = (export.WEIGHTS, export.CONFIG, SID_META)


class FlowDenoiser:
    """A flow-matching transformer behind the SiD loop's seam: levels are flow times t in (0, 1), conditions dicts of
    text embeddings, outputs read as x0-predictions in fp32."""

    logvar = False
    aug_dim = 0
    multistep = True  # the trainer passes this iteration's step count and the micro-batch's generator to `generate`

    def __init__(self, cfg, kind, uncond: dict, device, tap: flow.PooledTokens | None = None):
        """kind: the teacher's folder object (sid_fast.t2i.sd3.SD3, sid_fast.t2i.flux.Flux): how its transformer is
        called (`velocity_model`) and its latents' shape; `tap`: the fake network's discriminator logits (--method
        sida)."""
        self.cfg, self.kind, self.uncond, self.device, self.tap = cfg, kind, uncond, device, tap
        self.channels, self.resolution = kind.latent_channels, kind.latent_resolution
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None

    def image_shape(self, n: int) -> list[int]:
        return [n, self.channels, self.resolution, self.resolution]

    def fake_level(self, n: int, generator) -> torch.Tensor:
        return flow.draw_t(n, self.device, generator, torch.get_default_dtype())

    generator_level = fake_level

    def noise(self, t, eps):
        return eps

    def noisy(self, y, eps, t):
        return flow.noisy(y, eps, t)

    def aug_zeros(self, n: int):
        return None

    def _model(self, call, guidance: float = 1.0):
        """call -> model(x, t, cond) -> v in fp32 (under bf16 autocast on the bf16 path); `guidance`: the call's
        guidance scale, for transformers with a guidance embedding (FLUX.1-dev)."""
        inner = self.kind.velocity_model(call, guidance)

        def model(x, t, cond):
            on = self.autocast is not None and x.device.type != "meta"
            with torch.autocast("cpu" if x.device.type == "meta" else x.device.type, torch.bfloat16, enabled=on):
                out = inner(x, t, cond)
            return out.to(torch.promote_types(out.dtype, torch.float32))

        return model

    def guided(self, call, x_t, t, cond, kappa: float) -> torch.Tensor:
        return flow.guided_velocity(self._model(call, kappa), x_t, t, cond, self.uncond, kappa)

    def generate(self, call, z, cond, run: int | None = None, generator=None, train: bool = False):
        """G's sample after `run` of its K steps (default K); see sid_fast.t2i.flow.generate."""
        return flow.generate(self._model(call), z, cond, self.cfg.init_timestep, self.cfg.generator_steps, run,
                             self.cfg.noise_type, generator, train_last=train)  # fmt: skip

    def teacher(self, call, x_t, t, cond) -> torch.Tensor:
        return flow.x0_from_v(x_t, self.guided(call, x_t, t, cond, self.cfg.cfg_eval_real), t)

    def fake(self, call, x_t, t, cond, aug=None, return_flag=None, training=False) -> FakeOutput:
        """Training (its own phase): the velocity with kappa1; otherwise the x0-prediction with kappa2. With
        return_flag "encoder_decoder" (the data-aided variant) also the discriminator logits of the same call, from
        its conditional half (official sid_dit_denoise)."""
        kappa = self.cfg.cfg_train_fake if training else self.cfg.cfg_eval_fake
        logits = None
        if return_flag is None:
            v = self.guided(call, x_t, t, cond, kappa)
        elif return_flag == "encoder_decoder" and self.tap is not None:
            with self.tap:
                v = self.guided(call, x_t, t, cond, kappa)
            logits = self.tap.take(guided=kappa != 1)
        else:
            raise ValueError(f"return_flag {return_flag!r}: the fake network's logits need --method sida.")
        if training:
            return FakeOutput(D=None, raw=v, logits=logits)
        return FakeOutput(D=flow.x0_from_v(x_t, v, t), logits=logits)

    def discriminator_logits(self, call, x_t, t, cond, aug=None) -> torch.Tensor:
        """The logits of real latents: one conditional call, without guidance (official return_flag "encoder"; a
        FLUX transformer's guidance embedding gets kappa1, as in the fake branch)."""
        with self.tap:
            v = self._model(call, self.cfg.cfg_train_fake)(x_t, t, cond)
        return flow.along(self.tap.take(guided=False), v)  # the network's output in the graph: FSDP2's backward

    def fake_loss_sum(self, out: FakeOutput, y, eps, t):
        rows, ok = flow.fake_loss_rows(out.raw, y, eps)
        return rows.sum(), ok

    def generator_loss_sum(self, x_g, y_real, out: FakeOutput, alpha: float, level=None):
        w = flow.weight(self.cfg.weighting, level, x_g, y_real)
        rows, ok = flow.generator_loss_rows(x_g, y_real, out.D, w, alpha)
        return rows.sum(), ok

    def data_aided_fake_loss_sums(self, out: FakeOutput, logits_real, y, eps):
        """(summed flow-matching loss, summed discriminator loss, [N] rows kept) of a data-aided fake-phase micro-batch
        (sid_fast.training.sida.FlowSiDATrainer): rows with a NaN in v or either branch's logits leave both terms."""
        rows, ok = flow.fake_loss_rows(out.raw, y, eps)
        ok = ok & ~(out.logits.isnan().flatten(1).any(1) | logits_real.isnan().flatten(1).any(1))
        loss_D = flow.discriminator_loss_rows(logits_real, out.logits, ok, y[0].numel())
        return torch.where(ok, rows, torch.zeros_like(rows)).sum(), loss_D.sum(), ok

    def data_aided_generator_loss_sums(self, x_g, y_real, out: FakeOutput, alpha: float, level):
        """(summed SiD term, summed GAN term, [N] rows kept) of a data-aided generator micro-batch; the GAN term is
        zero when `out` has no logits (before --sida-gan-start-kimg). A NaN logit drops its row from both terms (the
        official mask)."""
        w = flow.weight(self.cfg.weighting, level, x_g, y_real)
        rows, ok = flow.generator_loss_rows(x_g, y_real, out.D, w, alpha)
        if out.logits is None:
            return rows.sum(), torch.zeros((), device=x_g.device), ok
        ok = ok & ~out.logits.isnan().flatten(1).any(1)
        loss_gan = flow.gan_loss_rows(out.logits, w, ok, x_g[0].numel())
        return torch.where(ok, rows, torch.zeros_like(rows)).sum(), loss_gan.sum(), ok

    def begin_phase(self, net) -> None:
        pass


def transformer_config(net) -> dict:
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {k: plain(v) for k, v in dict(net.config).items() if not k.startswith("_")}


class FlowFamily(Family):
    """An SD3 / SD3.5 or FLUX.1 folder and a prompt file (see the module docstring)."""

    name = "flow"
    generator_classes = (SD3_CLASS, FLUX_CLASS, SANA_CLASS)
    fields = ("resolution", "channels", "init_timestep", "generator_steps", "noise_type", "weighting",
              "cfg_train_fake", "cfg_eval_fake", "cfg_eval_real")  # fmt: skip
    folder_files = FOLDER_FILES
    # The data-aided variant (official --train_diffusiongan 1): no clipping of the fake network's gradients (the
    # official AMP mode clips only without autocast), one NaN rule; real data are latent/caption pairs.
    sida = SiDASupport(fake_grad_clip=None, edm2_rules=False, latent_pairs=True)

    @classmethod
    def claims(cls, cfg) -> bool:
        return (
            is_sd3_folder(cfg.teacher) or is_flux_folder(cfg.teacher) or is_sana_folder(cfg.teacher)
            or cfg.preset in PRESETS
        )  # fmt: skip

    @classmethod
    def missing_teacher(cls, cfg) -> str:
        repo = HUB_REPOS.get(cfg.official_teacher, "an SD3, FLUX or SANA pipeline")
        return (
            f"--teacher is required for preset {cfg.preset!r}: a local diffusers folder of {repo} (sid_fast downloads "
            "nothing; e.g. `hf download` it, accepting its license on the Hub first)."
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        for flag, bad, shown, why in (
            ("--precision", cfg.precision not in ("fp32", "bf16"), cfg.precision,
             "flow-matching teachers run in fp32 or bf16 (autocast with fp32 master weights)"),
            ("--data", cfg.data is not None and cfg.method != "sida", cfg.data, "SiD on flow matching is data-free "
             "(prompts come from --data-prompt-text); real latent/caption pairs are read by --method sida"),
            ("--data-prompt-text", cfg.method == "sida" and cfg.data_prompt_text is not None, cfg.data_prompt_text,
             "with --method sida every phase draws its prompts from the captions of --data's pairs (as the official "
             "data-aided loop); leave it out"),
            ("--xflip", cfg.method == "sida" and cfg.xflip, cfg.xflip, "a mirrored image's latents are not the "
             "mirrored latents; give mirrored images to sid_fast.t2i.pairs build instead"),
            ("--compile", cfg.method == "sida" and bool(cfg.compile), cfg.compile, "with --method sida the "
             "discriminator's logits are read by a forward hook inside the fake network, which a compiled forward "
             "does not run; leave --compile out"),
            ("--cuda-graphs", cfg.method == "sida" and cfg.cuda_graphs != "none", cfg.cuda_graphs, "with --method "
             "sida the discriminator's logits are read by a forward hook inside the fake network, which a replayed "
             "graph does not run; use --cuda-graphs none"),
            ("--metrics", cfg.metrics not in ("none", "fd-digits"), cfg.metrics, "FID and CLIP of flow-matching "
             "generators are computed apart (python -m sid_fast.t2i.evaluate); give --metrics none"),
            ("--augment", cfg.augment > 0, cfg.augment, "EDM's augmentation is not built for latents"),
            ("--cuda-graphs", cfg.cuda_graphs == "step", cfg.cuda_graphs, "text conditioning is encoded on the host "
             "inside every micro-batch; use --cuda-graphs sites"),
            ("--weighting", cfg.weighting not in flow.WEIGHTINGS, cfg.weighting,
             f"choose one of {', '.join(flow.WEIGHTINGS)}"),
        ):  # fmt: skip
            if bad:
                raise ConfigError(f"{flag} {shown}: {why}.")
        if cfg.data_prompt_text is None and cfg.method != "sida":
            raise ConfigError(
                f"--data-prompt-text is required with the flow-matching teacher {cfg.teacher}: a text file of prompts, "
                "one per line (the official runs use midjourney-v6-llava or Aesthetics 6+ captions, never COCO's)."
            )
        if cfg.init_timestep < 1:
            raise ConfigError(f"--init-timestep {cfg.init_timestep}: the generator's first time is init/999 > 0.")

    @classmethod
    def load(cls, cfg, device) -> FlowFamily:
        if cfg.method != "sida":
            try:
                prompts = read_prompts(cfg.data_prompt_text)
            except PromptError as e:
                raise ConfigError(f"--data-prompt-text {e}") from None
        text_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        try:
            if is_flux_folder(cfg.teacher):
                model = load_flux(cfg.teacher, cfg.resolution, text_dtype=text_dtype)
            elif is_sana_folder(cfg.teacher):  # Gemma-2 in bf16 whatever the precision, as the official loop keeps it
                model = load_sana(cfg.teacher)
            else:
                model = load_sd3(cfg.teacher, text_dtype=text_dtype)
        except (SD3Error, FluxError, SanaError) as e:
            raise ConfigError(f"--teacher {e}") from None
        c, r = model.latent_channels, model.latent_resolution
        if (c, r) != (cfg.channels, cfg.resolution):
            raise ConfigError(
                f"--teacher {cfg.teacher}: the transformer makes {c}x{r}x{r} latents (preset {cfg.preset}: "
                f"{cfg.channels}x{cfg.resolution}x{cfg.resolution})."
            )
        if cfg.metrics == "fd-digits":
            vae = model.vae.config
            size = r * 2 ** (len(vae.block_out_channels) - 1)
            if (vae.out_channels, size) != (1, 8):
                raise ConfigError(
                    f"--metrics fd-digits: the teacher {cfg.teacher} makes {vae.out_channels}x{size}x{size} images, "
                    "not 8x8 digits (FD-digits and prompt accuracy are for the digits teacher, preset digits-flow)."
                )
        real = None
        if cfg.method == "sida":
            try:
                real = pairs.open_pairs(cfg.data, model.vae)
            except pairs.PairsError as e:
                raise ConfigError(str(e)) from None
            if real.latent_shape != [c, r, r]:
                raise ConfigError(
                    f"--data {cfg.data}: pairs of {'x'.join(map(str, real.latent_shape))} latents, the teacher makes "
                    f"{c}x{r}x{r}."
                )
            prompts = real.captions
        return cls(cfg, device, model, prompts, real_data=real)

    def __init__(self, cfg, device, model: SD3 | Flux, prompts, real_data: pairs.PairDataset | None = None):
        """From loaded parts (tests bring their own): the text encoders on the device, the VAE on the CPU, the empty
        prompt's conditioning once; each prompt line tokenised once per run (SD3: 77 tokens for all three tokenizers,
        fewer where a tokenizer's model_max_length is shorter; FLUX: 77 for CLIP, 512 for T5)."""
        self.model, self.prompts, self.device = model, prompts, device
        self.real_data = real_data  # --method sida: latent/caption pairs; every phase's prompts are their captions
        self.prompt_file = cfg.data_prompt_text if real_data is None else f"the captions of {cfg.data}"
        self.tap = flow.PooledTokens()  # the fake network's discriminator logits, attached with --method sida
        for enc in model.text_encoders:
            enc.to(device)
        if model.vae is not None:
            model.vae.to("cpu")
        toks = model.tokenizers or ()
        if isinstance(model, Sana) and toks:  # each line with the instruction before it, at the pipeline's length
            self.tokens = [PromptTokens(InstructedPrompts(prompts, model.instruction), toks[0], length=model.length)]
        else:
            lengths = (CLIP_TOKENS, T5_TOKENS) if isinstance(model, Flux) else [token_length(t) for t in toks]
            self.tokens = [PromptTokens(prompts, tok, length=n) for tok, n in zip(toks, lengths)]
        self.uncond = self.encode_prompts([""])

    # Networks.
    def build_networks(self, cfg, device, log) -> Networks:
        """The teacher transformer (frozen); G and the fake score start as its copies, G_ema as G's. With --fsdp they
        are built on the host: FSDP2 moves each block to the accelerator as it shards it, so no GPU ever holds four
        whole copies (at 8 B parameters, 128 GB in fp32)."""
        home = torch.device("cpu") if cfg.fsdp else device
        teacher = self.model.transformer.to(home).eval().requires_grad_(False)
        G = copy.deepcopy(teacher).train().requires_grad_(True)
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        if cfg.method == "sida":
            self.tap.attach(fake)  # after the copies: a hook is copied with its module
        kwargs = transformer_config(teacher)
        return Networks(teacher, G, fake, G_ema, self.model.transformer_class, kwargs, kwargs, kwargs)

    def make_denoiser(self, cfg, device):
        return FlowDenoiser(cfg, self.model, self.uncond, device, tap=self.tap if cfg.method == "sida" else None)

    # Conditioning.
    def encode_prompts(self, prompts: list[str]) -> dict:
        return self._embeddings(self.model.encode_text(prompts, self.device))

    def real_inputs(self, raw, idx, generator):
        """--method sida: (latents of the pairs' raw posteriors on the device, drawn from `generator`, the conditioning
        of their captions `idx`)."""
        return pairs.draw_latents(raw, self.real_data.meta, generator), self.encode_lines(idx)

    def encode_lines(self, idx) -> dict:
        """The conditioning of prompt lines `idx` (numpy int array; with --method sida the pairs' captions); on the
        meta device (memory accounting) ids in the tokenizers' shapes."""
        if self.device.type == "meta":
            ids = [i.to(self.device) for i in self.model.tokenize([""] * len(idx))]  # zeros in the tokenizers' shapes
        else:
            ids = [t.ids(idx) for t in self.tokens]
        return self._embeddings(self.model.encode_ids(ids, self.device))

    def _embeddings(self, cond: dict) -> dict:
        """The text encoders' outputs in the run's default float dtype (bf16 encoders: their outputs widened)."""
        dtype = torch.get_default_dtype()
        return {k: v.to(torch.promote_types(v.dtype, dtype)) for k, v in cond.items()}

    def draw(self, g, n: int, device, fake_phase: bool, image_shape=None):
        """(z, conditioning): prompt indices (read from a host copy of the micro-batch's stream, as the Stable
        Diffusion family) and z, in this order from `g`."""
        torch.randint(len(self.prompts), [n], device=device, generator=g)
        z = torch.randn(image_shape, device=device, generator=g)
        if device.type == "meta":
            return z, self.encode_lines(np.zeros(n, np.int64))
        host = torch.Generator().manual_seed(g.initial_seed())
        idx = torch.randint(len(self.prompts), [n], generator=host).numpy()
        return z, self.encode_lines(idx)

    def conditioning(self) -> str:
        return f"prompts of {self.prompt_file} ({len(self.prompts)})"

    def describe(self, cfg) -> str:
        return (
            f"SiD on flow matching: alpha {cfg.alpha}, {cfg.generator_steps}-step generator from t = "
            f"{cfg.init_timestep}/999 ({cfg.noise_type} re-noising), t = sigmoid(N(log 2, 1.6^2)), w(t) "
            f"{cfg.weighting}, guidance kappa1 {cfg.cfg_train_fake:g} / kappa2 {cfg.cfg_eval_fake:g} / kappa4 "
            f"{cfg.cfg_eval_real:g}"
            + (
                f"; data-aided (the fake network's pooled final tokens as discriminator): lsd {cfg.lsd:g}, lsg_gan "
                f"{cfg.lsg_gan:g}, generator steps after {cfg.sida_g_start_kimg:g} kimg, GAN term after "
                f"{cfg.sida_gan_start_kimg:g} kimg"
                if cfg.method == "sida"
                else ""
            )
        )

    # Outputs.
    @torch.no_grad()
    def sample_latents(self, G_ema, cfg, prompts: list[str], seeds, device) -> torch.Tensor:
        """G_ema's K-step latents for (prompt, seed) pairs: z and each fresh re-noising drawn from
        torch.Generator().manual_seed(seed) on the CPU, so a pair gives the same latents in any batch."""
        meta = dict(steps=cfg.generator_steps, init_timestep=cfg.init_timestep, noise_type=cfg.noise_type)
        model = self.make_denoiser(cfg, device)._model(G_ema)  # the run's precision (bf16: under autocast)
        return sample_flow(self.model, meta, prompts, seeds, device, model=model)

    def grid(self, G_ema, cfg, device):
        prompts = [self.prompts[i % len(self.prompts)] for i in range(16)]
        latents = self.sample_latents(G_ema, cfg, prompts, range(16), device)
        return None if self.model.vae is None else decode_flow(self.model.vae, latents, device)

    @torch.no_grad()
    def evaluate(self, G_ema, cfg, device, rank: int, world: int, steps: int | None = None):
        """FD-digits and prompt accuracy of G_ema's K-step images (`steps`: another step count) on --metric-num
        images, image i for the prompt naming digit i % 10 (sid_fast.t2i.digits.eval_prompts) and seed 10,000,000 +
        i, as the Stable Diffusion family's; rank 0. FID and CLIP of flow generators are computed apart."""
        if cfg.metrics != "fd-digits" or rank != 0:
            return None
        n, b = cfg.metric_num, cfg.batch_gpu
        prompts, labels = digits.eval_prompts(n)
        seeds = range(10_000_000, 10_000_000 + n)
        meta = dict(steps=steps or cfg.generator_steps, init_timestep=cfg.init_timestep, noise_type=cfg.noise_type)
        model = self.make_denoiser(cfg, device)._model(G_ema)
        latents = torch.cat([sample_flow(self.model, meta, prompts[i : i + b], seeds[i : i + b], device,
                                         model=model).cpu() for i in range(0, n, b)])  # fmt: skip
        return digits.score_images(digits.decode_images(self.model.vae, latents), labels)

    def teacher_metric(self, key: str, cfg):
        """The teacher's value at the run's guidance kappa4, from its folder's teacher_metrics.json (the digits flow
        teacher: sid_fast.t2i.digits_flow); None when the folder has none."""
        return digits.teacher_metric(self.model.folder, key, cfg.cfg_eval_real)

    def write_generator(self, folder, nets: Networks, cfg, kimg: float) -> Path:
        return save_transformer_folder(folder, nets.G_ema, overwrite=True, **generator_meta(cfg.to_json(), kimg))

    def update_generator(self, folder, **meta) -> None:
        path = Path(folder)
        full = dict(json.loads((path / SID_META).read_text()), **export.plain_value(meta))
        atomic_write_text(path / SID_META, json.dumps(full, indent=2) + "\n")

    @classmethod
    def export(cls, state: dict, state_path, out, overwrite: bool) -> Path:
        if str(out).endswith(".pt"):
            raise checkpoints.CheckpointError(
                f"{out}: a flow-matching generator is exported as a diffusers transformer folder; give a folder name."
            )
        from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel  # optional

        cls_ = {SD3_CLASS: SD3Transformer2DModel, FLUX_CLASS: FluxTransformer2DModel,
                SANA_CLASS: SanaTransformer2DModel}.get(state.get("class_name"))  # fmt: skip
        if cls_ is None:
            raise checkpoints.CheckpointError(
                f"{state_path}: G is a {state.get('class_name')!r}, not a flow transformer."
            )
        net = export.g_ema_of_state(cls_, state, state_path, "transformer")
        return save_transformer_folder(out, net, overwrite=overwrite,
                                       **generator_meta(state["config"], state["cur_nimg"] / 1e3))  # fmt: skip


FORMAT = "sid_fast-flow-1"  # sid_fast.json's format of a flow generator folder


def is_flow_generator(path) -> bool:
    """A flow generator folder (save_transformer_folder): config.json, weights and sid_fast.json of FORMAT."""
    p = Path(path)
    try:
        return (p / export.CONFIG).is_file() and json.loads((p / SID_META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_flow_generator(path, teacher, device="cpu", dtype=torch.float32):
    """(the teacher's folder object with the generator as its transformer, the generator's sid_fast.json) of a flow
    generator folder and its teacher's folder (text encoders, VAE; the teacher's transformer is not read)."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel  # optional

    meta = json.loads((Path(path) / SID_META).read_text())
    flux, sana = is_flux_folder(teacher), is_sana_folder(teacher)
    cls_ = FluxTransformer2DModel if flux else SanaTransformer2DModel if sana else SD3Transformer2DModel
    try:
        net = cls_.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as e:  # diffusers: a folder of another class, missing or corrupt weights
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise checkpoints.CheckpointError(f"{path}: not a {cls_.__name__} folder ({reason}).") from None
    if flux:
        kind = load_flux(teacher, int(meta["resolution"]), transformer=net)
    elif sana:
        kind = load_sana(teacher, transformer=net)
    else:
        kind = load_sd3(teacher, transformer=net)
    for m in (net, *kind.text_encoders):
        m.to(device)
    return kind, meta


@torch.no_grad()
def sample_flow(kind, meta: dict, prompts: list[str], seeds, device, steps: int | None = None,
                model=None) -> torch.Tensor:  # fmt: skip
    """Latents of a flow generator for (prompt, seed) pairs: its recorded K steps (or `steps`) from its
    init_timestep with its re-noising, z and each fresh noise drawn from torch.Generator().manual_seed(seed).
    `model`: model(x, t, cond) -> v (default: kind's transformer in its own dtype)."""
    k = int(steps or meta["steps"])
    shape = [kind.latent_channels, kind.latent_resolution, kind.latent_resolution]
    z, noises = export.seed_noises(seeds, shape, k)
    cond = {n: v.to(torch.promote_types(v.dtype, torch.float32)) for n, v in kind.encode_text(prompts, device).items()}
    model = model or kind.velocity_model(kind.transformer, 1.0)
    return flow.generate(model, z.to(device), cond, int(meta["init_timestep"]), k, None, meta["noise_type"],
                         noises=[n.to(device) for n in noises])  # fmt: skip


def decode_flow(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """uint8 images of SD3/FLUX latents (the VAE's shift_factor undone before its scaling_factor)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return export.decode(vae, latents + shift * vae.config.scaling_factor, device)


def save_transformer_folder(path, net, overwrite: bool = False, **meta) -> Path:
    """`net` as a diffusers transformer folder (config.json, diffusion_pytorch_model.safetensors) with sid_fast.json
    (how it samples: steps, init_timestep, noise type; how it was made), written atomically."""

    def fill(tmp: Path) -> None:
        net.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / SID_META).write_text(json.dumps(export.plain_value(dict(meta, format=FORMAT)), indent=2) + "\n")

    return atomic_folder(path, fill, checkpoints.CheckpointError, own=FOLDER_FILES, overwrite=overwrite)


def generator_meta(cfg_json: dict, kimg: float) -> dict:
    """sid_fast.json of a flow generator folder: how it samples (steps, init_timestep, noise type, latent side), how
    it was made."""
    return dict(
        steps=cfg_json["generator_steps"],
        resolution=cfg_json["resolution"],
        init_timestep=cfg_json["init_timestep"],
        noise_type=cfg_json["noise_type"],
        teacher=Path(str(cfg_json["teacher"])).name,
        preset=cfg_json["preset"],
        kimg=kimg,
        guidance=[cfg_json["cfg_train_fake"], cfg_json["cfg_eval_fake"], cfg_json["cfg_eval_real"]],
        weighting=cfg_json["weighting"],
        alpha=cfg_json["alpha"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Presets. ml-sid-dit's defaults and README (sid_dit_sd3_train.py, training/sid_dit_sd3_training_loop.py): G and the
# fake score from the teacher transformer, alpha 1, a four-step generator from t = 999/999 with fresh re-noising,
# w(t) = 1 - t, ls 1, lsg 100, batch 256, Adam (0, 0.999) eps 1e-8, lr = glr = 1e-6 (the README's AMP value; its
# example commands use 5e-6 and its pure-bf16 mode 1e-5), AMP bf16 with fp32 masters, EMA off, --duration in Mimg
# (the examples 1-2). Guidance: the repository gives one example, SANA's kappa1 = kappa2 = kappa4 = 4.5, and calls
# its settings plug-and-play across teachers; per-teacher values from the paper could not be read. 1024-pixel images
# (16x128x128 latents). Selective recomputation and a batch per GPU that fits 80 GB under --fsdp on 8 GPUs
# (bench.memory, docs/flow-matching.md). FLUX.1-dev's transformer has a guidance embedding: each call gets its own
# scale in it (the fake score kappa1 or kappa2, the teacher kappa4, G 1), with classifier-free guidance on top where
# it is not 1, as the official FLUX loop does.
HUB_REPOS = {
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "stable-diffusion-3-medium-diffusers": "stabilityai/stable-diffusion-3-medium-diffusers",
    "stable-diffusion-3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "stable-diffusion-3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "Sana_600M_512px_diffusers": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "Sana_1600M_512px_diffusers": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
}
_SID_FLOW = dict(
    cond=False,
    resolution=128,
    channels=16,
    label_dim=0,
    alpha=1.0,
    init_timestep=999,
    generator_steps=4,
    noise_type="fresh",
    weighting="1_minus_sigma",
    ls=1.0,
    lsg=100.0,
    batch=256,
    batch_gpu=4,
    checkpointing="selective",
    lr=1e-6,
    glr=1e-6,
    precision="bf16",
    dropout=0.0,
    augment=0.0,
    ema=0.0,
    duration=2.0,
    tick=2,
    snap=50,
    dump=100,
    metrics="none",
    cfg_train_fake=4.5,
    cfg_eval_fake=4.5,
    cfg_eval_real=4.5,
)
PRESETS: dict[str, dict] = {
    "sd3-medium-sid": dict(_SID_FLOW, official_teacher="stable-diffusion-3-medium-diffusers", batch_gpu=16),
    "sd35-medium-sid": dict(_SID_FLOW, official_teacher="stable-diffusion-3.5-medium", batch_gpu=16),
    "sd35-large-sid": dict(_SID_FLOW, official_teacher="stable-diffusion-3.5-large"),
    # FLUX.1-dev (12 B): the same settings; the official README recommends B100s for it at 1024 px.
    "flux-dev-sid": dict(_SID_FLOW, official_teacher="FLUX.1-dev", batch_gpu=2),
    # SANA 0.6B / 1.6B at 512 px (32x16x16 latents of its DC-AE), the official example's teacher; Gemma-2 in bf16.
    # batch-gpu 32: the whole batch of 256 in one round on 8 GPUs; bench.memory counts 330 / 203 images per 80 GB GPU
    # with selective recomputation under --fsdp x8 (267 / 92 on one GPU).
    "sana-600m-512-sid": dict(
        _SID_FLOW, official_teacher="Sana_600M_512px_diffusers", resolution=16, channels=32, batch_gpu=32
    ),
    "sana-1600m-512-sid": dict(
        _SID_FLOW, official_teacher="Sana_1600M_512px_diffusers", resolution=16, channels=32, batch_gpu=32
    ),
}
# Few-step SiD on the flow-matching digits teacher (sid_fast.t2i.digits_flow: an SD3 folder with 4x8x8 latents and
# prompts such as "a handwritten seven"): the official settings (alpha 1, a four-step generator from t = 999/999 with
# fresh re-noising, w(t) = 1 - t, lsg 100, EMA off, kappa1 = kappa2 = kappa4) at the digits presets' CPU scale (batch,
# learning rates: 3e-5, where 1e-4 left the four-step generator no better than its start), fp32, kappa 1.5 (as the
# digits-lsg preset), 16 kimg; evaluated by FD-digits and prompt accuracy; studies/flow_digits runs steps x guidance.
PRESETS["digits-flow"] = dict(
    _SID_FLOW,
    teacher=str(ASSETS / "digits-flow"),
    data_prompt_text=str(ASSETS / "digits-prompts.txt"),
    resolution=8,
    channels=4,
    batch=128,
    batch_gpu=128,
    checkpointing="none",
    lr=3e-5,
    glr=3e-5,
    precision="fp32",
    duration=0.016,
    tick=1,
    snap=2,
    dump=4,
    metrics="fd-digits",
    metric_num=1000,
    extra_snapshots=False,
    cfg_train_fake=1.5,
    cfg_eval_fake=1.5,
    cfg_eval_real=1.5,
)
# The data-aided variant (official --train_diffusiongan 1; released "SiDA" generators of SANA-0.6B, SD3-Medium and
# SD3.5-Large): the SiD settings plus lsd 1 and lsg_gan 1, no generator step before 20k images and the GAN term from
# 40k (official sid_dit_*_training_loop.py); real latent/caption pairs from --data (the official runs use
# midjourney-v6-llava, whose README warns to use the GAN only where the real images beat the distilled ones). The
# fake phase runs one more fake-network forward (the real branch, B rows, kept for backward): bench.memory counts 1.5x
# the bytes it holds per image, and under FSDP2 x8 the same batch per GPU as SiD's (the generator phase sets it), so
# the SiD presets' batch per GPU is kept.
_SIDA_FLOW = dict(
    method="sida",
    lsd=1.0,
    lsg_gan=1.0,
    sida_g_start_kimg=20.0,
    sida_gan_start_kimg=40.0,
    official_data="image/caption pairs (the official runs: brivangl/midjourney-v6-llava) encoded by the teacher's VAE "
    "with python -m sid_fast.t2i.pairs build",
)
for _name in ("sana-600m-512-sid", "sd3-medium-sid", "sd35-large-sid"):
    PRESETS[_name + "a"] = dict(PRESETS[_name], **_SIDA_FLOW)
# On the digits-flow teacher: the bundled digits as pairs (--data digits: encoded by the teacher's VAE when the run
# starts, captions from its prompts), the generator from 1 kimg and the GAN term from 2 kimg (the official 20k and 40k
# images are 1-4% of its 1-2 Mimg runs; these are 6% and 12% of the digits preset's 16 kimg).
PRESETS["digits-flow-sida"] = dict(PRESETS["digits-flow"], **_SIDA_FLOW, data="digits", data_prompt_text=None) | dict(
    official_data=None, sida_g_start_kimg=1.0, sida_gan_start_kimg=2.0
)
FID_REFS: dict[str, str] = {}
