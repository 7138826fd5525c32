"""The SiD distillation loop (Zhou et al., ICML 2024): the fake-score phase, the generator phase, the EMA.

One iteration, exactly as the official `training/sid_training_loop.py` and `training/sid_loss.py`:
  1. fake-score step: x_g = G(sigma_init z) without gradient (G in eval mode); EDM loss of f_psi on x_g (augmented
     when the preset has augmentation), ln sigma ~ N(-1.2, 1.2^2); summed, times ls / batch_gpu_total; Adam step.
  2. generator step: x_g = G(sigma_init z) with gradient (G in train mode); sigma from t ~ U[0, tmax/1000];
     x_t = x_g + sigma eps; y_real = f_phi(x_t), y_fake = f_psi(x_t) (f_psi in eval mode, teacher always eval);
     SiD loss summed, times lsg / batch_gpu_total; Adam step.
  3. EMA of G with EDM's half-life and ramp-up.
On EDM2 networks (official sida branch, sida_training_edm2/: SiD with `--return_logvar 1`): ln sigma ~ N(-0.4, 1.0^2)
for the fake score, whose learned log-variance u(sigma) turns its loss into lambda / e^u (D - y)^2 + u and divides the
generator's SiD loss by e^u (u of the fake score at the generator loss's sigma); G has no log-variance head; EDM2's
forced weight normalisation is applied to the trained network at the start of its phase (sid_fast.networks.edm2).
With --fsdp, G and the fake score are sharded with FSDP2 instead of replicated with DDP (see __init__).
Gradients are accumulated over micro-batches and all-reduced once per phase (DDP no_sync on the other rounds),
cleaned with nan_to_num (nan -> 0, +-inf -> +-1e5) parameter by parameter; Adam betas (0, 0.999) (generator beta1
configurable), eps 1e-8 (1e-6 in EDM's fp16 mode); no LR schedule, no clipping.

How the networks are called (memory format, compile, checkpointing, NVTX) is decided once by `sid_fast.perf`; which
kernels run is `sid_fast.ops`' scope, entered around every step and snapshot. Run directories, resume and the
command line live in `sid_fast.training.run`; the per-tick report in `sid_fast.training.tickstats`.

Randomness. Every per-sample draw (z, labels, sigma, noise, augmentation) of micro-batch m of iteration `it` comes
from a generator seeded by (seed, it, phase, m), with m = rank * rounds + round. For a given --batch and --batch-gpu
a run therefore sees the same samples whatever its number of processes (the rounds per process change, the set of
micro-batches does not), and resuming needs no RNG state for them. Changing --batch-gpu regroups the draws. Dropout
draws from each rank's global RNG (seeded with seed + rank, as the official code), whose state the training state keeps.
Class labels of conditional models follow --data's label frequencies, as the official loop (which takes them from
the training images it iterates); without --data they are uniform, and the log and training_options.json say so.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints, dist, ops, perf
from sid_fast.augment import AugmentPipe
from sid_fast.ema import ema_beta, ema_halflife_kimg, update_ema_sharded
from sid_fast.losses import sample_edm_sigma, sample_generator_sigma
from sid_fast.networks import build_network, edm2
from sid_fast.perf import annotate
from sid_fast.sampling import image_grid, latents_and_labels, onestep_sample, save_image, to_uint8
from sid_fast.training import tickstats
from sid_fast.training.config import ConfigError, TrainConfig

FAKE, GEN = 0, 1
EXTRA_SNAPSHOT_TICKS = frozenset(range(10, 101, 10))  # official sid_training_loop.py, besides every --snap ticks


class TrainingAborted(RuntimeError):
    pass


@dataclass
class Student:
    """How G and the fake score start: the teacher's class, init kwargs and weights (SiD copies the teacher's EMA
    weights), and the teacher's metadata (e.g. its own FD-digits, drawn in the metric plot)."""

    class_name: str
    init_kwargs: dict
    state_dict: dict
    teacher_meta: dict = field(default_factory=dict)


