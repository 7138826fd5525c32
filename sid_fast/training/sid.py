"""The SiD distillation loop (Zhou et al., ICML 2024), reference path.

One iteration, exactly as shared/design.md "One SiD iteration" and shared/reference/sid.md section 3:
  1. fake-score step: x_g = G(sigma_init z) without gradient (G in eval mode); EDM loss of f_psi on x_g (augmented
     when the preset has augmentation), ln sigma ~ N(-1.2, 1.2^2); summed, times ls / batch_gpu_total; Adam step.
  2. generator step: x_g = G(sigma_init z) with gradient (G in train mode); sigma from t ~ U[0, tmax/1000];
     x_t = x_g + sigma eps; y_real = f_phi(x_t), y_fake = f_psi(x_t) (f_psi in eval mode, teacher always eval);
     SiD loss summed, times lsg / batch_gpu_total; Adam step.
  3. EMA of G with EDM's half-life and ramp-up.
Gradients are accumulated over micro-batches and all-reduced once per phase (DDP no_sync on the other rounds),
cleaned with nan_to_num (nan -> 0, +-inf -> +-1e5) parameter by parameter; Adam betas (0, 0.999) (generator beta1
configurable), eps 1e-8 in fp32; no LR schedule, no clipping.

Randomness. Every per-sample draw (z, labels, sigma, noise, augmentation) of micro-batch m of iteration `it` comes
from a generator seeded by (seed, it, phase, m), with m = rank * rounds + round. For a given --batch and --batch-gpu
a run therefore sees the same samples whatever its number of processes (the rounds per process change, the set of
micro-batches does not), and resuming needs no RNG state for them. Changing --batch-gpu regroups the draws. Dropout draws
from each rank's global RNG (seeded with seed + rank, as the official code), whose state the training state keeps.
Class labels of conditional models follow --data's label frequencies, as the official loop (which takes them from
the training images it iterates); without --data they are uniform, and the log and training_options.json say so.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints, ops
from sid_fast.augment import AugmentPipe
from sid_fast.losses import sample_edm_sigma, sample_generator_sigma
from sid_fast.networks import build_network
from sid_fast.sampling import image_grid, latents_and_labels, onestep_sample, save_image, to_uint8
from sid_fast.training import dist, fast
from sid_fast.training.config import ConfigError, TrainConfig, validate
from sid_fast.training.ema import ema_beta, ema_halflife_kimg, update_ema

STATE_FORMAT = "sid_fast.training_state"
EXTRA_SNAPSHOT_TICKS = frozenset(range(10, 101, 10))  # official sid_training_loop.py, besides every --snap ticks
FAKE, GEN = 0, 1


class TrainingAborted(RuntimeError):
    pass


class annotate:
    """A named range in torch.profiler traces and, on CUDA, in Nsight Systems (NVTX)."""

    def __init__(self, name: str):
        self.name = name
        self.nvtx = torch.cuda.is_available()

    def __enter__(self):
        self.rf = torch.profiler.record_function(self.name)
        self.rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.rf.__exit__(*exc)
        return False


def _seed_for(seed: int, it: int, phase: int, m: int) -> int:
    h = hashlib.blake2b(f"{seed}/{it}/{phase}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class Logger:
    """print0 that also appends to <run_dir>/log.txt on rank 0."""

    def __init__(self, run_dir: Path | None):
        self.file = open(run_dir / "log.txt", "a") if run_dir is not None and dist.rank() == 0 else None

    def __call__(self, msg: str = "") -> None:
        if dist.rank() == 0:
            print(msg, flush=True)
            if self.file:
                self.file.write(msg + "\n")
                self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


class _NVML:
    def __init__(self, device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (no driver, container without it): the columns show "--"
            self.handle = None

    def read(self) -> tuple[float | None, float | None]:
        if self.handle is None:
            return None, None
        try:
            util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            power = self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            return float(util), float(power)
        except Exception:
            return None, None


def check_teacher(cfg: TrainConfig, teacher, path) -> None:
    want_labels = cfg.label_dim if cfg.cond else 0
    problems = []
    if teacher.img_resolution != cfg.resolution:
        problems.append(f"resolution {teacher.img_resolution} (preset/flags: {cfg.resolution})")
    if teacher.img_channels != cfg.channels:
        problems.append(f"{teacher.img_channels} channels (preset/flags: {cfg.channels})")
    if teacher.label_dim != want_labels:
        problems.append(f"label_dim {teacher.label_dim} (preset/flags: {want_labels}, --cond {int(cfg.cond)})")
    if problems:
        raise ConfigError(f"--teacher {path}: the network has " + "; ".join(problems) + ".")


class SiDTrainer:
    def __init__(self, cfg: TrainConfig, device: torch.device, run_dir: Path | None, log=print, teacher=None, student=None,
                 teacher_info=None, fid=None, label_table=None):
        self.cfg = cfg
        self.device = device
        self.run_dir = run_dir
        self.log = log
        self.rank, self.world = dist.rank(), dist.world_size()
        validate(cfg, self.world)
        self.batch_gpu_total = cfg.batch // self.world
        self.rounds = self.batch_gpu_total // cfg.batch_gpu
        torch.manual_seed(cfg.seed + self.rank)  # dropout RNG, per rank as the official code
        np.random.seed((cfg.seed + self.rank) % (1 << 31))

        if teacher is None:
            teacher, info = checkpoints.load_network_file(cfg.teacher)
            student = (info["class_name"], info["init_kwargs"], teacher.state_dict())
        else:  # an already loaded teacher, or an analytic one (tests), with the students' initialisation given
            info = teacher_info or dict(class_name=student[0], init_kwargs=student[1], meta={})
        check_teacher(cfg, teacher, cfg.teacher)
        self.teacher_info = info
        # --precision fp16 is EDM's use_fp16 on every network (official sid_train.py sets it for all three; G_ema is a
        # copy of G): UNet bodies in fp16 on CUDA, fp32 on a CPU (EDM's own rule). Other precisions leave it off.
        fp16 = cfg.precision == "fp16"
        self.init_kwargs = dict(student[1], dropout=cfg.dropout, use_fp16=fp16)
        teacher.use_fp16 = fp16
        if fp16 and device.type != "cuda":
            log("--precision fp16: EDM's fp16 mode runs the UNet bodies in fp16 on CUDA only; on this CPU they run in "
                "fp32, as EDM's code does (Adam eps is 1e-6 all the same).")
        fast.set_matmul_precision(cfg.precision)
        if fast.kernel_names(cfg) is not None:
            ops.set_use_kernels(fast.kernel_names(cfg))
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.G = self._copy(student[2]).train().requires_grad_(True)
        self.fake = self._copy(student[2]).train().requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        fast.prepare_networks(cfg, self.teacher, (self.G, self.fake), self.G_ema)
        self.aug_dim = self.G.model.map_augment.in_features if self.G.model.map_augment is not None else 0
        if cfg.augment > 0 and not self.aug_dim:
            raise ConfigError(f"--augment {cfg.augment}: the networks have no augment labels (augment_dim 0); use --augment 0.")
        self.augment_pipe = AugmentPipe(p=cfg.augment) if cfg.augment > 0 else None
        # Class labels: the dataset's label frequencies (official: labels of the training images it iterates) or,
        # without --data, uniform over the classes.
        self.label_table = None
        if self.G.label_dim:
            if cfg.data is not None:
                table = load_label_table(cfg, self.G.label_dim) if label_table is None else label_table
                self.label_table = torch.as_tensor(table, device=device)
                log(f"Class labels: drawn with the label frequencies of --data {cfg.data} ({len(self.label_table)} images).")
            else:
                log(f"Class labels: uniform over {self.G.label_dim} classes (no --data; the official code follows the "
                    "training set's label frequencies).")

        eps = 1e-6 if fp16 else 1e-8  # official sid_train.py: 1e-6 with --fp16 1, else 1e-8
        self.opt_fake = fast.make_adam(self.fake.parameters(), cfg.lr, (0.0, 0.999), eps, cfg.optimizer)
        self.opt_g = fast.make_adam(self.G.parameters(), cfg.glr, (cfg.g_beta1, 0.999), eps, cfg.optimizer)
        if self.world > 1:
            ddp = dict(broadcast_buffers=False, find_unused_parameters=False)
            if device.type == "cuda":
                ddp["device_ids"] = [device]
            self.G_ddp = torch.nn.parallel.DistributedDataParallel(self.G, **ddp)
            self.fake_ddp = torch.nn.parallel.DistributedDataParallel(self.fake, **ddp)
        else:
            self.G_ddp, self.fake_ddp = self.G, self.fake
        # Call sites (compiled with --compile / --cuda-graphs; the modules themselves stay plain for state dicts).
        self.run_G_train = fast.maybe_compile(self.G_ddp, cfg)
        self.run_G_eval = fast.maybe_compile(self.G, cfg)
        self.run_fake_train = fast.maybe_compile(self.fake_ddp, cfg)
        self.run_fake_eval = fast.maybe_compile(self.fake, cfg)
        self.run_teacher = fast.maybe_compile(self.teacher, cfg)

        # Counters and device-side statistics (read once per tick).
        self.cur_nimg = 0
        self.cur_tick = 0
        self.tick_start_nimg = 0
        self.stats = torch.zeros(8, dtype=torch.float64, device=device)
        self.consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consec_bad = torch.zeros((), dtype=torch.int64, device=device)
        self.stop_requested = False
        self.metrics_history: list[dict] = []
        self.fid_ref, self.detector = fid if fid is not None else prepare_fid(cfg, device)

    # ------------------------------------------------------------------
    # Networks and randomness.

    def _copy(self, state):
        net = build_network(self.teacher_info["class_name"], self.init_kwargs)
        net.load_state_dict(state)
        return net.to(self.device)

    def _gen(self, phase: int, rnd: int) -> torch.Generator:
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

    def _aug_zeros(self, n):
        return dict(augment_labels=torch.zeros([n, self.aug_dim], device=self.device)) if self.aug_dim else {}

    def generate(self, net, z, labels):
        sigma = torch.full([z.shape[0], 1, 1, 1], self.cfg.init_sigma, device=self.device)
        return net(fast.image_format(self.cfg, self.cfg.init_sigma * z), sigma, labels, **self._aug_zeros(z.shape[0]))

    # ------------------------------------------------------------------
    # One iteration.

    def _clean_grads(self, params):
        """nan_to_num on every gradient (official cleaning); returns a device bool: were any non-finite?"""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for p in params:
            if p.grad is not None:
                bad = bad | ~torch.isfinite(p.grad).all()
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        return bad

    def _apply_gradients(self, net, opt, bad_slot: int):
        """End of a phase: clean and count the gradients, optimizer step, freeze the network again."""
        bad = self._clean_grads(net.parameters())
        self.stats[bad_slot] += bad.double()
        with annotate("sid/optimizer"):
            opt.step()
        net.eval().requires_grad_(False)
        return bad

    def fake_score_phase(self):
        cfg = self.cfg
        self.G.eval()
        self.fake.train().requires_grad_(True)
        self.opt_fake.zero_grad(set_to_none=True)
        for rnd in range(self.rounds):
            g = self._gen(FAKE, rnd)
            z, labels = self._draw_z_labels(g)
            with torch.no_grad():
                x_g = self.generate(self.run_G_eval, z, labels)
            sigma = sample_edm_sigma(cfg.batch_gpu, self.device, generator=g)
            if self.augment_pipe is not None:
                y, aug = self.augment_pipe(x_g, generator=g)
                kw = aug
            else:
                y, kw = x_g, (torch.zeros([cfg.batch_gpu, self.aug_dim], device=self.device) if self.aug_dim else None)
            noise = torch.randn(y.shape, device=self.device, generator=g)
            sync = self.world > 1 and rnd < self.rounds - 1
            with self.fake_ddp.no_sync() if sync else contextlib.nullcontext():
                D = self.run_fake_train(fast.image_format(cfg, y + sigma * noise), sigma, labels,
                                        **({} if kw is None else dict(augment_labels=kw)))
                loss_sum, ok = ops.fake_score_loss_sum(D, y, sigma)
                (loss_sum * (cfg.ls / self.batch_gpu_total)).backward()
            self.stats[0] += loss_sum.detach()
            self.stats[2] += ok.sum()
            self.stats[4] += (~ok).sum()
        return self._apply_gradients(self.fake, self.opt_fake, bad_slot=6)

    def generator_phase(self):
        cfg = self.cfg
        self.G.train().requires_grad_(True)
        self.fake.eval().requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for rnd in range(self.rounds):
            g = self._gen(GEN, rnd)
            z, labels = self._draw_z_labels(g)
            sigma = sample_generator_sigma(cfg.batch_gpu, cfg.tmax, self.device, generator=g)
            eps = torch.randn([cfg.batch_gpu, cfg.channels, cfg.resolution, cfg.resolution], device=self.device, generator=g)
            sync = self.world > 1 and rnd < self.rounds - 1
            with self.G_ddp.no_sync() if sync else contextlib.nullcontext(), \
                    fast.block_checkpointing(cfg.checkpointing, self.teacher, self.fake):
                with annotate("sid/generator"):
                    x_g = self.generate(self.run_G_train, z, labels)
                x_t = fast.image_format(cfg, x_g + sigma * eps)
                aug = self._aug_zeros(cfg.batch_gpu)
                with annotate("sid/teacher"):
                    y_real = fast.call_checkpointed(cfg.checkpointing, self.run_teacher, x_t, sigma, labels, **aug)
                with annotate("sid/fake_score"):
                    y_fake = fast.call_checkpointed(cfg.checkpointing, self.run_fake_eval, x_t, sigma, labels, **aug)
                loss_sum, ok = ops.sid_generator_loss_sum(x_g, y_real, y_fake, cfg.alpha)
                with annotate("sid/backward"):
                    (loss_sum * (cfg.lsg / self.batch_gpu_total)).backward()
            self.stats[1] += loss_sum.detach()
            self.stats[3] += ok.sum()
            self.stats[5] += (~ok).sum()
        return self._apply_gradients(self.G, self.opt_g, bad_slot=7)

    def step(self):
        with annotate("sid/fake_score_step"):
            bad_f = self.fake_score_phase()
        with annotate("sid/generator_step"):
            bad_g = self.generator_phase()
        with annotate("sid/ema"):
            # As the official loop: the half-life is int(ema * 1000) kimg and the ramp-up uses the images seen before
            # this iteration (beta = 0 at the first one, so G_ema starts as G).
            beta = ema_beta(self.cfg.batch, self.cur_nimg, ema_halflife_kimg(self.cfg.ema))
            if self.cfg.optimizer == "adam":
                update_ema(self.G_ema, self.G, beta)
            else:
                fast.update_ema_foreach(self.G_ema, self.G, beta)
        self.cur_nimg += self.cfg.batch
        bad = bad_f | bad_g
        self.consec_bad = (self.consec_bad + 1) * bad
        self.max_consec_bad = torch.maximum(self.max_consec_bad, self.consec_bad)

    # ------------------------------------------------------------------
    # Training state.

    def state_dict(self) -> dict:
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        all_rng = dist.all_gather_object(rng)
        return dict(
            format=STATE_FORMAT,
            version=1,
            config=self.cfg.to_json(),
            world_size=self.world,
            class_name=self.teacher_info["class_name"],
            init_kwargs=self.init_kwargs,
            G=self.G.state_dict(),
            G_ema=self.G_ema.state_dict(),
            fake_score=self.fake.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_fake=self.opt_fake.state_dict(),
            rng=all_rng,
            cur_nimg=self.cur_nimg,
            cur_tick=self.cur_tick,
            tick_start_nimg=self.tick_start_nimg,
            stats=self.stats.cpu(),
            consec_bad=self.consec_bad.cpu(),
            max_consec_bad=self.max_consec_bad.cpu(),
            metrics_history=json.dumps(self.metrics_history),
        )

    def load_state_dict(self, s: dict, path) -> None:
        if s.get("world_size") != self.world:
            raise ConfigError(f"--resume {path}: written by {s.get('world_size')} processes, this run has {self.world}; "
                              "resume with the same number of processes.")
        try:
            self.G.load_state_dict(s["G"])
            self.G_ema.load_state_dict(s["G_ema"])
            self.fake.load_state_dict(s["fake_score"])
            self.opt_g.load_state_dict(s["opt_g"])
            self.opt_fake.load_state_dict(s["opt_fake"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume {path}: the state does not match this teacher/configuration: {e}") from None
        self.cur_nimg, self.cur_tick, self.tick_start_nimg = s["cur_nimg"], s["cur_tick"], s["tick_start_nimg"]
        self.stats = s["stats"].to(self.device)
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
            out.append(onestep_sample(self.G_ema, z[i : i + 256], self.cfg.init_sigma,
                                      None if labels is None else labels[i : i + 256]).cpu())
        return torch.cat(out)

    def snapshot(self):
        kimg = self.cur_nimg // 1000
        if self.rank == 0 and self.run_dir is not None:
            grid = to_uint8(self.sample_ema(list(range(64))))
            save_image(image_grid(grid), self.run_dir / f"fakes-{kimg:06d}.png", scale=max(1, 128 // self.cfg.resolution))
            checkpoints.save_network(
                self.run_dir / f"network-snapshot-{kimg:06d}.pt", self.G_ema, self.init_kwargs, kind="generator",
                sigma_init=self.cfg.init_sigma, alpha=self.cfg.alpha, preset=self.cfg.preset, kimg=self.cur_nimg / 1e3,
                teacher=str(self.cfg.teacher),
            )
        if self.cfg.metrics == "fd-digits" and self.rank == 0:
            from sid_fast.metrics.digits import fd_digits

            seeds = list(range(10_000_000, 10_000_000 + self.cfg.metric_num))
            return self._record_metric("fd_digits", fd_digits(self.sample_ema(seeds)), kimg)
        if self.cfg.metrics == "fid":  # every rank generates its share of the images
            from sid_fast.fid import fid_against, generator_stats

            info = dict(meta=dict(kind="generator", sigma_init=self.cfg.init_sigma))
            stats, _ = generator_stats(self.G_ema, info, range(self.cfg.metric_num), self.detector, self.device,
                                       batch=self.cfg.batch_gpu, rank=self.rank, world=self.world, progress=False)
            if self.rank == 0:
                return self._record_metric("fid", fid_against(stats, self.fid_ref), kimg)
        return None

    def _snapshot_and_log(self):
        value = self.snapshot()
        if value is not None:
            name = "FD-digits" if self.cfg.metrics == "fd-digits" else f"FID-{self.cfg.metric_num // 1000}k"
            self.log(f"  {name} of G_ema at {self.cur_nimg / 1e3:.1f} kimg: {value:.3f}")

    def _record_metric(self, key: str, value: float, kimg: int) -> float:
        rec = {"kimg": self.cur_nimg / 1e3, key: value, "num": self.cfg.metric_num,
               "snapshot": f"network-snapshot-{kimg:06d}.pt"}
        self.metrics_history.append(rec)
        if self.run_dir is not None:
            with open(self.run_dir / f"metric-{key}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self._plot_metric(key)
        return value

    def _plot_metric(self, key: str):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = [r for r in self.metrics_history if key in r]
        xs = [r["kimg"] for r in hist]
        ys = [r[key] for r in hist]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot(xs, ys, "o-", label="one-step generator (G_ema)")
        teacher = self.teacher_info.get("meta", {}).get("fd_digits_heun35") if key == "fd_digits" else None
        if teacher is not None:
            ax.axhline(teacher, color="gray", ls="--", label=f"teacher, Heun 35 NFE ({teacher:.2f})")
        ax.set_xlabel("generator images seen (kimg)")
        ax.set_ylabel({"fd_digits": "FD-digits", "fid": f"FID ({self.cfg.metric_num // 1000}k)"}.get(key, key))
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / f"{key}.png")
        plt.close(fig)

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

    def _status(self, tick_time, total_time, nvml):
        s = dist.all_reduce_sum(self.stats)
        self.stats.zero_()
        s = s.cpu().tolist()
        loss_f = s[0] / max(s[2], 1)
        loss_g = s[1] / max(s[3], 1)
        kimg_tick = (self.cur_nimg - self.tick_start_nimg) / 1e3
        util, power = nvml.read()
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        rec = dict(tick=self.cur_tick, kimg=self.cur_nimg / 1e3, time=total_time, sec_per_tick=tick_time,
                   sec_per_kimg=tick_time / max(kimg_tick, 1e-9), img_per_s=kimg_tick * 1e3 / max(tick_time, 1e-9),
                   loss_G=loss_g, loss_fake=loss_f, nan_samples_fake=s[4], nan_samples_G=s[5],
                   bad_steps_fake=s[6], bad_steps_G=s[7], gpumem_gb=mem, gpu_util=util, power_w=power,
                   timestamp=time.time())
        fmt = (f"tick {rec['tick']:<5d} kimg {rec['kimg']:<9.1f} time {rec['time']:<8.1f} sec/kimg {rec['sec_per_kimg']:<8.2f} "
               f"img/s {rec['img_per_s']:<8.1f} loss_G {loss_g:<+10.4f} loss_fake {loss_f:<9.4f} "
               f"gpumem {mem:<5.1f} util {'--' if util is None else f'{util:.0f}%':<5} "
               f"power {'--' if power is None else f'{power:.0f}W':<5}")
        if s[4] or s[5] or s[6] or s[7]:
            fmt += f" nan_samples {int(s[4])}/{int(s[5])} bad_steps {int(s[6])}/{int(s[7])}"
        return rec, fmt

    def train(self):
        cfg = self.cfg
        self._install_signal_handlers()
        nvml = _NVML(self.device)
        total_nimg = int(cfg.duration * 1e6)
        progress = None
        if self.rank == 0 and sys.stdout.isatty():
            from tqdm import tqdm

            progress = tqdm(total=total_nimg // 1000, initial=self.cur_nimg // 1000, unit="kimg", leave=False)
        if cfg.extra_snapshots and self.cur_nimg == 0:  # official: a snapshot of the initial G_ema before training
            self._snapshot_and_log()
        start = tick_start = time.time()
        start_nimg = self.cur_nimg
        self.log(f"Training for {cfg.duration * 1000:g} kimg: batch {cfg.batch} = {self.world} processes x "
                 f"{self.rounds} rounds x {cfg.batch_gpu}; alpha {cfg.alpha}, tmax {cfg.tmax}, init_sigma {cfg.init_sigma}.")
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
            rec, line = self._status(now - tick_start, now - start, nvml)
            self.log(line)
            if self.rank == 0 and self.run_dir is not None:
                with open(self.run_dir / "stats.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            too_bad = int(self.max_consec_bad.item()) >= cfg.max_bad_steps
            if done or self.cur_tick % cfg.snap == 0 or (cfg.extra_snapshots and self.cur_tick in EXTRA_SNAPSHOT_TICKS):
                self._snapshot_and_log()
            if done or stop or too_bad or self.cur_tick % cfg.dump == 0:
                path = self.save_state()
                if path is not None:
                    self.log(f"  wrote {path.name}")
            if too_bad:
                raise TrainingAborted(f"{int(self.max_consec_bad.item())} consecutive steps had non-finite gradients "
                                      f"(limit --max-bad-steps {cfg.max_bad_steps}); the last training state was written.")
            self.cur_tick += 1
            self.tick_start_nimg = self.cur_nimg
            tick_start = time.time()
            if done or stop:
                break
        if progress is not None:
            progress.close()
        wall = time.time() - start
        self.log(f"{'Stopped' if stop and not done else 'Finished'} at {self.cur_nimg / 1e3:.1f} kimg: {wall:.1f} s wall time, "
                 f"{(self.cur_nimg - start_nimg) / max(wall, 1e-9):.1f} img/s overall (evaluations and snapshots included).")
        return "stopped" if stop and not done else "done"


# ----------------------------------------------------------------------------
# Run directories and resume.


def next_run_dir(outdir: str, desc: str) -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d+)-", p.name))]
    run_dir = out / f"{max(ids, default=-1) + 1:05d}-{desc}"
    run_dir.mkdir()
    return run_dir


def find_resume_state(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        states = sorted(p.glob("training-state-*.pt"))
        if not states:
            raise ConfigError(f"--resume {p}: the directory holds no training-state-*.pt file.")
        return states[-1]
    if not p.exists():
        raise ConfigError(f"--resume {p}: no such file.")
    return p


def load_state_file(path: Path) -> dict:
    try:
        s = checkpoints.load_torch_file(path)
    except checkpoints.CheckpointError as e:
        older = sorted(path.parent.glob("training-state-*.pt"))
        older = [o for o in older if o.name < path.name]
        hint = f" The previous state is {older[-1]}." if older else ""
        raise ConfigError(f"--resume {e}.{hint}") from None
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
        raise ConfigError(f"--resume {path}: not a sid_fast training state.")
    return s


def load_label_table(cfg: TrainConfig, label_dim: int) -> np.ndarray:
    """The integer labels of --data's images, checked against the teacher; one ConfigError naming both values."""
    from sid_fast.data.dataset import DatasetError, ImageDataset

    try:
        ds = ImageDataset(cfg.data)
    except DatasetError as e:
        raise ConfigError(f"--data {e}") from None
    c, h, _ = ds.image_shape
    if (c, h) != (cfg.channels, cfg.resolution):
        raise ConfigError(f"--data {cfg.data}: images are {c}x{h}x{h}, the teacher makes {cfg.channels}x"
                          f"{cfg.resolution}x{cfg.resolution}.")
    if ds.labels_int is None:
        raise ConfigError(f"--data {cfg.data}: the dataset has no labels (dataset.json), the teacher is conditional "
                          f"with {label_dim} classes.")
    if ds.label_dim != label_dim:
        raise ConfigError(f"--data {cfg.data}: labels run to class {ds.label_dim - 1} (label_dim {ds.label_dim}), the "
                          f"teacher has label_dim {label_dim}.")
    return ds.labels_int


