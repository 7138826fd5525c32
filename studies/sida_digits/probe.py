"""Why SiDA does or does not help on the digits: probes of runs' saved states, the discriminator alone, a dedicated
classifier, and the metric's own noise.

    python -m studies.sida_digits.probe RUN_DIR [RUN_DIR ...] --out sida_probe.jsonl

For every training-state-*.pt of each run (SiD or SiDA, rebuilt from its training_options.json; `--states`) it
measures, on `--n` draws with fixed seeds from the training distributions:

- the discriminator (the fake score's encoder logits, official `return_flag='encoder'`) on real and generated images
  sharing sigma and noise, per band of the fake-score phase's sigma ~ EDM lognormal: the mean logits, the fraction
  classified right (logit > 0 real, < 0 fake), the area under the ROC curve (0.5 = chance, blind to the logits'
  offset) and the unweighted BCE. A SiD run's fake score was never trained to discriminate: its figures are the
  control.
- the generator gradient of each term of SiDA's generator loss as training weighs it after the warm-ups (0.5 lsg SiD,
  0.5 lsg_gan C*H*W GAN, per image): L2 norms over G's parameters, their ratio and their cosine.

Other modes (each run directory):
- `--train-d STEPS`: SiDA's fake-score phase alone, from the teacher, against the fixed generator of the run's last
  state, probing the discriminator and the two gradients every `--every` steps: how fast it learns when the
  generator does not move, and how much larger the GAN term's gradient becomes as it does.
- `--separability 200,600,...`: a dedicated CNN trained for that many steps to tell real digits from the last
  snapshot's, its held-out AUC at noise levels 0, 0.3 and 1: how separable the generated digits are at all.
- `--metric-noise`: FD-digits of each network-snapshot-* on `--noise-sets` disjoint sets of `metric_num` samples
  (training evaluates one fixed set): the metric's sampling noise, against the swings between evaluations of a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import types
from pathlib import Path

import click
import torch

from bench.common import command, environment, write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"

SIGMA_BANDS = (0.0, 0.1, 0.5, 2.0, 10.0, math.inf)


def load_trainer(run_dir: Path, state_path: Path | None):
    from sid_fast.training.config import TrainConfig
    from sid_fast.training.run import build_trainer, load_state_file

    opts = json.loads((run_dir / "training_options.json").read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in opts.items() if k in names})
    cfg.method = "sida"  # the probe needs the real data and the discriminator branch, whatever the run trained
    cfg.data = cfg.data or "digits"
    cfg.metrics = "none"
    trainer = build_trainer(cfg, torch.device("cpu"), log=lambda *_: None)
    if state_path is not None:
        trainer.load_state_dict(load_state_file(state_path), state_path)
    return opts, trainer


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores `pos` (real) against `neg` (fake): the probability that a real image's
    logit exceeds a fake one's (ties count half); 0.5 = chance, whatever the logits' offset."""
    d = pos.double().reshape(-1, 1) - neg.double().reshape(1, -1)
    return float((d > 0).double().mean() + 0.5 * (d == 0).double().mean())


def _onehot(trainer, idx):
    return None if not trainer.G.label_dim else torch.eye(trainer.G.label_dim)[idx]


@torch.no_grad()
def probe_discriminator(trainer, n: int, seed: int) -> list[dict]:
    """Per sigma band: the discriminator on n real images (the run's data, its labels) and n generated ones with the
    same labels, sigma and noise, sigma from the fake-score phase's distribution (no augmentation)."""
    g = torch.Generator().manual_seed(seed)
    trainer.G.eval()
    trainer.fake.eval()
    items = [trainer.real[k] for k in range(seed * n, seed * n + n)]
    real = torch.stack([im for im, _, _ in items]).float() / 127.5 - 1
    labels = _onehot(trainer, torch.tensor([max(lab, 0) for _, lab, _ in items]))
    z = torch.randn(real.shape, generator=g)
    x_g = trainer.generate(trainer.calls.G_eval, z, labels)
    den = trainer.denoiser
    sigma = den.fake_level(n, g)
    noise = torch.randn(real.shape, generator=g) * sigma
    aug = den.aug_zeros(n)
    lr = den.discriminator_logits(trainer.fake, real + noise, sigma, labels, aug).float().flatten(1).mean(1)
    out = den.fake(trainer.fake, x_g + noise, sigma, labels, aug, return_flag="encoder_decoder")
    lf = out.logits.float().flatten(1).mean(1)
    s = sigma.flatten()
    rows = []
    for lo, hi in zip(SIGMA_BANDS[:-1], SIGMA_BANDS[1:]):
        m = (s >= lo) & (s < hi)
        if not m.any():
            continue
        r, f = lr[m], lf[m]
        bce = 0.5 * (torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean())
        rows.append(
            dict(
                sigma_lo=lo,
                sigma_hi=hi if hi < math.inf else None,
                count=int(m.sum()),
                logit_real=float(r.mean()),
                logit_fake=float(f.mean()),
                accuracy=float(0.5 * ((r > 0).float().mean() + (f < 0).float().mean())),
                auc=auc(r, f),
                bce=float(bce),
            )
        )
    return rows


