"""SiD on EDM2 networks: the losses weighted by the fake score's learned log-variance u(sigma) against float64
formulas (reference and fused-kernel paths), and the bundled tiny EDM2 digits teacher distilled on CPU."""

import pytest
import torch

from sid_fast import ops
from sid_fast.checkpoints import load_network_file
from sid_fast.networks.edm2 import Precond
from sid_fast.training.config import ASSETS, resolve_config
from sid_fast.training.run import build_trainer

EDM2_TEACHER = ASSETS / "digits_edm2_teacher.pt"


def _inputs(n=4, shape=(3, 5, 7), seed=0, nan_row=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    D = y + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    sigma = (torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) * 1.0 - 0.4).exp()
    u = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    if nan_row is not None:
        u[nan_row] = float("nan")
    return D, y, sigma, u


def _rows(ok, t):
    return torch.where(ok.reshape(-1, 1, 1, 1), t, 0)


def _fake_loss64(D, y, sigma, u, ok):
    """sum over finite rows of lambda / e^u (D - y)^2 + u (inputs of dropped rows zeroed, so no NaN reaches a grad)."""
    D, y, u = _rows(ok, D), _rows(ok, y), _rows(ok, u)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return _rows(ok, lam / torch.exp(u) * (D - y) ** 2 + u).sum()


def _gen_loss64(x_g, y_real, y_fake, u, alpha, ok):
    x_g, y_real, y_fake, u = _rows(ok, x_g), _rows(ok, y_real), _rows(ok, y_fake), _rows(ok, u)
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5).detach()
    per = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w / torch.exp(u)
    return _rows(ok, per).sum()