def prepare_fid(cfg: TrainConfig, device):
    """(reference statistics path, detector) for --metrics fid, else (None, None); refuses bad files up front."""
    if cfg.metrics != "fid":
        return None, None
    from sid_fast.metrics import load_ref_stats
    from sid_fast.metrics.inception import load_detector

    try:
        ref = checkpoints.resolve_path(cfg.data_stat)
        detector = load_detector(cfg.detector, device=device)
        load_ref_stats(ref, dim=detector.feature_dim)
    except ValueError as e:  # CheckpointError, DetectorError and bad statistics all name the file
        raise ConfigError(f"--metrics fid: {e}") from None
    return ref, detector


def run(cfg: TrainConfig, log_to_stdout=True) -> Path | None:
    """Run (or resume) a distillation; returns the run directory (rank 0)."""
    device = dist.init()
    world = dist.world_size()
    validate(cfg, world)
    resume_state = None
    if cfg.resume:
        path = find_resume_state(cfg.resume)
        resume_state = load_state_file(path)
    # Everything that can be refused is checked before the run directory is made.
    teacher, info = checkpoints.load_network_file(cfg.teacher)
    check_teacher(cfg, teacher, cfg.teacher)
    label_table = load_label_table(cfg, teacher.label_dim) if cfg.data is not None and teacher.label_dim else None
    fid = prepare_fid(cfg, device)
    run_dir = None
    if dist.rank() == 0:
        desc = cfg.desc or f"{cfg.preset}-alpha{cfg.alpha:g}-batch{cfg.batch}-gpus{world}-{cfg.precision}"
        run_dir = next_run_dir(cfg.outdir, desc)
        labels = ("none (unconditional)" if not teacher.label_dim else "uniform" if label_table is None
                  else f"label frequencies of {cfg.data}")
        with open(run_dir / "training_options.json", "w") as f:
            json.dump(dict(cfg.to_json(), world_size=world, class_labels=labels), f, indent=2)
    log = Logger(run_dir) if log_to_stdout else (lambda *_: None)
    student = (info["class_name"], info["init_kwargs"], teacher.state_dict())
    trainer = SiDTrainer(cfg, device, run_dir, log, teacher=teacher, student=student, teacher_info=info, fid=fid,
                         label_table=label_table)
    if resume_state is not None:
        trainer.load_state_dict(resume_state, cfg.resume)
        log(f"Resumed from {cfg.resume} at {trainer.cur_nimg / 1e3:.1f} kimg.")
    trainer.train()
    if isinstance(log, Logger):
        log.close()
    dist.finish()
    return run_dir




__all__ = ["SiDTrainer", "run", "TrainingAborted", "next_run_dir", "find_resume_state"]