def probe_gradients(trainer, n: int, seed: int, draws=None) -> dict:
    """Gradients over G's parameters of the two generator-loss terms, each weighed as the generator phase weighs it
    after the GAN warm-up (0.5 lsg SiD, 0.5 lsg_gan C*H*W GAN, per image). `draws`: (z, labels, sigma, eps) of the
    trainer's own micro-batch (the test compares with its generator phase); otherwise n fresh ones."""
    from sid_fast.losses import sample_generator_sigma, sid_weight
    from sid_fast.training.sida import sida_generator_terms

    cfg = trainer.cfg
    G, fake = trainer.G, trainer.fake
    if draws is None:
        g = torch.Generator().manual_seed(seed + 1)
        z = torch.randn([n, cfg.channels, cfg.resolution, cfg.resolution], generator=g)
        labels = _onehot(trainer, torch.randint(max(G.label_dim, 1), [n], generator=g))
        sigma = sample_generator_sigma(n, cfg.tmax, "cpu", generator=g)
        eps = torch.randn(z.shape, generator=g)
    else:
        z, labels, sigma, eps = draws
        n = z.shape[0]
    G.train().requires_grad_(True)
    fake.eval().requires_grad_(False)
    x_g = trainer.generate(trainer.calls.G_train, z, labels)
    x_t = x_g + sigma * eps
    den = trainer.denoiser
    y_real = den.teacher(trainer.teacher, x_t, sigma, labels)  # gradients reach x_g through both networks (as SiD's)
    out = den.fake(fake, x_t, sigma, labels, return_flag="encoder_decoder")
    loss_sid, loss_gan, _ = sida_generator_terms(x_g, y_real, out, cfg.alpha, edm2_rule=False)
    params = [p for p in G.parameters() if p.requires_grad]
    terms = {"sid": 0.5 * cfg.lsg * loss_sid / n, "gan": 0.5 * cfg.lsg_gan * loss_gan / n}
    grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in terms.items()}
    flat = {
        k: torch.cat([(torch.zeros_like(p) if x is None else x).flatten() for x, p in zip(v, params)])
        for k, v in grads.items()
    }
    ns, ng = flat["sid"].norm(), flat["gan"].norm()
    G.eval().requires_grad_(False)
    return dict(
        grad_sid=float(ns),
        grad_gan=float(ng),
        ratio_gan_sid=float(ng / ns),
        cosine=float(flat["sid"] @ flat["gan"] / (ns * ng)),
        lsg=cfg.lsg,
        lsg_gan=cfg.lsg_gan,
        logits_mean=float(out.logits.detach().float().mean()),
        w_mean=float(sid_weight(x_g, y_real).mean()),
        grads={k: [None if x is None else x.detach() for x in v] for k, v in grads.items()},
    )


def discriminator_learning(run_dir: Path, steps: int, every: int, n: int, seed: int, lsd: float | None):
    """The fake-score phase of SiDA alone, from the teacher, against the fixed generator of the run's last training
    state: how the discriminator's AUC, and with it the GAN term's share of the generator's gradient, grows with its
    optimizer steps when the generator does not move. The fake score starts as the teacher, so the SiD term's gradient
    starts near zero here: compare the GAN gradient's norm, not the ratio, with the training runs'."""
    from sid_fast.training.run import load_state_file

    opts, tr = load_trainer(run_dir, None)
    tr.G.load_state_dict(load_state_file(sorted(run_dir.glob("training-state-*.pt"))[-1])["G"])
    if lsd is not None:
        tr.cfg.lsd = lsd
    rows = []
    for k in range(steps + 1):
        if k % every == 0:
            d = probe_discriminator(tr, n, seed)
            gr = probe_gradients(tr, n, seed)
            gr.pop("grads")
            rows.append(dict(step=k, discriminator=d, gradients=gr))
            print(
                f"{run_dir.name} D alone, step {k:4d}: AUC by sigma band "
                + " ".join(f"{r['auc']:.2f}" for r in d)
                + f"  |grad gan|/|grad sid| {gr['ratio_gan_sid']:.2e}",
                flush=True,
            )
        if k < steps:
            tr.fake_score_phase()
            tr.cur_nimg += tr.cfg.batch
    return opts, rows