@pytest.mark.parametrize("kernels", ["none", "edm_loss"])
@pytest.mark.parametrize("nan_row", [None, 2])
def test_fake_score_loss_with_logvar(kernels, nan_row):
    D64, y64, sigma, u64 = _inputs(nan_row=nan_row)
    ok = torch.ones(4, dtype=torch.bool) if nan_row is None else torch.arange(4) != nan_row
    D, u = D64.float().requires_grad_(True), u64.float().requires_grad_(True)
    with ops.kernels(kernels):
        total, got_ok = ops.fake_score_loss_sum(D, y64.float(), sigma.float(), u=u)
    assert got_ok.tolist() == ok.tolist()
    Dr, ur = D64.clone().requires_grad_(True), u64.clone().requires_grad_(True)
    ref = _fake_loss64(Dr, y64, sigma, ur, ok)
    # fp32 inputs against float64: 420 terms of magnitude <= ~50 summed in fp32, ~1e-6 relative; 1e-5 leaves room for
    # any summation order and is far below a missing e^u (a factor e^{+-1}) or a missing +u term (O(1) per element).
    assert abs(total.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-4
    gD, gu = torch.autograd.grad(total, (D, u))
    rD, ru = torch.autograd.grad(ref, (Dr, ur))
    for a, b in ((gD, rD), (gu, ru)):
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6


@pytest.mark.parametrize("kernels", ["none", "sid_loss"])
@pytest.mark.parametrize("nan_row", [None, 1])
def test_generator_loss_divided_by_exp_logvar(kernels, nan_row):
    x64, yr64, _, u64 = _inputs(seed=3, nan_row=nan_row)
    yf64 = yr64 + 0.2 * torch.randn(yr64.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ok = torch.ones(4, dtype=torch.bool) if nan_row is None else torch.arange(4) != nan_row
    x = x64.float().requires_grad_(True)
    with ops.kernels(kernels):
        total, got_ok = ops.sid_generator_loss_sum(x, yr64.float(), yf64.float(), 1.2, u=u64.float())
    assert got_ok.tolist() == ok.tolist()
    xr = x64.clone().requires_grad_(True)
    ref = _gen_loss64(xr, yr64, yf64, u64, 1.2, ok)
    assert abs(total.item() - ref.item()) <= 1e-5 * ref.abs().item() + 1e-5
    (g,), (r,) = torch.autograd.grad(total, (x,)), torch.autograd.grad(ref, (xr,))
    assert (g.double() - r).abs().max() <= 1e-5 * r.abs().max() + 1e-7


@pytest.mark.slow
def test_sid_distills_the_edm2_digits_teacher(tmp_path, monkeypatch):
    """The bundled EDM2-architecture digits teacher through the trainer: G without the log-variance head, the fake
    score with it (P_mean/P_std -0.4/1.0), forced weight normalisation once per phase, FD-digits of G_ema falling;
    the snapshot loads as a generator."""
    from sid_fast.families import edm2 as denoiser
    from sid_fast.families.edm2 import EDM2Denoiser

    teacher, _ = load_network_file(EDM2_TEACHER)
    assert isinstance(teacher, Precond) and teacher.logvar_linear is not None
    cfg = resolve_config(
        "digits-edm2", dict(duration=0.004, tick=4, snap=1, dump=100, metric_num=1000, outdir=str(tmp_path))
    )
    trainer = build_trainer(cfg, torch.device("cpu"), run_dir=tmp_path, log=lambda *_: None)
    den = trainer.denoiser
    assert isinstance(den, EDM2Denoiser) and den.logvar and (den.P_mean, den.P_std) == (-0.4, 1.0)
    assert trainer.G.logvar_linear is None and trainer.fake.logvar_linear is not None
    forced = []
    real_force = denoiser.edm2.force_weight_norm_
    monkeypatch.setattr(denoiser.edm2, "force_weight_norm_", lambda net: (forced.append(net), real_force(net)))
    trainer.train()
    iterations = trainer.cur_nimg // cfg.batch
    assert [id(n) for n in forced] == [id(trainer.fake), id(trainer.G)] * iterations
    fd = [r["fd_digits"] for r in trainer.metrics_history]  # after the first step (0.256 kimg) and at 4.1 kimg
    # After one step G is still the teacher at sigma_init (FD ~370); distillation divides that by ~10 in 4 kimg
    # (measured: README, digits-edm2), a wrong u-weighting or a lost normalisation does not. 5x leaves room for thread
    # counts and CPUs.
    assert len(fd) == 2 and fd[-1] < fd[0] / 5, fd
    g, ginfo = load_network_file(sorted(tmp_path.glob("network-snapshot-*"))[-1])
    assert isinstance(g, Precond) and g.logvar_linear is None and ginfo["meta"]["kind"] == "generator"


@pytest.mark.parametrize(
    "size,batch_gpu,dropout,duration",
    [
        ("xs", 64, 0.0, 200),
        ("s", 64, 0.0, 200),
        ("m", 32, 0.1, 200),
        ("l", 32, 0.1, 200),
        ("xl", 16, 0.1, 200),
        ("xxl", 2, 0.1, 100),
    ],
)
def test_edm2_presets_carry_the_official_values(size, batch_gpu, dropout, duration):
    # official sida branch run_sid_edm2.sh and sida_edm2_train.py's size table
    cfg = resolve_config(f"edm2-img512-{size}", dict(teacher="t.pkl", data_stat="img512.pkl"))
    assert (cfg.batch, cfg.batch_gpu, cfg.lr, cfg.glr, cfg.alpha, cfg.tmax, cfg.init_sigma) == (
        2048,
        batch_gpu,
        5e-5,
        5e-5,
        1.0,
        800,
        2.5,
    )
    assert (cfg.precision, cfg.dropout, cfg.ema, cfg.duration, cfg.augment, cfg.lsg, cfg.ls) == (
        "fp16",
        dropout,
        2.0,
        duration,
        0.0,
        100.0,
        1.0,
    )
    assert (cfg.resolution, cfg.channels, cfg.label_dim, cfg.cond, cfg.metrics) == (64, 4, 1000, True, "fid,fd-dinov2")
    assert cfg.official_teacher.endswith(
        f"posthoc-reconstructions/edm2-img512-{size}-"
        + {
            "xs": "2147483-0.135",
            "s": "2147483-0.130",
            "m": "2147483-0.100",
            "l": "1879048-0.085",
            "xl": "1342177-0.085",
            "xxl": "0939524-0.070",
        }[size]
        + ".pkl"
    )


# A tiny conditional latent-space EDM2 network: 4 channels at 8x8 (latents of 64x64 images), 3 classes.
LATENT_TINY = dict(
    img_resolution=8,
    img_channels=4,
    label_dim=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
    use_fp16=False,
    logvar_channels=8,
)


def _latent_teacher(tmp_path):
    from sid_fast.checkpoints import save_network

    torch.manual_seed(0)
    path = tmp_path / "latent_teacher.pt"
    save_network(path, Precond(**LATENT_TINY), LATENT_TINY, kind="teacher")
    return path


def test_labels_only_data_and_vae_refusals(tmp_path):
    import json

    from sid_fast.training.config import ConfigError

    teacher = _latent_teacher(tmp_path)
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": [[f"img{i}.png", c] for i, c in enumerate([0, 0, 0, 2])]}))
    over = dict(
        teacher=str(teacher),
        resolution=8,
        channels=4,
        label_dim=3,
        cond=True,
        metrics="none",
        data=str(labels),
        batch=4,
        batch_gpu=4,
    )
    trainer = build_trainer(resolve_config("digits-edm2", over), torch.device("cpu"), log=lambda *_: None)
    assert sorted(trainer.family.label_table.tolist()) == [0, 0, 0, 2]  # the file's label frequencies
    trainer.step()
    with pytest.raises(ConfigError, match="EDM2's VAE latents: give --vae"):
        build_trainer(
            resolve_config("digits-edm2", dict(over, metrics="fid", data_stat="img512.pkl")),
            torch.device("cpu"),
            log=lambda *_: None,
        )
    with pytest.raises(ConfigError, match="labels only; SiDA needs real images"):
        build_trainer(resolve_config("digits-sida", dict(data=str(labels))), torch.device("cpu"), log=lambda *_: None)


def test_sample_cli_decodes_latents_with_the_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from click.testing import CliRunner

    from sid_fast.checkpoints import save_network
    from sid_fast.latents import SD_VAE_FT_MSE_CONFIG
    from sid_fast.sample import main

    torch.manual_seed(1)
    diffusers.AutoencoderKL(**dict(SD_VAE_FT_MSE_CONFIG, block_out_channels=[32] * 4)).save_pretrained(tmp_path / "vae")
    gen = tmp_path / "gen.pt"
    save_network(
        gen,
        Precond(**dict(LATENT_TINY, logvar_channels=0)),
        dict(LATENT_TINY, logvar_channels=0),
        kind="generator",
        sigma_init=2.5,
    )
    out = CliRunner().invoke(
        main,
        [
            "--network",
            str(gen),
            "--outdir",
            str(tmp_path / "out"),
            "--seeds",
            "0-2",
            "--vae",
            str(tmp_path / "vae"),
            "--grid",
            str(tmp_path / "grid.png"),
        ],
    )
    assert out.exit_code == 0, out.output
    import PIL.Image

    assert PIL.Image.open(tmp_path / "out" / "000002.png").size == (64, 64)  # 8x8 latents -> 64x64 pixels
    out = CliRunner().invoke(main, ["--network", str(gen), "--outdir", str(tmp_path / "out2")])
    assert out.exit_code != 0 and "give --vae" in out.output


def test_fid_of_decoded_latents(tmp_path):
    """fid calc --vae: a latent generator's samples decoded by the VAE, against statistics of the same images written
    as PNGs by sample --vae (same seeds): FID ~ 0; without --vae the 4-channel network is refused."""
    diffusers = pytest.importorskip("diffusers")
    from click.testing import CliRunner
    from support.fid_helpers import save_torchscript_detector

    from sid_fast import fid
    from sid_fast.checkpoints import save_network
    from sid_fast.latents import SD_VAE_FT_MSE_CONFIG
    from sid_fast.sample import main as sample_main

    torch.manual_seed(2)
    diffusers.AutoencoderKL(**dict(SD_VAE_FT_MSE_CONFIG, block_out_channels=[32] * 4)).save_pretrained(tmp_path / "vae")
    gen = tmp_path / "gen.pt"
    kw = dict(LATENT_TINY, logvar_channels=0)
    save_network(gen, Precond(**kw), kw, kind="generator", sigma_init=2.5)
    det = str(save_torchscript_detector(tmp_path / "det.pt", dim=16))
    r = CliRunner().invoke(
        sample_main,
        ["--network", str(gen), "--outdir", str(tmp_path / "png"), "--seeds", "0-23", "--vae", str(tmp_path / "vae")],
    )
    assert r.exit_code == 0, r.output
    ref = str(tmp_path / "ref.npz")
    r = CliRunner().invoke(
        fid.main, ["ref", "--data", str(tmp_path / "png"), "--dest", ref, "--detector", det, "--workers", "0"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        fid.main,
        ["calc", "--network", str(gen), "--ref", ref, "--num", "24", "--vae", str(tmp_path / "vae"), "--detector", det],
    )
    assert r.exit_code == 0, r.output
    import json

    assert abs(json.loads(r.stdout.strip().splitlines()[-1])["fid"]) < 1e-3
    r = CliRunner().invoke(fid.main, ["calc", "--network", str(gen), "--ref", ref, "--num", "24", "--detector", det])
    assert r.exit_code != 0 and "give --vae" in r.output


def test_per_sample_division_by_exp_u():
    from sid_fast.training.sida import per_exp_u

    rows = torch.tensor([2.0, 3.0, float("nan"), 5.0]).reshape(4, 1, 1, 1)
    u = torch.tensor([0.0, 1.0, 0.5, float("nan")]).reshape(4, 1, 1, 1)
    ok = torch.tensor([True, True, False, False])
    out = per_exp_u(rows, u, ok)
    assert torch.allclose(out.flatten(), torch.tensor([2.0, 3.0 / torch.e, 0.0, 0.0]))


@pytest.mark.parametrize("logvar", [True, False])
def test_sida_on_the_edm2_digits_teacher(logvar, monkeypatch):
    """SiDA with an EDM2 teacher (official sida_loss_edm2.py): the discriminator and GAN terms divided by e^u, the
    fake score's u trained by its loss (it moves), no gradient clipping; --no-return-logvar builds the fake score
    without the head; forced normalisation per --force-normalization."""
    from sid_fast.families import edm2 as denoiser

    over = dict(
        method="sida",
        data="digits",
        batch=16,
        batch_gpu=8,
        metrics="none",
        sida_g_start_kimg=0.0,
        sida_gan_start_kimg=0.0,
        return_logvar=logvar,
        force_normalization=logvar,
    )
    trainer = build_trainer(resolve_config("digits-edm2", over), torch.device("cpu"), log=lambda *_: None)
    assert trainer.denoiser.logvar == logvar and (trainer.fake.logvar_linear is not None) == logvar
    forced = []
    monkeypatch.setattr(denoiser.edm2, "force_weight_norm_", lambda net: forced.append(net))
    clipped = []
    real_apply = trainer._apply_gradients
    monkeypatch.setattr(
        trainer,
        "_apply_gradients",
        lambda net, opt, slot, clip_value=None: (clipped.append(clip_value), real_apply(net, opt, slot, clip_value))[1],
    )
    head = trainer.fake.logvar_linear.weight.detach().clone() if logvar else None
    G0 = trainer.G.unet.out_conv.weight.detach().clone()
    for _ in range(2):
        trainer.step()
    stats = trainer.stats.reduce()
    for key in ("loss_fake", "loss_D", "loss_G", "loss_G_gan"):
        assert torch.isfinite(torch.tensor(float(stats[key]))), key
    # Two fake-score phases and one generator phase (the official schedule steps G once more than 0 images are seen).
    assert clipped == [None, None, None]  # EDM2: no clipping, in either phase
    assert len(forced) == (3 if logvar else 0)
    assert not torch.equal(trainer.G.unet.out_conv.weight, G0)
    if logvar:
        assert not torch.equal(trainer.fake.logvar_linear.weight, head)  # u is trained by the fake-score loss


def test_sida_reads_real_latents(tmp_path):
    """SiDA on a latent teacher with a latent dataset: each real sample is mean + eps * std of its stored latents,
    scaled as EDM2, with eps from the micro-batch's own generator (the same on resume and on any process count)."""
    diffusers = pytest.importorskip("diffusers")
    import numpy as np
    import PIL.Image

    from sid_fast.checkpoints import save_network
    from sid_fast.latents import SD_VAE_FT_MSE_CONFIG, LatentDataset, StabilityVAE, encode_dataset, encode_latents
    from sid_fast.training.sida import REAL_LATENTS

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    torch.manual_seed(3)
    vae = StabilityVAE(diffusers.AutoencoderKL(**dict(SD_VAE_FT_MSE_CONFIG, block_out_channels=[32] * 4)))
    encode_dataset(tmp_path / "imgs", tmp_path / "lat", vae, log=None)
    kw = dict(LATENT_TINY, label_dim=0)
    torch.manual_seed(0)
    save_network(tmp_path / "t.pt", Precond(**kw), kw, kind="teacher")
    over = dict(
        teacher=str(tmp_path / "t.pt"),
        method="sida",
        data=str(tmp_path / "lat"),
        resolution=8,
        channels=4,
        label_dim=0,
        cond=False,
        metrics="none",
        batch=4,
        batch_gpu=4,
    )
    tr = build_trainer(resolve_config("digits-edm2", over), torch.device("cpu"), log=lambda *_: None)
    x, _ = tr._real_batch(0)
    ds = LatentDataset(tmp_path / "lat")
    raw = torch.stack([ds[tr.real.index(k)][0] for k in range(4)])
    torch.testing.assert_close(x, encode_latents(raw, tr.micro_batch_rng(REAL_LATENTS, 0)), rtol=0, atol=0)
    tr.step()
    assert torch.isfinite(tr.stats.values).all()


def test_edm2_bf16_gradients_in_the_arena_equal_per_parameter_cleaning(monkeypatch):
    """EDM2's networks have no grouped casts: on the bf16 path their gradients are handed the arena's zeroed slots as
    backward first reaches each parameter (autograd accumulates into them: 0 + g = g exactly; no slot exists when the
    phase begins, so the phase's forward does not hold the whole gradient) and are cleaned as a few buffers. Two
    steps equal, bit for bit, the per-parameter cleaning they replace; a NaN in a gradient is still counted and
    cleaned."""
    from sid_fast import casts
    from sid_fast.training.parallel import storage_key

    over = dict(precision="bf16", optimizer="fused", batch=8, batch_gpu=4, metrics="none")
    in_arena, at_start = [], []
    preassign_arena = casts.preassign_arena

    def recorded():
        preassign_arena()
        at_start.append(len(casts.current_arena_buffers()))

    def two_steps(preassign: bool):
        with monkeypatch.context() as m:
            m.setattr(casts, "preassign_arena", recorded if preassign else lambda: None)
            tr = build_trainer(resolve_config("digits-edm2", over), torch.device("cpu"), log=lambda *_: None)
            tr.step()
            tr.stats.reduce()  # reset
            clean = tr.par.clean_grads

            def planted(params, device):  # a NaN in one gradient element of the next fake-score phase
                params = list(params)
                params[0].grad.view(-1)[0] = float("nan")
                arena = {storage_key(b) for b in casts.current_arena_buffers()}
                in_arena.append(all(storage_key(p.grad) in arena for p in params))
                return clean(params, device)

            m.setattr(tr.par, "clean_grads", planted)
            tr.fake_score_phase()
            return {k: v.clone() for k, v in tr.fake.state_dict().items()}, tr.stats.reduce()["bad_steps_fake"]

    (a, bad_a), (b, bad_b) = two_steps(True), two_steps(False)
    assert in_arena == [True, False]  # every gradient in the arena's buffers with the slots handed over, else none
    assert at_start == [0, 0, 0]  # both phases of a step and the third: no slot allocated before backward
    assert bad_a == bad_b == 1
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("precision", ["bf16"])
def test_the_folded_teacher_gives_the_same_steps_with_fewer_ops(precision):
    """EDM2's frozen teacher on the fast path folds each gain-1 layer's normalised weight once (MPConv): two steps equal
    bit for bit to steps with folding off, and the teacher's forward dispatches fewer ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sid_fast.networks.edm2 import MPConv

    over = dict(precision=precision, batch=8, batch_gpu=8, metrics="none")

    def run(fold):
        torch.manual_seed(0)
        tr = build_trainer(resolve_config("digits-edm2", over), torch.device("cpu"), log=lambda *_: None)
        layers = [m for m in tr.teacher.modules() if isinstance(m, MPConv)]
        assert all(m.fold_when_frozen for m in layers)
        for m in layers:
            m.fold_when_frozen = fold
        for _ in range(2):
            tr.step()
        return tr, layers

    folded, layers = run(True)
    plain, _ = run(False)
    assert sum(m._folded for m in layers) >= len(layers) // 2  # the gain-1 layers (the rest take a learned gain)
    for name in ("G", "fake", "G_ema"):
        a, b = getattr(folded, name).state_dict(), getattr(plain, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    n = [0]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n[0] += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for tr in (folded, plain):
        z, cond = tr.draw_z_cond(tr.micro_batch_rng(1, 0))
        level = tr.denoiser.generator_level(z.shape[0], tr.micro_batch_rng(1, 0))
        n[0] = 0
        with torch.no_grad(), _Count():
            tr.denoiser.teacher(tr.calls.teacher, tr.generate(tr.calls.G_eval, z, cond).detach(), level, cond)
        counts.append(n[0])
    assert counts[0] < counts[1], counts
