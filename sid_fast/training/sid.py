"""The SiD distillation loop (Zhou et al., ICML 2024): the fake-score phase, the generator phase, the EMA.

One iteration, exactly as the official `training/sid_training_loop.py` and `training/sid_loss.py`:
  1. fake-score step: x_g = G(sigma_init z) without gradient (G in eval mode); EDM loss of f_psi on x_g (augmented
     when the preset has augmentation), ln sigma ~ N(-1.2, 1.2^2); summed, times ls / batch_gpu_total; Adam step.
  2. generator step: x_g = G(sigma_init z) with gradient (G in train mode); sigma from t ~ U[0, tmax/1000];
     x_t = x_g + sigma eps; y_real = f_phi(x_t), y_fake = f_psi(x_t) (f_psi in eval mode, teacher always eval);
     SiD loss summed, times lsg / batch_gpu_total; Adam step.
  3. EMA of G with EDM's half-life and ramp-up.
What differs between teacher families (EDM, EDM2: noise levels, network calls, the losses' weights and u(sigma),
forced weight normalisation) is the denoiser's (sid_fast.training.denoiser); the phases call it and nothing else of
the family. Gradients are accumulated over micro-batches and handed over once per phase by the parallel wrapper
(sid_fast.training.parallel: DDP, FSDP2 or one process; nan_to_num cleaning); Adam betas (0, 0.999) (generator beta1
configurable), eps 1e-8 (1e-6 in EDM's fp16 mode); no LR schedule, no clipping.

How the networks run (dtype, memory format, checkpointing, compile, NVTX) is set once by `sid_fast.perf` when they are
built; which kernels run is `sid_fast.ops`' scope, entered around every step and snapshot. The training state is
sid_fast.training.state's, snapshots and metrics sid_fast.training.snapshots', the loop around the iteration (ticks,
signals) sid_fast.training.loop's; run directories, resume and the command line sid_fast.training.run's.

Randomness. Every per-sample draw (z, labels, sigma, noise, augmentation) of micro-batch m of iteration `it` comes
from a generator seeded by (seed, it, phase, m), with m = rank * rounds + round. For a given --batch and --batch-gpu
a run therefore sees the same samples whatever its number of processes (the rounds per process change, the set of
micro-batches does not), and resuming needs no RNG state for them. Changing --batch-gpu regroups the draws. Dropout
draws from each rank's global RNG (seeded with seed + rank, as the official code), whose state the training state keeps.
Class labels of conditional models follow --data's label frequencies, as the official loop (which takes them from
the training images it iterates); without --data they are uniform, and the log and training_options.json say so.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from sid_fast import dist, ops, perf
from sid_fast.augment import AugmentPipe
from sid_fast.ema import ema_beta, ema_halflife_kimg, update_ema_sharded
from sid_fast.networks import build_network
from sid_fast.perf import annotate
from sid_fast.training import loop, snapshots, state
from sid_fast.training.config import ConfigError, TrainConfig
from sid_fast.training.denoiser import EDM2Denoiser, make_denoiser
from sid_fast.training.loop import TrainingAborted
from sid_fast.training.parallel import parallelize
from sid_fast.training.tickstats import TickStats
from sid_fast.training.trackers import Tracker

FAKE, GEN = 0, 1  # the phases' random streams


@dataclass
class TeacherSpec:
    """The teacher's class, init kwargs and weights, from which G and the fake score start (SiD copies the teacher's
    EMA weights), and the teacher's metadata (e.g. its own FD-digits, drawn in the metric plot)."""

    class_name: str
    init_kwargs: dict
    state_dict: dict
    teacher_meta: dict = field(default_factory=dict)