def snapshot_samples(snapshot: Path, seeds) -> torch.Tensor:
    """One-step samples in [-1, 1] of a generator snapshot for the seeds (sid_fast.sampling.generate, 256 at a time)."""
    from sid_fast.checkpoints import load_network_file
    from sid_fast.sampling import generate

    net, info = load_network_file(snapshot)
    seeds = list(seeds)
    return torch.cat([generate(net, info, seeds[i : i + 256], "cpu") for i in range(0, len(seeds), 256)])


def separability(
    snapshot: Path, sigmas=(0.0, 0.3, 1.0), steps: int = 600, seed: int = 0, round_fakes: bool = True
) -> list[dict]:
    """Can a dedicated discriminator tell the generator's digits from real ones? For each noise level, a small CNN
    (FD-digits' feature network's shape, fresh weights, a binary head) trained on 1,200 real and 1,200 generated
    images with that noise added to both, scored by its AUC on the 597 held-out real digits and 597 new fakes. The
    generated digits are first rounded to the data's grey levels (17), so that quantisation is not the cue
    (`round_fakes=False`: not rounded, only clamped to [-1, 1])."""
    from sid_fast.data.digits import digits_tensor
    from sid_fast.metrics.digits import DigitsFeatureNet

    real = digits_tensor()[0]
    g = torch.Generator().manual_seed(seed)
    real = real[torch.randperm(len(real), generator=g)]
    n_train, n_test = 1200, len(real) - 1200
    fake = snapshot_samples(snapshot, range(30_000_000, 30_000_000 + len(real)))
    if round_fakes:
        levels = real.unique()
        fake = levels[(fake.reshape(-1, 1) - levels.reshape(1, -1)).abs().argmin(1)].reshape(fake.shape)
    else:
        fake = fake.clamp(-1, 1)
    out = []
    for sigma in sigmas:
        torch.manual_seed(seed)
        clf = DigitsFeatureNet(feature_dim=64)
        clf.head = torch.nn.Linear(64, 1)
        opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
        x = torch.cat([real[:n_train], fake[:n_train]])
        y = torch.cat([torch.ones(n_train), torch.zeros(n_train)])
        for _ in range(steps):
            idx = torch.randint(len(x), [128], generator=g)
            xb = x[idx] + sigma * torch.randn(x[idx].shape, generator=g)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(clf(xb).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            r = clf(real[n_train:] + sigma * torch.randn(real[n_train:].shape, generator=g)).squeeze(1)
            f = clf(fake[n_train : n_train + n_test] + sigma * torch.randn([n_test, *real.shape[1:]], generator=g))
        out.append(dict(sigma=sigma, auc=auc(r, f.squeeze(1)), steps=steps, n_train=n_train, n_test=n_test))
    return out


def metric_noise(snapshot: Path, metric_num: int, sets: int) -> list[float]:
    from sid_fast.metrics.digits import fd_digits

    # disjoint seed sets, none the training run's own (10,000,000 + i)
    return [
        fd_digits(snapshot_samples(snapshot, range(20_000_000 + k * metric_num, 20_000_000 + (k + 1) * metric_num)))
        for k in range(sets)
    ]


def _probe_d_alone(rd, a, env) -> list[dict]:
    """--train-d: the discriminator trained alone against the run's last generator."""
    opts, rows = discriminator_learning(rd, a.train_d, a.every, a.n, a.seed, a.lsd)
    return [
        dict(
            bench="sida_probe_d_alone",
            run=rd.name,
            method=opts.get("method", "sid"),
            seed=opts["seed"],
            lsd=a.lsd if a.lsd is not None else opts.get("lsd"),
            lr=opts["lr"],
            batch=opts["batch"],
            curve=rows,
            **env,
        )
    ]


def _probe_states(rd, a, env) -> list[dict]:
    """The discriminator and the two generator gradients at the run's training states."""
    recs = []
    states = sorted(rd.glob("training-state-*.pt"))
    states = {"all": states, "last": states[-1:], "none": []}[a.states]
    for sp in states:
        opts, tr = load_trainer(rd, sp)
        rec = dict(
            bench="sida_probe",
            run=rd.name,
            method=opts.get("method", "sid"),
            seed=opts["seed"],
            lsg_gan=opts.get("lsg_gan"),
            kimg=tr.cur_nimg / 1e3,
            discriminator=probe_discriminator(tr, a.n, a.seed),
            gradients=probe_gradients(tr, a.n, a.seed),
        )
        rec["gradients"].pop("grads")
        d, gr = rec["discriminator"], rec["gradients"]
        print(
            f"{rd.name} {rec['kimg']:6.1f} kimg  D AUC by sigma band "
            + " ".join(f"{r['auc']:.2f}" for r in d)
            + f"  |grad gan|/|grad sid| {gr['ratio_gan_sid']:.2e} cos {gr['cosine']:+.3f}",
            flush=True,
        )
        recs.append(dict(rec, **env))
    return recs


def _probe_separability(rd, a, env) -> list[dict]:
    """--separability: a dedicated CNN's held-out AUC on real vs the last snapshot's digits."""
    recs = []
    opts = json.loads((rd / "training_options.json").read_text())
    snap = sorted(rd.glob("network-snapshot-*"))[-1]
    for steps in map(int, a.separability.split(",")):
        rows = separability(snap, steps=steps, seed=a.seed, round_fakes=not a.no_round)
        recs.append(
            dict(
                bench="sida_separability",
                run=rd.name,
                method=opts.get("method", "sid"),
                seed=opts["seed"],
                snapshot=snap.name,
                steps=steps,
                round_fakes=not a.no_round,
                levels=rows,
                **env,
            )
        )
        print(
            f"{rd.name} {snap.name}: a dedicated CNN's held-out AUC after {steps} steps at sigma "
            + ", ".join(f"{r['sigma']:g}: {r['auc']:.3f}" for r in rows),
            flush=True,
        )
    return recs


def _probe_metric_noise(rd, a, env) -> list[dict]:
    """--metric-noise: FD-digits of each snapshot on disjoint sample sets."""
    recs = []
    opts = json.loads((rd / "training_options.json").read_text())
    curve = [json.loads(x) for x in (rd / "metric-fd_digits.jsonl").read_text().splitlines() if x.strip()]
    for snap in sorted(rd.glob("network-snapshot-*")):
        kimg = int(snap.stem.rsplit("-", 1)[1])
        fds = metric_noise(snap, opts["metric_num"], a.noise_sets)
        own = [r["fd_digits"] for r in curve if r.get("snapshot") == snap.name]
        rec = dict(
            bench="sida_metric_noise",
            run=rd.name,
            method=opts.get("method", "sid"),
            seed=opts["seed"],
            kimg=kimg,
            metric_num=opts["metric_num"],
            fd_digits_sets=fds,
            mean=statistics.fmean(fds),
            stdev=statistics.stdev(fds) if len(fds) > 1 else 0.0,
            fd_digits_run=own[0] if own else None,
        )
        print(
            f"{rd.name} snapshot {kimg:3d} kimg  FD-digits over {len(fds)} sample sets: "
            f"{rec['mean']:.2f} +- {rec['stdev']:.2f} (the run's own: {rec['fd_digits_run']})",
            flush=True,
        )
        recs.append(dict(rec, **env))
    return recs


@command(__doc__)
@click.argument("runs", nargs=-1, required=True)
@click.option("--n", type=int, default=1024, show_default=True, help="draws per probe")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--states",
    default="all",
    show_default=True,
    type=click.Choice(["all", "last", "none"]),
    help="which training states to probe ('none': only --separability or --metric-noise)",
)
@click.option("--metric-noise", "metric_noise", is_flag=True)
@click.option("--noise-sets", "noise_sets", type=int, default=5, show_default=True)
@click.option(
    "--separability",
    default="",
    metavar="STEPS,...",
    help="also: a dedicated CNN's held-out AUC on real vs the last snapshot's digits, per noise level "
    "(0, 0.3, 1), after each of these numbers of training steps (e.g. 200,600,2000,6000)",
)
@click.option(
    "--no-round",
    "no_round",
    is_flag=True,
    help="with --separability: do not round the generated digits to the data's grey levels",
)
@click.option(
    "--train-d",
    "train_d",
    type=int,
    default=0,
    metavar="STEPS",
    help="instead: train the discriminator alone for STEPS steps against each run's last generator",
)
@click.option("--every", type=int, default=25, show_default=True, help="with --train-d: probe every this many steps")
@click.option("--lsd", type=float, help="with --train-d: the discriminator's weight (default: the run's)")
@click.option("--out", default="sida_probe.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    torch.manual_seed(a.seed)
    env = environment()
    recs = []
    for rd in map(Path, a.runs):
        if a.train_d:
            recs += _probe_d_alone(rd, a, env)
            continue
        recs += _probe_states(rd, a, env)
        if a.separability:
            recs += _probe_separability(rd, a, env)
        if a.metric_noise:
            recs += _probe_metric_noise(rd, a, env)
    path = write_jsonl(recs, a.out, results=RESULTS)
    print(f"wrote {len(recs)} records to {path}")


if __name__ == "__main__":
    main()
