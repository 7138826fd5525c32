"""SiDA's parts: the fake score's discriminator logits, the loss terms against float64 formulas, the schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sid_fast.losses import (
    bce_mean_rows,
    edm_weight,
    sida_discriminator_loss,
    sida_generator_gan_loss,
    sida_schedule,
)
from sid_fast.networks import build_network, official_config

TINY = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=0,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    augment_dim=9,
    dropout=0.0,
)


@pytest.mark.parametrize(
    "stem, last, channels",
    [
        ("edm-cifar10-32x32-uncond-vp", "8x8_block3", 256),
        ("edm-ffhq-64x64-uncond-vp", "8x8_block3", 256),
        ("edm-imagenet-64x64-cond-adm", "8x8_block2", 768),
    ],
)
def test_logits_of_the_published_configurations_are_8x8(stem, last, channels):
    """Official sida branch: the logits are taken after the encoder's last module, an 8 x 8 map in every published
    configuration (meta device: shapes only)."""
    with torch.device("meta"):
        net = build_network("EDMPrecond", dict(official_config(stem), use_fp16=False))
        assert list(net.model.enc)[-1] == last and net.model.enc[last].out_channels == channels
        r = net.img_resolution
        labels = torch.zeros(2, net.label_dim) if net.label_dim else None
        logits = net(torch.zeros(2, 3, r, r), torch.ones(2), labels, return_flag="encoder")
    assert logits.shape == (2, 1, 8, 8) and logits.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_encoder_call_runs_no_decoder_and_encoder_decoder_matches_two_calls(model_type):
    torch.manual_seed(0)
    kw = dict(TINY, model_type=model_type)
    if model_type == "DhariwalUNet":
        kw.update(channel_mult=[1, 2, 2])  # 16 -> 8 -> 4: the last encoder map is 4 x 4 here
    net = build_network("EDMPrecond", kw).eval()
    calls, last_enc = [], {}
    for name, m in net.model.dec.items():
        m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    last_name = list(net.model.enc)[-1]
    net.model.enc[last_name].register_forward_hook(lambda m, a, o: last_enc.__setitem__("x", o))
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.3, 2.0, 20.0])
    aug = torch.zeros(3, 9)

    logits = net(x, sigma, None, augment_labels=aug, return_flag="encoder")
    assert calls == []  # the real branch stops after the encoder
    torch.testing.assert_close(logits, last_enc["x"].mean(dim=1, keepdim=True), rtol=0, atol=0)
    side = 8 if model_type == "SongUNet" else 4
    assert logits.shape == (3, 1, side, side)

    D, logits2 = net(x, sigma, None, augment_labels=aug, return_flag="encoder_decoder")
    assert len(calls) == len(net.model.dec)
    torch.testing.assert_close(D, net(x, sigma, None, augment_labels=aug), rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_flag 'both'"):
        net(x, sigma, None, return_flag="both")


# ----------------------------------------------------------------------------------------------------------------
# Loss terms against float64 formulas (official sida branch, sida_training/sida_loss.py), written here from the
# formulas with the NaN samples dropped, as upstream does, rather than masked.


def _bce64(logits, target):
    """Mean over all logits of -[t log s(l) + (1 - t) log(1 - s(l))], in float64 through log-sigmoid."""
    x = logits.double()
    return -(target * torch.nn.functional.logsigmoid(x) + (1 - target) * torch.nn.functional.logsigmoid(-x)).mean()


def _drop(ok, *ts):
    return [t[ok] for t in ts]


def _inputs(n=6, nan_rows=()):
    g = torch.Generator().manual_seed(1)
    lr = torch.randn(n, 1, 8, 8, generator=g) * 4
    lf = torch.randn(n, 1, 8, 8, generator=g) * 4 + 1
    sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp().reshape(n, 1, 1, 1)
    w = torch.rand(n, 1, 1, 1, generator=g) + 0.05
    ok = torch.ones(n, dtype=torch.bool)
    for r in nan_rows:
        lf[r, 0, 3, 3] = float("nan")
        ok[r] = False
    return lr, lf, sigma, w, ok


@pytest.mark.parametrize("nan_rows", [(), (1, 4)], ids=["finite", "two NaN samples"])
def test_discriminator_loss_against_float64(nan_rows):
    lr, lf, sigma, w, ok = _inputs(nan_rows=nan_rows)
    lr.requires_grad_(True)
    lf.requires_grad_(True)
    got = sida_discriminator_loss(lr, lf, sigma, ok)
    assert got.shape == (6, 1, 1, 1)
    kr, kf, ks = _drop(ok, lr, lf, sigma)
    bce = (_bce64(kr, 1.0) + _bce64(kf, 0.0)) / 2
    lam = (ks.double() ** 2 + 0.25) / (ks.double() * 0.5) ** 2  # (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    want = lam * bce
    # fp32 against float64: a few ulps of the largest term (lambda reaches ~1e3 here)
    torch.testing.assert_close(got[ok].double(), want, rtol=1e-5, atol=0)
    assert (got[~ok] == 0).all()
    # gradients: every kept logit is weighted by the sum of lambda over the kept samples; dropped logits get none.
    # d/dl = scale * (sigmoid(l) - t) with scale = sum(lambda) / (2 * count): fp32 computes sigmoid(l) - t with an
    # absolute error of a few ulps of 1, so the bound is 4 * eps32 * scale.
    got.sum().backward()
    kr64, kf64 = (t.detach().double().requires_grad_(True) for t in (kr, kf))
    ((_bce64(kr64, 1.0) + _bce64(kf64, 0.0)) / 2 * lam.detach()).sum().backward()
    atol = 4 * torch.finfo(torch.float32).eps * float(lam.sum()) / (2 * kr.numel())
    torch.testing.assert_close(lr.grad[ok].double(), kr64.grad, rtol=1e-5, atol=atol)
    torch.testing.assert_close(lf.grad[ok].double(), kf64.grad, rtol=1e-5, atol=atol)
    assert (lr.grad[~ok] == 0).all() and (lf.grad[~ok] == 0).all()


@pytest.mark.parametrize("nan_rows", [(), (0, 5)], ids=["finite", "two NaN samples"])
def test_generator_gan_loss_against_float64(nan_rows):
    _, logits, _, w, ok = _inputs(nan_rows=nan_rows)
    logits = logits * 4  # many beyond the +-10 clamp
    logits.requires_grad_(True)
    got = sida_generator_gan_loss(logits, w, ok)
    (kl, kw) = _drop(ok, logits, w)
    kl64 = kl.detach().double().requires_grad_(True)
    want = _bce64(kl64.clamp(-10, 10), 1.0) / kw.double()
    torch.testing.assert_close(got[ok].double(), want.detach(), rtol=1e-5, atol=0)
    assert (got[~ok] == 0).all()
    got.sum().backward()
    want.sum().backward()
    atol = 4 * torch.finfo(torch.float32).eps * float((1 / kw.double()).sum()) / kl.numel()  # as for the discriminator
    torch.testing.assert_close(logits.grad[ok].double(), kl64.grad, rtol=1e-5, atol=atol)
    assert (logits.grad[ok].abs() > 0).sum() < logits.grad[ok].numel()  # clamped logits get no gradient
    assert (logits.grad[ok][kl.detach().abs() > 10] == 0).all()


def test_bce_mean_rows_is_torchs_mean_reduction_without_nan():
    lr, _, _, _, ok = _inputs()
    want = torch.nn.functional.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
    torch.testing.assert_close(bce_mean_rows(lr, 1.0, ok), want, rtol=0, atol=0)
    assert bce_mean_rows(lr, 1.0, torch.zeros(6, dtype=torch.bool)) == 0  # no finite sample: no loss, no NaN


def test_lambda_of_the_discriminator_is_edms_weight():
    s = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(edm_weight(s), 4 + 1 / s**2)
    assert math.isclose(float(edm_weight(torch.tensor(0.002))), 250004.0, rel_tol=1e-6)


def test_schedule_thresholds_at_the_exact_image_counts():
    """Official loop: thresholds compare the images seen before the iteration with > 100k and > 200k."""
    assert sida_schedule(0) == (False, 1.0, 0.0)
    assert sida_schedule(100_000) == (False, 1.0, 0.0)
    assert sida_schedule(100_001) == (True, 1.0, 0.0)
    assert sida_schedule(200_000) == (True, 1.0, 0.0)
    assert sida_schedule(200_001) == (True, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# The SiDA trainer on the tiny conditional teacher (tests/support/helpers.NET: 8 x 8, 1 channel, 3 classes).


def _data(tmp_path, n=20, size=8, channels=1, labels=True):
    from support.fid_helpers import write_png_folder

    folder = tmp_path / f"data{size}x{channels}"
    write_png_folder(folder, n, size=size, channels=channels, labels=[i % 3 for i in range(n)] if labels else None)
    return str(folder)


def _sida_trainer(teacher_file, tmp_path, **kw):
    from support.helpers import cfg_for, cpu_trainer

    return cpu_trainer(cfg_for(teacher_file, method="sida", data=_data(tmp_path), **kw))


def test_sida_step_trains_the_discriminator_then_the_generator_on_schedule(teacher_file, tmp_path):
    from sid_fast.training.sida import SiDATrainer

    tr = _sida_trainer(teacher_file, tmp_path, augment=0.3)
    assert isinstance(tr, SiDATrainer)
    g0 = {k: v.clone() for k, v in tr.G.state_dict().items()}
    f0 = {k: v.clone() for k, v in tr.fake.state_dict().items()}
    tr.step()  # 0 images seen: only the fake score / discriminator moves
    assert all(torch.equal(v, g0[k]) for k, v in tr.G.state_dict().items())
    assert any(not torch.equal(v, f0[k]) for k, v in tr.fake.state_dict().items())
    assert float(tr.stats["loss_D"]) > 0 and float(tr.stats["loss_G_gan"]) == 0
    tr.cur_nimg = 200_008  # past both thresholds: the generator steps with SiD + GAN
    tr.step()
    assert any(not torch.equal(v, g0[k]) for k, v in tr.G.state_dict().items())
    assert float(tr.stats["loss_G_gan"]) > 0


def test_sida_clips_the_fake_scores_gradients_at_one(teacher_file, tmp_path):
    tr = _sida_trainer(teacher_file, tmp_path, lsd=1e6)  # a huge discriminator scale: raw gradients far above 1
    seen = {}
    step = tr.opt_fake.step

    def spy():
        seen["max"] = max(float(p.grad.abs().max()) for p in tr.fake.parameters() if p.grad is not None)
        step()

    tr.opt_fake.step = spy
    tr.fake_score_phase()
    assert seen["max"] == 1.0


def test_real_image_stream_is_the_same_across_resume_and_process_counts(tmp_path):
    from sid_fast.data.dataset import ImageDataset
    from sid_fast.training.sida import RealImages, _MicroBatches

    ds = ImageDataset(_data(tmp_path, n=7))
    stream = RealImages(ds, seed=5, xflip=True)
    # every image (and its mirror) once per epoch of 14 samples, in a seed-dependent order
    assert sorted(stream.index(k) for k in range(14)) == list(range(14))
    assert [stream.index(k) for k in range(14)] != [RealImages(ds, 6, True).index(k) for k in range(14)]
    img_k, _, _ = stream[0]
    i = stream.index(0)
    raw = torch.tensor(ds[i % 7][0])
    torch.testing.assert_close(img_k, raw.flip(-1) if i >= 7 else raw, rtol=0, atol=0)
    # one process with 2 rounds reads the samples that two processes with 1 round read, micro-batch for micro-batch
    one = _MicroBatches(it0=3, batch=8, batch_gpu=4, rounds=2, rank=0)
    two = [_MicroBatches(it0=3, batch=8, batch_gpu=4, rounds=1, rank=r) for r in (0, 1)]
    it1 = iter(one)
    first = [next(it1) for _ in range(4)]
    its = [iter(s) for s in two]
    assert first == [next(its[0]), next(its[1]), next(its[0]), next(its[1])]
    assert first[0] == list(range(24, 28))  # iteration 3 starts at sample 3 * 8: a resume needs only the images seen


def test_sida_resume_reads_the_same_real_images(teacher_file, tmp_path):
    a = _sida_trainer(teacher_file, tmp_path)
    a.step()
    state = copy.deepcopy(a.state_dict())  # as saved to disk: not the live tensors
    seen = []
    orig = a._real_batch

    def record(rnd):
        x, lab = orig(rnd)
        seen.append(x.clone())
        return x, lab

    a._real_batch = record
    a.step()
    b = _sida_trainer(teacher_file, tmp_path)
    b.load_state_dict(state, "state")
    seen_b = []
    orig_b = b._real_batch
    b._real_batch = lambda rnd: (lambda r: (seen_b.append(r[0].clone()), r)[1])(orig_b(rnd))
    b.step()
    assert len(seen) == len(seen_b) == a.rounds
    for x, y in zip(seen, seen_b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for k, v in a.fake.state_dict().items():
        torch.testing.assert_close(b.fake.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case, kw, match",
    [
        ("no data", dict(method="sida"), r"--method sida trains its discriminator on real images: give --data"),
        ("wrong resolution", dict(method="sida", data="16x1"), r"images are 1x16x16, the teacher makes 1x8x8"),
        ("wrong channels", dict(method="sida", data="8x3"), r"images are 3x8x8, the teacher makes 1x8x8"),
        ("no labels", dict(method="sida", data="8x1-nolabels"), r"the dataset has no labels \(dataset.json\)"),
    ],
)
def test_sida_bad_input_is_one_sentence_before_any_work(teacher_file, tmp_path, case, kw, match):
    from support.helpers import cfg_for, cpu_trainer

    from sid_fast.training.config import ConfigError

    if "data" in kw:
        size, ch = kw["data"].split("-")[0].split("x")
        kw = dict(kw, data=_data(tmp_path, size=int(size), channels=int(ch), labels="nolabels" not in kw["data"]))
    with pytest.raises(ConfigError, match=match):
        cpu_trainer(cfg_for(teacher_file, **kw))


def _ddp_worker(rank, world, port, teacher, data, out):
    from support.helpers import cfg_for, cpu_trainer, damp_adam, gloo_process, trainer_params

    with gloo_process(rank, world, port):
        tr = damp_adam(cpu_trainer(cfg_for(teacher, **_DDP_KW, data=data)))
        assert tr.world == world  # really distributed
        for _ in range(3):
            tr.step()
        if rank == 0:
            torch.save(trainer_params(tr), out)


# GAN term from the first step (warm-ups 0), so that both phases run their adversarial parts in the comparison.
_DDP_KW = dict(method="sida", dropout=0.0, batch_gpu=4, augment=0.0, sida_g_start_kimg=0.0, sida_gan_start_kimg=0.0)


@pytest.mark.slow
def test_sida_one_process_equals_two_gloo_processes(teacher_file, tmp_path):
    """batch 8: 1 process x 2 rounds x 4 vs 2 processes x 1 round x 4, with the fake score called twice per forward
    (fake and real branches) under DistributedDataParallel."""
    import os

    import torch.multiprocessing as mp
    from support.helpers import cfg_for, cpu_trainer, damp_adam, trainer_params

    data = _data(tmp_path)
    single = damp_adam(cpu_trainer(cfg_for(teacher_file, **_DDP_KW, data=data)))
    for _ in range(3):
        single.step()
    ref = trainer_params(single)
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, 29700 + os.getpid() % 200, teacher_file, data, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    init = single.teacher.state_dict()
    for k in ref:
        travelled = (ref[k] - init[k.split(".", 1)[1]]).abs().max().item()
        diff = (got[k] - ref[k]).abs().max().item()
        assert diff <= 0.02 * travelled + 1e-7, (k, diff, travelled)  # as SiD's test (tests/test_trainer.py)
    assert (ref["G.model.dec.8x8_aux_conv.weight"] - init["model.dec.8x8_aux_conv.weight"]).abs().max() > 1e-5


def test_sid2a_starts_g_from_a_sid_generator_and_refuses_other_shapes(teacher_file, tmp_path):
    from support.helpers import NET, cfg_for, cpu_trainer

    from sid_fast.checkpoints import save_network
    from sid_fast.hub import save_folder
    from sid_fast.training.config import ConfigError

    torch.manual_seed(3)
    sid_g = build_network("EDMPrecond", NET)  # stands for a SiD generator of this teacher's network
    path = tmp_path / "sid-generator.pt"
    save_network(path, sid_g, NET, kind="generator")
    folder = save_folder(tmp_path / "sid-generator", sid_g, NET, kind="generator", sigma_init=2.5)
    for source in (path, folder):  # a .pt file and a generator folder (sid_fast.hub) alike
        tr = cpu_trainer(cfg_for(teacher_file, method="sida", data=_data(tmp_path), sid_model=str(source)))
        for k, v in sid_g.state_dict().items():
            assert torch.equal(tr.G.state_dict()[k], v) and torch.equal(tr.G_ema.state_dict()[k], v), k
    assert all(
        torch.equal(tr.fake.state_dict()[k], v) for k, v in tr.teacher.state_dict().items() if v.dtype == torch.float32
    )  # the fake score starts from the teacher
    assert tr.cur_nimg == 0
    other = dict(NET, model_channels=8)
    bad = tmp_path / "other.pt"
    save_network(bad, build_network("EDMPrecond", other), other, kind="generator")
    with pytest.raises(ConfigError, match=r"--sid-model .*other.pt: not a generator of this teacher's network"):
        cpu_trainer(cfg_for(teacher_file, method="sida", data=_data(tmp_path), sid_model=str(bad)))


def test_sida_presets_carry_the_official_values():
    from sid_fast.training.config import ConfigError, resolve_config

    c = resolve_config("imagenet64-cond-sida", dict(teacher="t.pkl", data="imagenet-64x64.zip", data_stat="r.npz"))
    assert (c.method, c.alpha, c.batch, c.batch_gpu, c.lr, c.glr, c.precision, c.duration, c.lsd, c.lsg_gan) == (
        "sida",
        1.0,
        8192,
        32,
        4e-6,
        4e-6,
        "fp16",
        300,
        1.0,
        0.01,
    )
    assert (c.sida_g_start_kimg, c.sida_gan_start_kimg, c.tick, c.snap, c.dump, c.ema) == (100, 200, 20, 50, 200, 2.0)
    c = resolve_config("ffhq64-sida", dict(teacher="t.pkl", data="ffhq-64x64.zip", data_stat="r.npz"))
    assert (c.g_beta1, c.batch, c.batch_gpu, c.augment, c.dropout, c.duration) == (0.0, 512, 64, 0.15, 0.05, 200)
    with pytest.raises(ConfigError, match=r"--preset cifar10-uncond-sid2a is SiD²A: give --sid-model"):
        resolve_config("cifar10-uncond-sid2a", dict(teacher="t.pkl", data="c.zip", data_stat="r.npz"))
    c = resolve_config("afhqv2-64-sid2a", dict(teacher="t.pkl", data="a.zip", data_stat="r.npz", sid_model="g.pkl"))
    assert (c.duration, c.lr, c.official_data) == (100, 5e-6, "afhqv2-64x64.zip")


def _upstream_generator_terms(x_g, y_real, y_fake, y_D, alpha, logvar=None):
    """The official generator terms, transcribed with its row dropping (sida_training/sida_loss.py
    generator_share_encoder_loss without logvar; sida_training_edm2/sida_loss_edm2.py with it): (SiD term summed,
    C*H*W times the GAN term summed), as the loops reduce them."""

    def nan_rows(t):
        return torch.isnan(t).flatten(1).any(dim=1)

    drop = nan_rows(x_g) | nan_rows(y_real) | nan_rows(y_fake)
    if logvar is not None:  # EDM2: u and the logits filter the rows too
        drop = drop | nan_rows(logvar) | nan_rows(y_D)
    keep = ~drop
    y, yr, yf = x_g[keep], y_real[keep], y_fake[keep]
    if logvar is not None:
        logvar, y_D = logvar[keep], y_D[keep]
    w = (y - yr).abs().detach().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    loss = (yr - yf) * ((yr - y) - alpha * (yr - yf)) / w
    bce = torch.nn.functional.binary_cross_entropy_with_logits(y_D.clamp(-10, 10), torch.ones_like(y_D))
    gan = bce / w
    if logvar is not None:
        loss, gan = loss / logvar.exp(), gan / logvar.exp()
    return loss.sum(), x_g[0].numel() * gan.sum()


@pytest.mark.parametrize("edm2_rule", [False, True], ids=["edm", "edm2"])
@pytest.mark.parametrize(
    "case", ["clean", "nan generator sample", "nan teacher output only", "nan logits only", "nan fake output only"]
)
def test_generator_terms_follow_each_official_nan_rule(edm2_rule, case):
    """sid_fast's SiDA generator terms equal the official ones, value and gradients, on float64 inputs, with each
    version's NaN rule: EDM takes the BCE mean over every row's logits (a NaN logit makes the term NaN), EDM2 drops
    rows with NaN logits from both terms."""
    from sid_fast.families import FakeOutput
    from sid_fast.training.sida import sida_generator_terms

    g = torch.Generator().manual_seed(3)
    n = 5
    x_g, y_real, y_fake = (torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y_D = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64) * 8  # some beyond the +-10 clamp
    u = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) * 0.3 if edm2_rule else None
    nan = float("nan")
    if case == "nan generator sample":  # everything computed from that sample is NaN
        for t in (x_g, y_real, y_fake, y_D):
            t[1] = nan
    elif case == "nan teacher output only":
        y_real[2, 1, 0, 3] = nan
    elif case == "nan logits only":
        y_D[3, 0, 1, 1] = nan
    elif case == "nan fake output only":
        y_fake[4, 0, 2, 2] = nan
    alpha, a, b = 1.2, 0.5 * 100, 0.5 * 0.01

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x_g, y_real, y_fake, y_D)]
        sid, gan = fn(*leaves)
        (a * sid + b * gan).backward()
        return (sid.detach(), gan.detach()), [t.grad for t in leaves]

    def ours(xg, yr, yf, yd):
        sid, gan, _ = sida_generator_terms(xg, yr, FakeOutput(D=yf, logits=yd, u=u), alpha, edm2_rule=edm2_rule)
        return sid, gan

    got, got_grads = grads(ours)
    want, want_grads = grads(lambda *t: _upstream_generator_terms(*t, alpha, logvar=u))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0, equal_nan=True)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-300, equal_nan=True)
    expect_nan_gan = not edm2_rule and case in ("nan generator sample", "nan logits only")
    assert bool(torch.isnan(got[1])) == expect_nan_gan