def _seed_for(seed: int, it: int, phase: int, m: int) -> int:
    h = hashlib.blake2b(f"{seed}/{it}/{phase}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _without_logvar(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("logvar_")}


class SiDTrainer:
    """The SiD iteration over three networks. Build it with `sid_fast.training.run.build_trainer(cfg)`, which loads
    and checks the teacher and the data.

    Hooks for methods that extend SiD (SiDA, sid_fast.training.sida): `fake_phase_inputs` (what a fake-score
    micro-batch starts from), `fake_phase_loss` and `generator_loss` (the loss of one micro-batch of each phase),
    `fake_grad_clip`; a subclass may also decide whether the generator phase runs (see SiDATrainer.generator_phase)."""

    fake_grad_clip: float | None = None  # elementwise clipping of the fake score's gradients (SiDA on EDM)

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        teacher: torch.nn.Module,
        teacher_spec: TeacherSpec,
        run_dir=None,
        log=print,
        fid=(None, None),
        label_table=None,
        generator_init=None,
        vae=None,
    ):
        self.cfg, self.device, self.run_dir, self.log = cfg, device, run_dir, log
        self.teacher_spec = teacher_spec
        self.rank, self.world = dist.rank(), dist.world_size()
        self.batch_gpu_total = cfg.batch // self.world
        self.rounds = self.batch_gpu_total // cfg.batch_gpu
        torch.manual_seed(cfg.seed + self.rank)  # dropout RNG, per rank as the official code
        np.random.seed((cfg.seed + self.rank) % (1 << 31))
        self.denoiser = self.make_denoiser(teacher)
        self._build_networks(teacher, generator_init)
        if cfg.augment > 0 and not self.denoiser.aug_dim:
            raise ConfigError(
                f"--augment {cfg.augment}: the networks have no augment labels (augment_dim 0); use --augment 0."
            )
        # The bf16 fast path pads by a fixed margin (no host sync per micro-batch; the same warp up to rounding).
        fixed = cfg.precision == "bf16"
        self.augment_pipe = AugmentPipe(p=cfg.augment, fixed_margin=fixed) if cfg.augment > 0 else None
        self.label_table = self._label_table(label_table)
        eps = 1e-6 if cfg.precision == "fp16" else 1e-8  # official sid_train.py: 1e-6 with --fp16 1, else 1e-8
        self.par = parallelize(cfg, self.G, self.fake, device, self.world, self.rounds, eps, teacher=self.teacher)
        # The modules stay plain (state dicts); the call sites carry the fast path's options.
        self.calls = perf.call_sites(cfg, self.teacher, self.G, self.fake, self.par.G_dist, self.par.fake_dist)
        if self.par.fsdp:
            self.calls.update_ema = update_ema_sharded
        self.kernels = ops.parse(cfg.kernels)  # entered around every step and snapshot: nothing leaks past them

        # Counters and device-side statistics (read once per tick).
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0
        self.stats = TickStats(device)
        self.consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.stop_requested = False
        self.metrics_history: list[dict] = []
        self.tracker = Tracker()  # run() sets the --tracker one on rank 0
        self.fid_ref, self.detector = fid
        self.vae = vae  # EDM2 latents -> images (grids, FID); sid_fast.latents.StabilityVAE

    # ------------------------------------------------------------------
    # Construction.

    def make_denoiser(self, teacher):
        return make_denoiser(self.cfg, teacher, self.device)

    def _build_networks(self, teacher, generator_init) -> None:
        """The teacher (frozen), G and the fake score (trained) and G_ema, prepared for the run's precision, memory
        format and checkpointing (sid_fast.perf)."""
        cfg, spec, edm2_nets = self.cfg, self.teacher_spec, isinstance(self.denoiser, EDM2Denoiser)
        # --precision fp16 is EDM's use_fp16 on every network (official sid_train.py sets it for all three; G_ema is a
        # copy of G): UNet bodies in fp16 on CUDA, fp32 on a CPU (EDM's own rule). Other precisions leave it off.
        fp16 = cfg.precision == "fp16"
        self.init_kwargs = dict(spec.init_kwargs, dropout=cfg.dropout, use_fp16=fp16)
        teacher.use_fp16 = fp16
        if fp16 and self.device.type != "cuda":
            self.log(
                "--precision fp16: EDM's fp16 mode runs the UNet bodies in fp16 on CUDA only; on this CPU they run in "
                "fp32, as EDM's code does (Adam eps is 1e-6 all the same)."
            )
        perf.set_matmul_precision(cfg.precision)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        # EDM2 (official sida_edm2_train.py): G is the Precond without the log-variance head; the fake score keeps the
        # teacher's head when u(sigma) weights the losses, and is built without it otherwise (nothing unused).
        self.g_init_kwargs = dict(self.init_kwargs, logvar_channels=0) if edm2_nets else self.init_kwargs
        # G starts from the teacher, or (SiD²A, --sid-model) from a SiD generator's weights; the fake score always
        # from the teacher.
        g_state = generator_init if generator_init is not None else spec.state_dict
        g_state = _without_logvar(g_state) if edm2_nets else g_state
        self.G = self._copy(g_state, self.g_init_kwargs).train().requires_grad_(True)
        if edm2_nets and not self.denoiser.logvar:
            self.fake_init_kwargs = dict(self.init_kwargs, logvar_channels=0)
            fake_state = _without_logvar(spec.state_dict)
        else:
            self.fake_init_kwargs, fake_state = self.init_kwargs, spec.state_dict
        self.fake = self._copy(fake_state, self.fake_init_kwargs).train().requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        perf.prepare_networks(cfg, self.teacher, (self.G, self.fake), self.G_ema)

    def _copy(self, state_dict, init_kwargs):
        net = build_network(self.teacher_spec.class_name, init_kwargs)
        net.load_state_dict(state_dict)
        return net.to(self.device)

    def _label_table(self, label_table):
        """Class labels: a uniformly drawn training image's label (the dataset's frequencies) or uniform classes."""
        if not self.G.label_dim:
            return None
        if label_table is None:
            self.log(
                f"Class labels: uniform over {self.G.label_dim} classes (no --data; the official code follows the "
                "training set's label frequencies)."
            )
            return None
        table = torch.as_tensor(label_table, device=self.device)
        self.log(f"Class labels: drawn with the label frequencies of --data {self.cfg.data} ({len(table)} images).")
        return table

    def describe(self) -> str:
        """The algorithm's settings for the log."""
        cfg = self.cfg
        return f"alpha {cfg.alpha}, tmax {cfg.tmax}, init_sigma {cfg.init_sigma}"

    def conditioning(self) -> str:
        """What the generator is conditioned on (the log and training_options.json)."""
        if not self.G.label_dim:
            return "none (unconditional)"
        return "uniform" if self.label_table is None else f"label frequencies of {self.cfg.data}"

    @property
    def opt_g(self):
        return self.par.opt_g

    @property
    def opt_fake(self):
        return self.par.opt_fake

    # ------------------------------------------------------------------
    # Randomness.

    def micro_batch_rng(self, phase: int, rnd: int) -> torch.Generator | None:
        """The generator of every per-sample draw of micro-batch `rnd` of this process in `phase` of this iteration."""
        if self.device.type == "meta":  # memory accounting (bench.memory): draws have shapes, no values
            return None
        it = self.cur_nimg // self.cfg.batch
        m = self.rank * self.rounds + rnd
        return torch.Generator(device=self.device).manual_seed(_seed_for(self.cfg.seed, it, phase, m))

    def draw_z_labels(self, g):
        """z ~ N(0, I) and one-hot class labels (None for unconditional networks), in this order from `g`."""
        b = self.cfg.batch_gpu
        z = torch.randn(self.denoiser.image_shape(b), device=self.device, generator=g)
        labels = None
        if self.G.label_dim:
            if self.label_table is None:
                idx = torch.randint(self.G.label_dim, [b], device=self.device, generator=g)
            else:  # a uniformly drawn training image's label: the dataset's frequencies
                idx = self.label_table[torch.randint(len(self.label_table), [b], device=self.device, generator=g)]
            labels = torch.eye(self.G.label_dim, device=self.device)[idx]
        return z, labels

    def generator_draws(self, rnd: int):
        """(z, labels, sigma, eps) of generator-phase micro-batch `rnd`, drawn in this order from its generator."""
        b = self.cfg.batch_gpu
        g = self.micro_batch_rng(GEN, rnd)
        z, labels = self.draw_z_labels(g)
        sigma = self.denoiser.generator_sigma(b, g)
        eps = torch.randn(self.denoiser.image_shape(b), device=self.device, generator=g)
        return z, labels, sigma, eps

    def augment(self, images, g):
        """(images, augment labels): EDM's augmentation drawn from `g` with --augment, else the images and zeros."""
        if self.augment_pipe is not None:
            return self.augment_pipe(images, generator=g)
        return images, self.denoiser.aug_zeros(images.shape[0])

    def generate(self, call, z, labels):
        return self.denoiser.generate(call, z, labels)

    # ------------------------------------------------------------------
    # One iteration.

    def _begin_phase(self, trained, frozen, opt) -> None:
        frozen.eval().requires_grad_(False)
        trained.train().requires_grad_(True)
        self.denoiser.begin_phase(trained)
        opt.zero_grad(set_to_none=True)
        perf.preassign_gradients(self.cfg)  # compiled rungs: the gradients accumulate into the arena's buffers

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
        """(z, labels, real images or None) of fake-score micro-batch `rnd`: SiD draws z and labels from `g`."""
        z, labels = self.draw_z_labels(g)
        return z, labels, None

    def fake_phase_loss(self, y, aug, noise, sigma, labels, real):
        """(loss to backpropagate, statistics) of one fake-score micro-batch: EDM's loss of the fake score on the
        generated y (official sid_loss.py), summed, times ls / batch_gpu_total."""
        x = self.denoiser.noisy(y, noise, sigma)
        out = self.denoiser.fake(self.calls.fake_train, x, sigma, labels, aug, training=True)
        loss_sum, ok = self.denoiser.fake_loss_sum(out, y, noise, sigma)
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
            z, labels, real = self.fake_phase_inputs(rnd, g)
            with torch.no_grad():
                x_g = self.generate(self.calls.G_eval, z, labels)
            sigma = self.denoiser.fake_sigma(b, g)
            y, aug = self.augment(x_g, g)
            real = None if real is None else self.augment(real, g)  # an independent draw, after the fake one
            eps = torch.randn(y.shape, device=self.device, generator=g)
            noise = self.denoiser.noise(sigma, eps)  # shared by real and fake
            with self.par.no_sync(self.par.fake_dist, rnd):
                loss, stats = self.fake_phase_loss(y, aug, noise, sigma, labels, real)
                loss.backward()
            self.stats.add(**stats)
        return self._apply_gradients(self.fake, self.opt_fake, "bad_steps_fake", clip_value=self.fake_grad_clip)

    def generator_loss(self, x_g, x_t, sigma, labels, y_real):
        """(loss to backpropagate, statistics) of one generator micro-batch: SiD's loss (official sid_loss.py) with
        the fake score as a frozen function of x_t, summed, times lsg / batch_gpu_total."""
        out = self.denoiser.fake(self.calls.fake_eval, x_t, sigma, labels)
        loss_sum, ok = self.denoiser.generator_loss_sum(x_g, y_real, out, self.cfg.alpha)
        stats = dict(loss_G=loss_sum.detach(), rows_G=ok.sum(), nan_samples_G=(~ok).sum())
        return loss_sum * (self.cfg.lsg / self.batch_gpu_total), stats

    def generator_phase(self):
        with perf.gradient_arena(self.cfg, self.G):
            return self._generator_phase()

    def _generator_phase(self):
        self._begin_phase(self.G, self.fake, self.opt_g)
        for rnd in range(self.rounds):
            z, labels, sigma, eps = self.generator_draws(rnd)
            with self.par.no_sync(self.par.G_dist, rnd):
                x_g = self.generate(self.calls.G_train, z, labels)
                x_t = perf.image_format(self.cfg, self.denoiser.noisy(x_g, self.denoiser.noise(sigma, eps), sigma))
                y_real = self.denoiser.teacher(self.calls.teacher, x_t, sigma, labels)
                loss, stats = self.generator_loss(x_g, x_t, sigma, labels, y_real)
                with annotate("sid/backward"):
                    loss.backward()
            self.stats.add(**stats)
        return self._apply_gradients(self.G, self.opt_g, "bad_steps_G")

    def step(self):
        with ops.kernels(self.kernels):
            with annotate("sid/fake_score_step"):
                bad_f = self.fake_score_phase()
            with annotate("sid/generator_step"):
                bad_g = self.generator_phase()
            with annotate("sid/ema"):
                # As the official loop: the half-life is int(ema * 1000) kimg and the ramp-up uses the images seen
                # before this iteration (beta = 0 at the first one, so G_ema starts as G).
                beta = ema_beta(self.cfg.batch, self.cur_nimg, ema_halflife_kimg(self.cfg.ema))
                self.calls.update_ema(self.G_ema, self.G, beta)
        self.cur_nimg += self.cfg.batch
        bad = bad_f | bad_g
        self.consec_bad = (self.consec_bad + 1) * bad
        self.max_consec_bad = torch.maximum(self.max_consec_bad, self.consec_bad)

    # ------------------------------------------------------------------
    # The run around the iteration: training state (sid_fast.training.state), snapshots (.snapshots), loop (.loop).

    def state_dict(self) -> dict:
        return state.training_state(self)

    def load_state_dict(self, s: dict, path) -> None:
        state.load_training_state(self, s, path)

    def save_state(self):
        return state.save_training_state(self)

    def snapshot(self):
        return snapshots.snapshot(self)

    def teacher_metric(self, key: str) -> tuple[float | None, str]:
        """(the teacher's value of a metric, its label) for the metric's plot; None when unknown."""
        value = self.teacher_spec.teacher_meta.get("fd_digits_heun35") if key == "fd_digits" else None
        return value, "teacher, Heun 35 NFE"

    def train(self) -> str:
        return loop.train(self)


__all__ = ["SiDTrainer", "TeacherSpec", "TrainingAborted"]