def _seed_for(seed: int, it: int, phase: int, m: int) -> int:
    h = hashlib.blake2b(f"{seed}/{it}/{phase}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SiDTrainer:
    """Build it with `sid_fast.training.run.build_trainer(cfg)`, which loads and checks the teacher and the data."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        teacher: torch.nn.Module,
        student: Student,
        run_dir: Path | None = None,
        log=print,
        fid=(None, None),
        label_table=None,
        generator_init=None,
        vae=None,
    ):
        self.cfg = cfg
        self.device = device
        self.run_dir = run_dir
        self.log = log
        self.student = student
        self.rank, self.world = dist.rank(), dist.world_size()
        self.batch_gpu_total = cfg.batch // self.world
        self.rounds = self.batch_gpu_total // cfg.batch_gpu
        torch.manual_seed(cfg.seed + self.rank)  # dropout RNG, per rank as the official code
        np.random.seed((cfg.seed + self.rank) % (1 << 31))

        # --precision fp16 is EDM's use_fp16 on every network (official sid_train.py sets it for all three; G_ema is a
        # copy of G): UNet bodies in fp16 on CUDA, fp32 on a CPU (EDM's own rule). Other precisions leave it off.
        fp16 = cfg.precision == "fp16"
        self.init_kwargs = dict(student.init_kwargs, dropout=cfg.dropout, use_fp16=fp16)
        # EDM2 (official sida_edm2_train.py): G is the Precond without the log-variance head; the fake score keeps the
        # teacher's head when it has one (u(sigma) then weights the losses), and P_mean/P_std default to -0.4/1.0.
        self.edm2 = isinstance(teacher, edm2.Precond)
        self.logvar = self.edm2 and cfg.return_logvar and teacher.logvar_linear is not None
        # Upstream normalises inside every train-mode forward unless SiDA runs with --force_normalization 0.
        self.force_wn = self.edm2 and (cfg.method == "sid" or cfg.force_normalization)
        self.g_init_kwargs = dict(self.init_kwargs, logvar_channels=0) if self.edm2 else self.init_kwargs
        self.P_mean, self.P_std = (
            (cfg.P_mean, cfg.P_std) if cfg.P_mean is not None else (-0.4, 1.0) if self.edm2 else (-1.2, 1.2)
        )
        teacher.use_fp16 = fp16
        if fp16 and device.type != "cuda":
            log(
                "--precision fp16: EDM's fp16 mode runs the UNet bodies in fp16 on CUDA only; on this CPU they run in "
                "fp32, as EDM's code does (Adam eps is 1e-6 all the same)."
            )
        perf.set_matmul_precision(cfg.precision)
        self.kernels = ops.parse(cfg.kernels)  # entered around every step and snapshot: nothing leaks past them
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        # G starts from the teacher, or (SiD²A, --sid-model) from a SiD generator's weights; the fake score always
        # from the teacher.
        g_state = generator_init if generator_init is not None else student.state_dict
        if self.edm2:
            g_state = {k: v for k, v in g_state.items() if not k.startswith("logvar_")}
        self.G = self._copy(g_state, self.g_init_kwargs).train().requires_grad_(True)
        if self.edm2 and not self.logvar:  # without u the fake score is built without the head (nothing unused)
            self.fake_init_kwargs = dict(self.init_kwargs, logvar_channels=0)
            fake_state = {k: v for k, v in student.state_dict.items() if not k.startswith("logvar_")}
        else:
            self.fake_init_kwargs, fake_state = self.init_kwargs, student.state_dict
        self.fake = self._copy(fake_state, self.fake_init_kwargs).train().requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        perf.prepare_networks(cfg, self.teacher, (self.G, self.fake), self.G_ema)
        self.aug_dim = 0 if self.edm2 or self.G.model.map_augment is None else self.G.model.map_augment.in_features
        if cfg.augment > 0 and not self.aug_dim:
            raise ConfigError(
                f"--augment {cfg.augment}: the networks have no augment labels (augment_dim 0); use --augment 0."
            )
        self.augment_pipe = AugmentPipe(p=cfg.augment) if cfg.augment > 0 else None
        # Class labels: a uniformly drawn training image's label (the dataset's frequencies) or uniform classes.
        self.label_table = None
        if self.G.label_dim:
            if label_table is not None:
                self.label_table = torch.as_tensor(label_table, device=device)
                log(
                    f"Class labels: drawn with the label frequencies of --data {cfg.data} "
                    f"({len(self.label_table)} images)."
                )
            else:
                log(
                    f"Class labels: uniform over {self.G.label_dim} classes (no --data; the official code follows the "
                    "training set's label frequencies)."
                )

        # --fsdp: G and the fake score are sharded over the ranks (every UNet block, then the whole network) before
        # their optimizers exist, so the Adam states are sharded too; the teacher and G_ema stay whole on every rank.
        self.fsdp = cfg.fsdp and self.world > 1
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            from sid_fast.networks.layers import UNetBlock

            # FSDP2 shards no 0-d parameter (EDM2's gains emb_gain and out_gain are scalars, as in EDM2's files): those
            # stay whole on every rank, and their gradients are averaged over the ranks after each phase, as DDP would.
            self.replicated = {}
            for net in (self.G, self.fake):
                scalars = {p for p in net.parameters() if p.ndim == 0}
                self.replicated[id(net)] = [p for p in net.parameters() if p.ndim == 0]
                for m in net.modules():
                    if isinstance(m, (UNetBlock, edm2.Block)):
                        fully_shard(m, ignored_params={p for p in m.parameters() if p in scalars})
                # The root reshards after every forward too (FSDP2 keeps a root's parameters gathered by default):
                # between calls every parameter is its shard, which the optimizer and the forced weight
                # normalisation of EDM2 update in place.
                fully_shard(net, ignored_params=scalars, reshard_after_forward=True)
        eps = 1e-6 if fp16 else 1e-8  # official sid_train.py: 1e-6 with --fp16 1, else 1e-8
        self.opt_fake = perf.make_adam(self.fake.parameters(), cfg.lr, (0.0, 0.999), eps, cfg.optimizer)
        self.opt_g = perf.make_adam(self.G.parameters(), cfg.glr, (cfg.g_beta1, 0.999), eps, cfg.optimizer)
        if self.fsdp:
            self.G_ddp, self.fake_ddp = self.G, self.fake
        elif self.world > 1:
            ddp = dict(broadcast_buffers=False, find_unused_parameters=False)
            if device.type == "cuda":
                ddp["device_ids"] = [device]
            self.G_ddp = torch.nn.parallel.DistributedDataParallel(self.G, **ddp)
            self.fake_ddp = torch.nn.parallel.DistributedDataParallel(self.fake, **ddp)
        else:
            self.G_ddp, self.fake_ddp = self.G, self.fake
        # The modules stay plain (state dicts); the call sites carry the fast path's options.
        self.calls = perf.call_sites(cfg, self.teacher, self.G, self.fake, self.G_ddp, self.fake_ddp)
        if self.fsdp:
            self.calls.update_ema = update_ema_sharded

        # Counters and device-side statistics (read once per tick).
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0
        self.stats = tickstats.TickStats(device)
        self.consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.stop_requested = False
        self.metrics_history: list[dict] = []
        self.fid_ref, self.detector = fid
        self.vae = vae  # EDM2 latents -> images (grids, FID); sid_fast.latents.StabilityVAE

    # ------------------------------------------------------------------
    # Networks and randomness.

    def _copy(self, state, init_kwargs=None):
        net = build_network(self.student.class_name, self.init_kwargs if init_kwargs is None else init_kwargs)
        net.load_state_dict(state)
        return net.to(self.device)

    def _gen(self, phase: int, rnd: int) -> torch.Generator | None:
        if self.device.type == "meta":  # memory accounting (bench.memory): draws have shapes, no values
            return None
        it = self.cur_nimg // self.cfg.batch
        m = self.rank * self.rounds + rnd
        return torch.Generator(device=self.device).manual_seed(_seed_for(self.cfg.seed, it, phase, m))

    def _draw_z_labels(self, g):
        b, c, r = self.cfg.batch_gpu, self.cfg.channels, self.cfg.resolution
        z = torch.randn([b, c, r, r], device=self.device, generator=g)
        labels = None
        if self.G.label_dim:
            if self.label_table is None:
                idx = torch.randint(self.G.label_dim, [b], device=self.device, generator=g)
            else:  # a uniformly drawn training image's label: the dataset's frequencies
                idx = self.label_table[torch.randint(len(self.label_table), [b], device=self.device, generator=g)]
            labels = torch.eye(self.G.label_dim, device=self.device)[idx]
        return z, labels

    def _generator_draws(self, rnd: int):
        """(z, labels, sigma, eps) of generator-phase micro-batch `rnd`, drawn in this order from its generator."""
        cfg = self.cfg
        g = self._gen(GEN, rnd)
        z, labels = self._draw_z_labels(g)
        sigma = sample_generator_sigma(cfg.batch_gpu, cfg.tmax, self.device, generator=g)
        eps = torch.randn(
            [cfg.batch_gpu, cfg.channels, cfg.resolution, cfg.resolution], device=self.device, generator=g
        )
        return z, labels, sigma, eps

    def _aug_zeros(self, n):
        return dict(augment_labels=torch.zeros([n, self.aug_dim], device=self.device)) if self.aug_dim else {}

    def generate(self, call, z, labels):
        sigma = torch.full([z.shape[0], 1, 1, 1], self.cfg.init_sigma, device=self.device)
        return call(self.cfg.init_sigma * z, sigma, labels, **self._aug_zeros(z.shape[0]))

    # ------------------------------------------------------------------
    # One iteration.

    def _clean_grads(self, params):
        """nan_to_num on every gradient (official cleaning); returns a device bool: were any non-finite? (With --fsdp
        each rank cleans its shards and the flag is agreed on by all ranks.)"""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for p in params:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                bad = bad | ~torch.isfinite(g).all()
                torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
        if self.fsdp:
            flag = bad.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag.bool()
        return bad

    def _no_sync(self, net_ddp, rnd: int):
        """Gradients are reduced once per phase, after the last round: DDP's no_sync, FSDP2's gradient-sync switch."""
        if self.world == 1 or rnd == self.rounds - 1:
            if self.fsdp:
                net_ddp.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            net_ddp.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return net_ddp.no_sync()

    def _apply_gradients(self, net, opt, bad_slot: str, clip_value: float | None = None):
        """End of a phase: clean and count the gradients (SiDA: then clip each element at +-clip_value, as the official
        sida loop's clip_grad_value_), optimizer step, freeze the network again."""
        if self.fsdp:  # the parameters FSDP2 leaves whole: gradients averaged over the ranks here
            for p in self.replicated[id(net)]:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.world)
        bad = self._clean_grads(net.parameters())
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(net.parameters(), clip_value)
        self.stats.add(**{bad_slot: bad.double()})
        with annotate("sid/optimizer"):
            opt.step()
        # The gradients are dead from here (each phase starts from zero): freed now, they no longer sit through the
        # other phase (the official loop keeps them until its next zero_grad; bench.memory counts the difference).
        opt.zero_grad(set_to_none=True)
        net.eval().requires_grad_(False)
        return bad

    def _force_weight_norm(self, net):
        """EDM2's forced weight normalisation, once per optimizer step before the network's first train-mode call
        (upstream does it inside every train-mode forward; see sid_fast.networks.edm2)."""
        if self.force_wn:
            edm2.force_weight_norm_(net)

    def fake_score_phase(self):
        cfg = self.cfg
        self.G.eval()
        self.fake.train().requires_grad_(True)
        self._force_weight_norm(self.fake)
        self.opt_fake.zero_grad(set_to_none=True)
        for rnd in range(self.rounds):
            g = self._gen(FAKE, rnd)
            z, labels = self._draw_z_labels(g)
            with torch.no_grad():
                x_g = self.generate(self.calls.G_eval, z, labels)
            sigma = sample_edm_sigma(cfg.batch_gpu, self.device, self.P_mean, self.P_std, generator=g)
            if self.augment_pipe is not None:
                y, aug = self.augment_pipe(x_g, generator=g)
            else:
                y, aug = x_g, (torch.zeros([cfg.batch_gpu, self.aug_dim], device=self.device) if self.aug_dim else None)
            noise = torch.randn(y.shape, device=self.device, generator=g)
            with self._no_sync(self.fake_ddp, rnd):
                out = self.calls.fake_train(y + sigma * noise, sigma, labels, **self._fake_kwargs(aug))
                D, u = out if self.logvar else (out, None)
                loss_sum, ok = ops.fake_score_loss_sum(D, y, sigma, u=u)
                (loss_sum * (cfg.ls / self.batch_gpu_total)).backward()
            self.stats.add(loss_fake=loss_sum.detach(), rows_fake=ok.sum(), nan_samples_fake=(~ok).sum())
        return self._apply_gradients(self.fake, self.opt_fake, "bad_steps_fake")

    def _fake_kwargs(self, aug=None):
        kw = {} if aug is None else dict(augment_labels=aug)
        return dict(kw, return_logvar=True) if self.logvar else kw

    def generator_phase(self):
        cfg = self.cfg
        self.G.train().requires_grad_(True)
        self._force_weight_norm(self.G)
        self.fake.eval().requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for rnd in range(self.rounds):
            z, labels, sigma, eps = self._generator_draws(rnd)
            with self._no_sync(self.G_ddp, rnd):
                x_g = self.generate(self.calls.G_train, z, labels)
                x_t = perf.image_format(cfg, x_g + sigma * eps)
                aug = self._aug_zeros(cfg.batch_gpu)
                y_real = self.calls.teacher(x_t, sigma, labels, **aug)
                out = self.calls.fake_eval(x_t, sigma, labels, **aug, **self._fake_kwargs())
                y_fake, u = out if self.logvar else (out, None)
                loss_sum, ok = ops.sid_generator_loss_sum(x_g, y_real, y_fake, cfg.alpha, u=u)
                with annotate("sid/backward"):
                    (loss_sum * (cfg.lsg / self.batch_gpu_total)).backward()
            self.stats.add(loss_G=loss_sum.detach(), rows_G=ok.sum(), nan_samples_G=(~ok).sum())
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
    # Training state.

    def _trained_states(self) -> dict:
        """G, fake score and their Adam states. With --fsdp every sharded tensor (parameters and Adam moments) is
        gathered whole (a collective), so the file has the format of an unsharded run's. (PyTorch's
        get_optimizer_state_dict is not used: it initialises the state of an optimizer that has not stepped yet, e.g.
        SiDA's G before its warm-up ends, with a zero step that shifts Adam's bias correction afterwards.)"""
        if not self.fsdp:
            return dict(
                G=self.G.state_dict(),
                fake_score=self.fake.state_dict(),
                opt_g=self.opt_g.state_dict(),
                opt_fake=self.opt_fake.state_dict(),
            )

        def whole(t):
            return t.full_tensor().cpu() if hasattr(t, "full_tensor") else t

        def opt_state(opt):
            sd = opt.state_dict()
            return dict(sd, state={i: {k: whole(v) for k, v in st.items()} for i, st in sd["state"].items()})

        return dict(
            G={k: whole(v) for k, v in self.G.state_dict().items()},
            fake_score={k: whole(v) for k, v in self.fake.state_dict().items()},
            opt_g=opt_state(self.opt_g),
            opt_fake=opt_state(self.opt_fake),
        )

    def _load_trained_states(self, s: dict) -> None:
        if not self.fsdp:
            self.G.load_state_dict(s["G"])
            self.fake.load_state_dict(s["fake_score"])
            self.opt_g.load_state_dict(s["opt_g"])
            self.opt_fake.load_state_dict(s["opt_fake"])
            return
        from torch.distributed.tensor import distribute_tensor

        def shard_like(t, like):
            return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements)

        for net, key in ((self.G, "G"), (self.fake, "fake_score")):
            own = net.state_dict()
            with torch.no_grad():
                for k, v in s[key].items():
                    if k not in own:
                        raise KeyError(k)
                    target = own[k]
                    if hasattr(target, "full_tensor"):  # every rank read the whole file and keeps its own shard
                        target.to_local().copy_(shard_like(v, target).to_local())
                    else:
                        target.copy_(v)
        for net, opt, key in ((self.G, self.opt_g, "opt_g"), (self.fake, self.opt_fake, "opt_fake")):
            params = list(net.parameters())
            sd = s[key]
            state = {}
            for i, st in sd["state"].items():
                p = params[int(i)]
                state[i] = {
                    k: shard_like(v, p) if hasattr(p, "full_tensor") and v.ndim and v.shape == p.shape else v
                    for k, v in st.items()
                }
            opt.load_state_dict(dict(sd, state=state))

    def state_dict(self) -> dict:
        rng = dict(
            cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        )
        all_rng = dist.all_gather_object(rng)
        return dict(
            format=checkpoints.TRAINING_STATE_FORMAT,
            version=1,
            config=self.cfg.to_json(),
            world_size=self.world,
            class_name=self.student.class_name,
            init_kwargs=self.init_kwargs,
            fsdp=self.fsdp,
            G_ema=self.G_ema.state_dict(),
            **self._trained_states(),
            rng=all_rng,
            cur_nimg=self.cur_nimg,
            cur_tick=self.cur_tick,
            tick_start_nimg=self.tick_start_nimg,
            stats=self.stats.values.cpu(),
            consec_bad=self.consec_bad.cpu(),
            max_consec_bad=self.max_consec_bad.cpu(),
            metrics_history=json.dumps(self.metrics_history),
        )

    def load_state_dict(self, s: dict, path) -> None:
        if s.get("world_size") != self.world:
            raise ConfigError(
                f"--resume {path}: written by {s.get('world_size')} processes, this run has {self.world}; "
                "resume with the same number of processes."
            )
        try:
            self.G_ema.load_state_dict(s["G_ema"])
            self._load_trained_states(s)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume {path}: the state does not match this teacher/configuration: {e}") from None
        self.cur_nimg, self.cur_tick, self.tick_start_nimg = s["cur_nimg"], s["cur_tick"], s["tick_start_nimg"]
        stats = s["stats"].to(self.device)  # states written before the SiDA slots existed have fewer
        self.stats.values = torch.cat([stats, self.stats.values[len(stats) :]])
        self.consec_bad = s["consec_bad"].to(self.device)
        self.max_consec_bad = s["max_consec_bad"].to(self.device)
        self.metrics_history = json.loads(s.get("metrics_history", "[]"))
        rng = s["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save_state(self) -> Path | None:
        s = self.state_dict()  # collective (gathers RNG states): every rank calls it
        if self.rank != 0 or self.run_dir is None:
            return None
        path = self.run_dir / f"training-state-{self.cur_nimg // 1000:06d}.pt"
        checkpoints.atomic_save(s, path)
        return path

    # ------------------------------------------------------------------
    # Snapshots and metrics (rank 0).

    @torch.no_grad()
    def sample_ema(self, seeds):
        z, labels, _ = latents_and_labels(self.G_ema, seeds, device=self.device)
        out = []
        for i in range(0, len(seeds), 256):
            out.append(
                onestep_sample(
                    self.G_ema, z[i : i + 256], self.cfg.init_sigma, None if labels is None else labels[i : i + 256]
                ).cpu()
            )
        return torch.cat(out)

    def snapshot(self):
        with ops.kernels(self.kernels):
            return self._snapshot()

    def _snapshot(self):
        kimg = self.cur_nimg // 1000
        if self.rank == 0 and self.run_dir is not None:
            samples = self.sample_ema(list(range(64)))
            if self.vae is not None:
                grid = self.vae.decode(samples.to(self.device)).cpu()
            elif self.G_ema.img_channels == 4:  # EDM2 latents without --vae: no picture to draw
                grid = None
            else:
                grid = to_uint8(samples)
            if grid is not None:
                save_image(
                    image_grid(grid, scale=max(1, 64 // grid.shape[-1]), gap=2), self.run_dir / f"fakes-{kimg:06d}.png"
                )
            checkpoints.save_network(
                self.run_dir / f"network-snapshot-{kimg:06d}.pt",
                self.G_ema,
                self.g_init_kwargs,
                kind="generator",
                sigma_init=self.cfg.init_sigma,
                alpha=self.cfg.alpha,
                preset=self.cfg.preset,
                kimg=self.cur_nimg / 1e3,
                teacher=str(self.cfg.teacher),
            )
        if self.cfg.metrics == "fd-digits" and self.rank == 0:
            from sid_fast.metrics.digits import fd_digits

            seeds = list(range(10_000_000, 10_000_000 + self.cfg.metric_num))
            return self._record_metric("fd_digits", fd_digits(self.sample_ema(seeds)), kimg)
        if self.cfg.metrics == "fid":  # every rank generates its share of the images
            from sid_fast.metrics.fid import fid_against, generator_stats

            info = dict(meta=dict(kind="generator", sigma_init=self.cfg.init_sigma))
            stats, _ = generator_stats(
                self.G_ema,
                info,
                range(self.cfg.metric_num),
                self.detector,
                self.device,
                batch=self.cfg.batch_gpu,
                rank=self.rank,
                world=self.world,
                progress=False,
                vae=self.vae,
            )
            if self.rank == 0:
                return self._record_metric("fid", fid_against(stats, self.fid_ref), kimg)
        return None

    def _snapshot_and_log(self):
        value = self.snapshot()
        if value is not None:
            name = "FD-digits" if self.cfg.metrics == "fd-digits" else f"FID-{self.cfg.metric_num // 1000}k"
            self.log(f"  {name} of G_ema at {self.cur_nimg / 1e3:.1f} kimg: {value:.3f}")

    def _record_metric(self, key: str, value: float, kimg: int) -> float:
        rec = {
            "kimg": self.cur_nimg / 1e3,
            key: value,
            "num": self.cfg.metric_num,
            "snapshot": f"network-snapshot-{kimg:06d}.pt",
        }
        self.metrics_history.append(rec)
        if self.run_dir is not None:
            tickstats.append_jsonl(self.run_dir / f"metric-{key}.jsonl", rec)
            teacher = self.student.teacher_meta.get("fd_digits_heun35") if key == "fd_digits" else None
            tickstats.plot_metric(
                self.run_dir / f"{key}.png",
                key,
                self.metrics_history,
                teacher_value=teacher,
                metric_num=self.cfg.metric_num,
            )
        return value

    # ------------------------------------------------------------------
    # The loop.

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.stop_requested:  # second signal: give up at once
                raise KeyboardInterrupt
            self.stop_requested = True
            self.log(f"Received signal {signum}: finishing the current step, then writing a training state.")

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(s, handler)
            except ValueError:  # not in the main thread (e.g. under some test runners)
                pass

    def train(self):
        cfg = self.cfg
        self._install_signal_handlers()
        nvml = tickstats.NVML(self.device)
        total_nimg = int(cfg.duration * 1e6)
        progress = None
        if self.rank == 0 and sys.stdout.isatty():
            from tqdm import tqdm

            progress = tqdm(total=total_nimg // 1000, initial=self.cur_nimg // 1000, unit="kimg", leave=False)
        if cfg.extra_snapshots and self.cur_nimg == 0:  # official: a snapshot of the initial G_ema before training
            self._snapshot_and_log()
        start = tick_start = time.time()
        start_nimg = self.cur_nimg
        self.log(
            f"Training for {cfg.duration * 1000:g} kimg: batch {cfg.batch} = {self.world} processes x "
            f"{self.rounds} rounds x {cfg.batch_gpu}; alpha {cfg.alpha}, tmax {cfg.tmax}, init_sigma {cfg.init_sigma}."
        )
        while True:
            self.step()
            if progress is not None:
                progress.update(self.cur_nimg // 1000 - progress.n)
            done = self.cur_nimg >= total_nimg
            at_tick = done or self.cur_tick == 0 or self.cur_nimg >= self.tick_start_nimg + cfg.tick * 1000
            # A stop request is agreed on across ranks every 8 iterations and at ticks: the all-reduce is a host sync.
            check = at_tick or self.world == 1 or (self.cur_nimg // cfg.batch) % 8 == 0
            stop = dist.all_reduce_max_flag(self.stop_requested, self.device) if check else False
            if not at_tick and not stop:
                continue
            now = time.time()
            rec, line = tickstats.status(
                self.stats.reduce(),
                tick=self.cur_tick,
                nimg=self.cur_nimg,
                tick_nimg=self.cur_nimg - self.tick_start_nimg,
                tick_time=now - tick_start,
                total_time=now - start,
                nvml=nvml,
                device=self.device,
            )
            self.log(line)
            if self.rank == 0 and self.run_dir is not None:
                tickstats.append_jsonl(self.run_dir / "stats.jsonl", rec)
            too_bad = int(self.max_consec_bad.item()) >= cfg.max_bad_steps
            if done or self.cur_tick % cfg.snap == 0 or (cfg.extra_snapshots and self.cur_tick in EXTRA_SNAPSHOT_TICKS):
                self._snapshot_and_log()
            if done or stop or too_bad or self.cur_tick % cfg.dump == 0:
                path = self.save_state()
                if path is not None:
                    self.log(f"  wrote {path.name}")
            if too_bad:
                raise TrainingAborted(
                    f"{int(self.max_consec_bad.item())} consecutive steps had non-finite gradients "
                    f"(limit --max-bad-steps {cfg.max_bad_steps}); the last training state was written."
                )
            self.cur_tick += 1
            self.tick_start_nimg = self.cur_nimg
            tick_start = time.time()
            if done or stop:
                break
        if progress is not None:
            progress.close()
        wall = time.time() - start
        self.log(
            f"{'Stopped' if stop and not done else 'Finished'} at {self.cur_nimg / 1e3:.1f} kimg: "
            f"{wall:.1f} s wall time, "
            f"{(self.cur_nimg - start_nimg) / max(wall, 1e-9):.1f} img/s overall (evaluations and snapshots included)."
        )
        return "stopped" if stop and not done else "done"


__all__ = ["SiDTrainer", "Student", "TrainingAborted"]
