"""The SiD distillation loop (Zhou et al., ICML 2024): the fake-score phase, the generator phase, the EMA.

One iteration, exactly as the official `training/sid_training_loop.py` and `training/sid_loss.py`:
  1. fake-score step: x_g = G(sigma_init z) without gradient (G in eval mode); EDM loss of f_psi on x_g (augmented
     when the preset has augmentation), ln sigma ~ N(-1.2, 1.2^2); summed, times ls / batch_gpu_total; Adam step.
  2. generator step: x_g = G(sigma_init z) with gradient (G in train mode); sigma from t ~ U[0, tmax/1000];
     x_t = x_g + sigma eps; y_real = f_phi(x_t), y_fake = f_psi(x_t) (f_psi in eval mode, teacher always eval);
     SiD loss summed, times lsg / batch_gpu_total; Adam step.
  3. EMA of G with EDM's half-life and ramp-up.
What differs between teacher families (EDM, EDM2, Stable Diffusion: noise levels, conditions, network calls, the
losses' weights and u(sigma), forced weight normalisation, snapshots) is the family's (sid_fast.families): the trainer
builds its networks and its denoiser through it, and the phases call the denoiser, which speaks of a noise level and a
condition, and nothing else of the family. Gradients are accumulated over micro-batches and handed over once per
phase by the parallel wrapper (sid_fast.training.parallel: DDP, FSDP2 or one process; nan_to_num cleaning); Adam betas
(0, 0.999) (generator beta1 configurable), eps 1e-8 (1e-6 in EDM's fp16 mode); no LR schedule, no clipping.

How the networks run (dtype, memory format, checkpointing, compile, NVTX) is set once by `sid_fast.perf` when they are
built; which kernels run is `sid_fast.ops`' scope, entered around every step and snapshot. The training state is
sid_fast.training.state's, snapshots and metrics sid_fast.training.snapshots', the loop around the iteration (ticks,
signals) sid_fast.training.loop's; run directories, resume and the command line sid_fast.training.run's.

Randomness. Every per-sample draw (z, condition, noise level, noise, augmentation) of micro-batch m of iteration `it`
comes from a generator seeded by (seed, it, phase, m), with m = rank * rounds + round. For a given --batch and
--batch-gpu a run therefore sees the same samples whatever its number of processes (the rounds per process change,
the set of micro-batches does not), and resuming needs no RNG state for them. Changing --batch-gpu regroups the draws.
Dropout draws from each rank's global RNG (seeded with seed + rank, as the official code), whose state the training
state keeps.
Class labels of conditional EDM models follow --data's label frequencies, as the official loop (which takes them
from the training images it iterates); without --data they are uniform, and the log and training_options.json say so.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from sid_fast import dist, ops, perf
from sid_fast.augment import AugmentPipe
from sid_fast.ema import copy_weights, ema_beta, ema_halflife_kimg, update_ema_sharded
from sid_fast.families.base import Family, TeacherSpec
from sid_fast.perf import annotate
from sid_fast.training import graphs, loop, snapshots, state
from sid_fast.training.config import TrainConfig
from sid_fast.training.context import Forward, Progress, RunContext, Trained
from sid_fast.training.loop import TrainingAborted
from sid_fast.training.parallel import parallelize

FAKE, GEN, STEPS = 0, 1, 2  # the phases' random streams; the few-step generator's k


def _seed_for(seed: int, it: int, phase: int, m: int) -> int:
    h = hashlib.blake2b(f"{seed}/{it}/{phase}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SiDTrainer:
    """The SiD iteration over three networks. Build it with `sid_fast.training.run.build_trainer(cfg)`, which loads
    and checks the teacher and the data.

    Hooks for methods that extend SiD (SiDA, sid_fast.training.sida): `fake_phase_inputs` (what a fake-score
    micro-batch starts from), `prepare_real`, `fake_phase_loss` and `generator_loss` (the loss of one micro-batch of
    each phase), `fake_grad_clip`; a subclass may also decide whether the generator phase runs (see
    SiDATrainer.generator_phase)."""

    fake_grad_clip: float | None = None  # elementwise clipping of the fake score's gradients (SiDA on EDM)

    def __init__(self, cfg: TrainConfig, device: torch.device, family: Family, run_dir=None, log=print):
        self.cfg, self.device, self.family = cfg, device, family
        self.rank, self.world = dist.rank(), dist.world_size()
        self.batch_gpu_total = cfg.batch // self.world
        self.rounds = self.batch_gpu_total // cfg.batch_gpu
        self.kernels = ops.parse(cfg.kernels)  # entered around every step and snapshot: nothing leaks past them
        # What the loop, the training state and the snapshots read and write (sid_fast.training.context).
        self.ctx = RunContext(cfg, family, device, self.rank, self.world, self.rounds, self.kernels, run_dir, log)
        self.progress = Progress.start(device)
        torch.manual_seed(cfg.seed + self.rank)  # dropout RNG, per rank as the official code
        np.random.seed((cfg.seed + self.rank) % (1 << 31))
        self.denoiser = family.make_denoiser(cfg, device)
        perf.set_matmul_precision(cfg.precision)
        self.nets = family.build_networks(cfg, device, log)
        self.teacher, self.G, self.fake, self.G_ema = self.nets.teacher, self.nets.G, self.nets.fake, self.nets.G_ema
        perf.prepare_networks(cfg, self.teacher, (self.G, self.fake), self.G_ema)
        # The bf16 fast path pads by a fixed margin (no host sync per micro-batch; the same warp up to rounding).
        fixed = cfg.precision == "bf16"
        self.augment_pipe = AugmentPipe(p=cfg.augment, fixed_margin=fixed) if cfg.augment > 0 else None
        eps = 1e-6 if cfg.precision == "fp16" else 1e-8  # official sid_train.py: 1e-6 with --fp16 1, else 1e-8
        self.par = parallelize(cfg, self.G, self.fake, device, self.world, self.rounds, eps, teacher=self.teacher)
        # --ema 0 (the EMA off, as ml-sid-dit): G_ema is G. It is not updated every step and not kept on the
        # accelerator (at 8 B parameters a whole fp32 copy is 32 GB per GPU): it waits on the host and is refreshed
        # from G when something reads it (a snapshot, a training state), and brought to the device for a snapshot.
        self.ema_off = cfg.ema == 0
        if self.ema_off and device.type not in ("cpu", "meta"):
            self.G_ema.to("cpu")
        # The modules stay plain (state dicts); the call sites carry the fast path's options.
        self.calls = perf.call_sites(cfg, self.teacher, self.G, self.fake, self.par.G_dist, self.par.fake_dist)
        if self.par.fsdp:
            self.calls.update_ema = update_ema_sharded
        self.trained = Trained(self.nets, self.par)
        self._rngs: dict = {}  # (phase, micro-batch) -> its generator
        self._rngs_seeded = False  # True while a step graph is captured (graphs.StepGraph)
        # --cuda-graphs step: the whole iteration captured once and replayed (sid_fast.training.graphs).
        self.step_graph = graphs.StepGraph(self) if cfg.cuda_graphs == "step" else None

    # The run's context and progress, read and written through the trainer as its own attributes.
    run_dir = Forward("ctx")
    log = Forward("ctx")
    tracker = Forward("ctx")
    cur_nimg = Forward("progress")
    cur_tick = Forward("progress")
    tick_start_nimg = Forward("progress")
    stats = Forward("progress")  # device-side statistics, read once per tick
    consec_bad = Forward("progress")
    max_consec_bad = Forward("progress")
    metrics_history = Forward("progress")
    stop_requested = Forward("progress")

    def describe(self) -> str:
        """The algorithm's settings for the log."""
        return self.family.describe(self.cfg)

    def conditioning(self) -> str:
        """What the generator is conditioned on (the log and training_options.json)."""
        return self.family.conditioning()

    @property
    def opt_g(self):
        return self.par.opt_g

    @property
    def opt_fake(self):
        return self.par.opt_fake

    # ------------------------------------------------------------------
    # Randomness.

    def micro_batch_rng(self, phase: int, rnd: int, reseed: bool = True) -> torch.Generator | None:
        """The generator of every per-sample draw of micro-batch `rnd` of this process in `phase` of this iteration:
        seeded with a hash of (seed, iteration, phase, micro-batch), so draws do not depend on the process count.
        One generator object per (phase, micro-batch) for the whole run, re-seeded at every call (the same draws as
        a fresh generator with that seed), so that a whole-step CUDA graph can hold it (graphs.StepGraph)."""
        if self.device.type == "meta":  # memory accounting (bench.memory): draws have shapes, no values
            return None
        g = self._rngs.get((phase, rnd))
        if g is not None and not reseed:  # the micro-batch's stream, where its earlier draws left it
            return g
        if g is None or not self._rngs_seeded:  # seed_micro_batches seeded them (a host op, never captured)
            g = self._rngs.setdefault((phase, rnd), torch.Generator(device=self.device))
            it = self.cur_nimg // self.cfg.batch
            g.manual_seed(_seed_for(self.cfg.seed, it, phase, self.rank * self.rounds + rnd))
        return g

    def seed_micro_batches(self) -> list[torch.Generator]:
        """Every generator the run has made, seeded for this iteration: what a replayed step draws from (it does not
        run micro_batch_rng)."""
        return [self.micro_batch_rng(phase, rnd) for phase, rnd in list(self._rngs)]

    def draw_z_cond(self, g, fake_phase: bool = False):
        """z ~ N(0, I) and the condition of a micro-batch (the family's: class labels, prompts), drawn from `g`."""
        b = self.cfg.batch_gpu
        return self.family.draw(g, b, self.device, fake_phase, image_shape=self.denoiser.image_shape(b))

    def generator_draws(self, rnd: int):
        """(z, condition, noise level, eps) of generator-phase micro-batch `rnd`, drawn in this order from its
        generator."""
        b = self.cfg.batch_gpu
        g = self.micro_batch_rng(GEN, rnd)
        z, cond = self.draw_z_cond(g)
        level = self.denoiser.generator_level(b, g)
        eps = torch.randn(self.denoiser.image_shape(b), device=self.device, generator=g)
        return z, cond, level, eps

    def augment(self, images, g):
        """(images, augment labels): EDM's augmentation drawn from `g` with --augment, else the images and zeros."""
        if self.augment_pipe is not None:
            return self.augment_pipe(images, generator=g)
        return images, self.denoiser.aug_zeros(images.shape[0])

    def generate(self, call, z, cond, g=None, train: bool = False):
        """G's sample of z and cond. A few-step generator (a denoiser with `multistep`) runs this iteration's number
        of steps (`generator_steps_now`), re-noising from the micro-batch's generator `g`; `train`: the last step with
        gradient on its detached input, the earlier ones without."""
        if getattr(self.denoiser, "multistep", False):
            return self.denoiser.generate(call, z, cond, run=self.generator_steps_now(), generator=g, train=train)
        return self.denoiser.generate(call, z, cond)

    def generator_steps_now(self) -> int:
        """k ~ U{1..K} of this iteration (K = --generator-steps), from a hash of (seed, iteration): the same on every
        rank without a collective, and the same on resume."""
        steps = self.cfg.generator_steps
        if steps == 1:
            return 1
        return 1 + _seed_for(self.cfg.seed, self.cur_nimg // self.cfg.batch, STEPS, 0) % steps

    # ------------------------------------------------------------------
    # One iteration.

    def _begin_phase(self, trained, frozen, opt) -> None:
        frozen.eval().requires_grad_(False)
        trained.train().requires_grad_(True)
        self.denoiser.begin_phase(trained)
        opt.zero_grad(set_to_none=True)
        perf.preassign_gradients(self.cfg, trained)  # the gradients accumulate into the arena's buffers

    def _apply_gradients(self, net, opt, bad_slot: str, clip_value: float | None = None):
        """End of a phase: clean and count the gradients (then clip each element at +-clip_value, as the official
        sida loop's clip_grad_value_), optimizer step, freeze the network again."""
        self.par.reduce_replicated(net)
        bad = self.par.clean_grads(net.parameters(), self.device)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(net.parameters(), clip_value)
        self.stats.add(**{bad_slot: bad.double()})
        with annotate("sid/optimizer"):
            opt.step()
        # The gradients are dead from here (each phase starts from zero): freed now, they do not sit through the other
        # phase (the official loop keeps them until its next zero_grad; bench.memory counts the difference).
        opt.zero_grad(set_to_none=True)
        net.eval().requires_grad_(False)
        return bad

    def fake_phase_inputs(self, rnd: int, g):
        """(z, condition, real images or None) of fake-score micro-batch `rnd`: SiD draws z and the condition from
        `g`."""
        z, cond = self.draw_z_cond(g, fake_phase=True)
        return z, cond, None

    def prepare_real(self, real, g):
        """The real batch as fake_phase_loss reads it: (images, augment labels), augmented with a draw from `g` after
        the fake batch's (SiDA on EDM)."""
        return self.augment(real, g)

    def fake_phase_loss(self, y, aug, noise, level, cond, real):
        """(loss to backpropagate, statistics) of one fake-score micro-batch: EDM's loss of the fake score on the
        generated y (official sid_loss.py), summed, times ls / batch_gpu_total."""
        x = self.denoiser.noisy(y, noise, level)
        out = self.denoiser.fake(self.calls.fake_train, x, level, cond, aug, training=True)
        loss_sum, ok = self.denoiser.fake_loss_sum(out, y, noise, level)
        stats = dict(loss_fake=loss_sum.detach(), rows_fake=ok.sum(), nan_samples_fake=(~ok).sum())
        return loss_sum * (self.cfg.ls / self.batch_gpu_total), stats

    def fake_score_phase(self):
        with perf.gradient_arena(self.cfg, self.fake):
            return self._fake_score_phase()

    def _fake_score_phase(self):
        b = self.cfg.batch_gpu
        self._begin_phase(self.fake, self.G, self.opt_fake)
        for rnd in range(self.rounds):
            g = self.micro_batch_rng(FAKE, rnd)
            z, cond, real = self.fake_phase_inputs(rnd, g)
            with torch.no_grad():
                x_g = self.generate(self.calls.G_eval, z, cond, g)
            level = self.denoiser.fake_level(b, g)
            y, aug = self.augment(x_g, g)
            real = None if real is None else self.prepare_real(real, g)
            eps = torch.randn(y.shape, device=self.device, generator=g)
            noise = self.denoiser.noise(level, eps)  # shared by real and fake
            with self.par.no_sync(self.par.fake_dist, rnd):
                loss, stats = self.fake_phase_loss(y, aug, noise, level, cond, real)
                loss.backward()
            self.stats.add(**stats)
        return self._apply_gradients(self.fake, self.opt_fake, "bad_steps_fake", clip_value=self.fake_grad_clip)

    def generator_loss(self, x_g, x_t, level, cond, y_real):
        """(loss to backpropagate, statistics) of one generator micro-batch: SiD's loss (official sid_loss.py) with
        the fake score as a frozen function of x_t, summed, times lsg / batch_gpu_total."""
        out = self.denoiser.fake(self.calls.fake_eval, x_t, level, cond)
        loss_sum, ok = self.denoiser.generator_loss_sum(x_g, y_real, out, self.cfg.alpha, level=level)
        stats = dict(loss_G=loss_sum.detach(), rows_G=ok.sum(), nan_samples_G=(~ok).sum())
        return loss_sum * (self.cfg.lsg / self.batch_gpu_total), stats

    def generator_phase(self):
        with perf.gradient_arena(self.cfg, self.G):
            return self._generator_phase()

    def _generator_phase(self):
        self._begin_phase(self.G, self.fake, self.opt_g)
        for rnd in range(self.rounds):
            z, cond, level, eps = self.generator_draws(rnd)
            with self.par.no_sync(self.par.G_dist, rnd):
                x_g = self.generate(self.calls.G_train, z, cond, self.micro_batch_rng(GEN, rnd, reseed=False), True)
                x_t = perf.image_format(self.cfg, self.denoiser.noisy(x_g, self.denoiser.noise(level, eps), level))
                y_real = self.denoiser.teacher(self.calls.teacher, x_t, level, cond)
                loss, stats = self.generator_loss(x_g, x_t, level, cond, y_real)
                with annotate("sid/backward"):
                    loss.backward()
            self.stats.add(**stats)
        return self._apply_gradients(self.G, self.opt_g, "bad_steps_G")

    def ema_beta(self) -> float:
        """As the official loop: the half-life is int(ema * 1000) kimg and the ramp-up uses the images seen before
        this iteration (beta = 0 at the first one, so G_ema starts as G)."""
        return ema_beta(self.cfg.batch, self.cur_nimg, ema_halflife_kimg(self.cfg.ema))

    def step_body(self, beta) -> None:
        """One iteration on the device: both phases, the optimizer steps, the EMA with `beta` (a float, or a 0-d
        device tensor when replayed from a graph), the counters of bad steps updated in place."""
        with ops.kernels(self.kernels):
            with annotate("sid/fake_score_step"):
                bad_f = self.fake_score_phase()
            with annotate("sid/generator_step"):
                bad_g = self.generator_phase()
            if not self.ema_off:
                with annotate("sid/ema"):
                    self.calls.update_ema(self.G_ema, self.G, beta)
        bad = bad_f | bad_g
        self.consec_bad.add_(1).mul_(bad)
        torch.maximum(self.max_consec_bad, self.consec_bad, out=self.max_consec_bad)

    def step(self):
        if self.step_graph is not None:
            self.step_graph.step()
        else:
            self.step_body(self.ema_beta())
        self.cur_nimg += self.cfg.batch

    # ------------------------------------------------------------------
    # The run around the iteration: training state (sid_fast.training.state), snapshots (.snapshots), loop (.loop).

    def refresh_ema(self) -> None:
        """With the EMA off, G_ema <- G (every rank calls it: under FSDP2 G is gathered); otherwise nothing."""
        if self.ema_off:
            copy_weights(self.G_ema, self.G)

    def state_dict(self) -> dict:
        self.refresh_ema()
        return state.training_state(self.ctx, self.progress, self.trained)

    def load_state_dict(self, s: dict, path) -> None:
        state.load_training_state(self.ctx, self.progress, self.trained, s, path)

    def save_state(self):
        self.refresh_ema()
        return state.save_training_state(self.ctx, self.progress, self.trained)

    def snapshot(self):
        self.refresh_ema()
        return snapshots.snapshot(self.ctx, self.progress, self.nets)

    def teacher_metric(self, key: str) -> tuple[float | None, str]:
        """(the teacher's value of a metric, its label) for the metric's plot; None when unknown."""
        return self.family.teacher_metric(key, self.cfg)

    def train(self) -> str:
        steps = loop.Steps(self.step, self.snapshot, self.save_state, self.describe())
        return loop.train(self.ctx, self.progress, steps)


__all__ = ["SiDTrainer", "TeacherSpec", "TrainingAborted"]
