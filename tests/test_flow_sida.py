"""The data-aided variant of SiD on flow matching (--method sida with a flow-matching teacher: sid_fast.t2i.pairs,
sid_fast.t2i.flow.PooledTokens, sid_fast.training.sida.FlowSiDATrainer) on a tiny random SD3 folder saved in
diffusers' format: three trainer iterations (no generator step, SiD alone, SiD + GAN) against ml-sid-dit's data-aided
iteration written out here in float64 from training/sid_dit_sd3_training_loop.py and
training/transformer_with_encoder_sd3.py (the discriminator's forward transcribed, not hooked); pairs folders built,
resumed after a failure, and refused when they do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd3_tiny import write_tiny_sd3  # noqa: E402
from test_flow_matching import LOG2, Official, _record_gradients, assert_trains_like, record_both  # noqa: E402

from sid_fast.families.flow import FlowFamily  # noqa: E402
from sid_fast.t2i import pairs  # noqa: E402
from sid_fast.t2i.sd3 import load_sd3  # noqa: E402
from sid_fast.training.config import ConfigError, resolve_config  # noqa: E402
from sid_fast.training.run import build_trainer  # noqa: E402
from sid_fast.training.sid import FAKE, GEN  # noqa: E402
from sid_fast.training.sida import REAL_PAIRS, FlowSiDATrainer  # noqa: E402

CAPTIONS = ["a cat", "the dog", "a red car on the beach at night", "the moon", "a cat on a hat", "two birds", "rain"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3"))


def random_pairs(vae, n: int = len(CAPTIONS), seed: int = 0) -> pairs.PairDataset:
    """Pairs of random posteriors (means N(0, 1), stds in [0.05, 0.5]) with CAPTIONS, in memory."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.cat([torch.randn(n, 4, 8, 8, generator=g), 0.05 + 0.45 * torch.rand(n, 4, 8, 8, generator=g)], 1)
    meta = dict(pairs.vae_meta(vae), format=pairs.FORMAT, version=1, count=n, source="test", image_size=16)
    return pairs.PairDataset(arrays=raw.numpy(), captions=CAPTIONS[:n], meta=meta)


def sida_config(folder, **kw):
    values = dict(teacher=str(folder), data="pairs", resolution=8, channels=4, batch=4, batch_gpu=2, lr=1e-3,
                  glr=2e-3, precision="fp32", tick=1, sida_g_start_kimg=0.002, sida_gan_start_kimg=0.006)  # fmt: skip
    return resolve_config(kw.pop("preset", "sd3-medium-sida"), dict(values, **kw))


def sida_trainer(cfg, model, real):
    family = FlowFamily(cfg, torch.device("cpu"), model, real.captions, real_data=real)
    return build_trainer(cfg, torch.device("cpu"), family=family, log=lambda *a: None)


def transformer_with_encoder(net, x, pe, pp, timestep):
    """(velocity, logits [N, 1, hidden]) of an SD3 transformer as the official SD3Transformer2DModelWithEncoder
    computes them with return_flag "encoder_decoder": the blocks, norm_out, the mean over tokens of its output, then
    proj_out and the unpatchify."""
    h = net.pos_embed(x)
    temb = net.time_text_embed(timestep, pp)
    e = net.context_embedder(pe)
    for block in net.transformer_blocks:
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb)
    h = net.norm_out(h, temb)
    logits = h.mean(dim=1, keepdim=True)
    h = net.proj_out(h)
    p, (H, W) = net.config.patch_size, x.shape[-2:]
    h = h.reshape(h.shape[0], H // p, W // p, p, p, net.out_channels)
    v = torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], net.out_channels, H, W)
    return v, logits


class OfficialSiDA(Official):
    """ml-sid-dit's SD3 loop with --train_diffusiongan 1 on the trainer's draws: the real pairs of the trainer's
    stream (its fixed global order, sid_fast's own) drawn afresh from their posteriors with the trainer's real-pairs
    generator; the generated branch's captions, z, steps, t and eps as data-free SiD draws them."""

    def __init__(self, tr, folder, real):
        super().__init__(tr, folder)
        self.real, self.nimg = real, 0

    def prompts(self, g, b):
        return [CAPTIONS[i] for i in torch.randint(len(CAPTIONS), [b], generator=g).tolist()]

    def denoise(self, net, x_t, t, prompts, kappa, flag):
        """sid_dit_denoise: (velocity with guidance kappa, the conditional branch's logits), or ("encoder") the
        logits of one conditional call."""
        pe, pp = self.embed(prompts)
        if flag == "encoder" or kappa == 1:
            v, logits = transformer_with_encoder(net, x_t, pe, pp, 1000 * t.flatten())
            return v, logits
        ue, up = (u.expand(len(prompts), *u.shape[1:]) for u in self.uncond)
        v, logits = transformer_with_encoder(net, torch.cat([x_t, x_t]), torch.cat([ue, pe]), torch.cat([up, pp]),
                                             1000 * torch.cat([t, t]).flatten())  # fmt: skip
        v_u, v_c = v.chunk(2)
        return v_u + kappa * (v_c - v_u), logits.chunk(2)[1]

    def real_batch(self, rnd, b):
        it = self.nimg // self.cfg.batch
        ks = [it * self.cfg.batch + rnd * b + j for j in range(b)]
        idx = [self.tr.real.index(k) for k in ks]
        raw = torch.from_numpy(np.stack([self.real.array()[i] for i in idx])).float().double()  # as stored
        g = self.tr.micro_batch_rng(REAL_PAIRS, rnd)
        eps = torch.randn([b, 4, 8, 8], generator=g)
        meta = self.real.meta
        x = (raw[:, :4] + eps * raw[:, 4:] - meta["shift_factor"]) * meta["scaling_factor"]
        return x, [CAPTIONS[i] for i in idx]

    def step(self):
        cfg, total, b = self.cfg, self.cfg.batch, self.cfg.batch_gpu
        bce = torch.nn.BCEWithLogitsLoss(reduction="none")
        k = self.tr.generator_steps_now()
        self.opt_fake.zero_grad(set_to_none=True)
        for rnd in range(cfg.batch // b):
            images_real, contexts_real = self.real_batch(rnd, b)
            g = self.tr.micro_batch_rng(FAKE, rnd)
            prompts, z = self.prompts(g, b), torch.randn([b, 4, 8, 8], generator=g)
            images = self.generate(self.G, z, prompts, k, g, train=False)
            t = torch.sigmoid(torch.normal(LOG2, 1.6, (b,), generator=g))
            noise = torch.randn(images.shape, generator=g)
            tc = t.view(-1, 1, 1, 1)
            output, logit_fake = self.denoise(self.fake, (1 - tc) * images + tc * noise, t, prompts,
                                              cfg.cfg_train_fake, "encoder_decoder")  # fmt: skip
            loss = torch.nn.functional.mse_loss(noise - images, output, reduction="sum") * (cfg.ls / total)
            _, logit_real = self.denoise(self.fake, (1 - tc) * images_real + tc * noise, t, contexts_real,
                                         cfg.cfg_train_fake, "encoder")  # fmt: skip
            loss_real = bce(logit_real.clamp(-10, 10), torch.ones_like(logit_real)).view(b, -1).mean(1, keepdim=True)
            loss_fake = bce(logit_fake.clamp(-10, 10), torch.zeros_like(logit_fake)).view(b, -1).mean(1, keepdim=True)
            loss_D = (loss_real + loss_fake) / 2 * (4 * 8 * 8)
            (loss + loss_D.sum() * (cfg.lsd / total)).backward()
        for p in self.fake.parameters():
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt_fake.step()
        stepped = self.nimg > round(cfg.sida_g_start_kimg * 1000)
        gan = self.nimg > round(cfg.sida_gan_start_kimg * 1000)
        self.opt_g.zero_grad(set_to_none=True)
        for rnd in range(cfg.batch // b) if stepped else ():
            g = self.tr.micro_batch_rng(GEN, rnd)
            prompts, z = self.prompts(g, b), torch.randn([b, 4, 8, 8], generator=g)
            t = torch.sigmoid(torch.normal(LOG2, 1.6, (b,), generator=g))
            noise = torch.randn(z.shape, generator=g)
            images = self.generate(self.G, z, prompts, k, g, train=True)
            tc = t.view(-1, 1, 1, 1)
            x_t = (1 - tc) * images + tc * noise
            v_fake, y_D = self.denoise(self.fake, x_t, t, prompts, cfg.cfg_eval_fake, "encoder_decoder")
            y_fake = x_t - tc * v_fake
            y_real = x_t - tc * self.velocity(self.net, x_t, t, prompts, cfg.cfg_eval_real)
            with torch.no_grad():
                w = {"1_minus_sigma": 1 - tc,
                     "sid_legacy": 1 / (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5),
                     }[cfg.weighting]  # fmt: skip
            loss = ((y_real - y_fake) * (y_fake - images) * w).sum() * (cfg.lsg / total)
            loss_gan = bce(y_D.clamp(-10, 10), torch.ones_like(y_D)).view(b, -1).mean(1, keepdim=True) * w.view(b, -1)
            loss_gan = (loss_gan * (4 * 8 * 8)).sum() * (cfg.lsg_gan / total)
            (0.5 * loss + 0.5 * loss_gan if gan else loss).backward()
        if stepped:
            for p in self.G.parameters():
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            self.opt_g.step()
        self.nimg += cfg.batch
        return stepped, gan


def test_the_transcribed_discriminator_forward_is_the_transformers_forward(sd3_folder):
    net = load_sd3(sd3_folder, dtype=torch.float64).transformer
    g = torch.Generator().manual_seed(0)
    x, pe, pp = (torch.randn(s, generator=g, dtype=torch.float64) for s in ([2, 4, 8, 8], [2, 5, 32], [2, 24]))
    t = torch.tensor([300.0, 800.0], dtype=torch.float64)
    v, logits = transformer_with_encoder(net, x, pe, pp, t)
    ref = net(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=t, return_dict=False)[0]
    assert torch.equal(v, ref)
    assert logits.shape == (2, 1, net.config.num_attention_heads * net.config.attention_head_dim)


@pytest.mark.parametrize(
    "over",
    [
        dict(seed=0),  # the preset's four steps, kappa 4.5: the logits are the doubled batch's conditional half
        dict(seed=3, cfg_train_fake=1.0, cfg_eval_fake=1.0, cfg_eval_real=2.0, weighting="sid_legacy",
             generator_steps=2, lsd=0.5, lsg_gan=3.0),  # kappa 1: one call; w(t) sid_legacy in the GAN term too
    ],
)  # fmt: skip
def test_three_iterations_equal_the_official_data_aided_loop_in_float64(sd3_folder, over):
    cfg = sida_config(sd3_folder, **over)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = load_sd3(sd3_folder, dtype=torch.float64)
        real = random_pairs(model.vae)
        tr = sida_trainer(cfg, model, real)
        assert isinstance(tr, FlowSiDATrainer)
        ref = OfficialSiDA(tr, sd3_folder, real)
        start, start_fake, grads = record_both(tr, ref)
        phases = []
        for _ in range(3):
            phases.append(ref.step())
            tr.step()
    finally:
        torch.set_default_dtype(default)
    # Iteration 1: no generator step; 2: SiD alone; 3: 0.5 SiD + 0.5 GAN (the thresholds are 2 and 6 images).
    assert phases == [(False, False), (True, False), (True, True)]
    assert len(grads["tr_G"]) == len(grads["ref_G"]) == 2
    assert_trains_like(tr, ref, grads, start, start_fake)


def test_each_term_is_seen_by_the_comparison(sd3_folder):
    """The parity above would fail without the discriminator's term, the GAN term, or the real latents' posterior
    draw: each changes the gradients by far more than its tolerance."""
    cfg = sida_config(sd3_folder, seed=0)
    model = load_sd3(sd3_folder)
    real = random_pairs(model.vae)

    def gradients(tweak):
        tr = sida_trainer(cfg, model, real)
        tweak(tr)
        out = []
        _record_gradients(tr.opt_fake, tr.fake, out)
        _record_gradients(tr.opt_g, tr.G, out)
        for _ in range(3):
            tr.step()
        return out

    def no_d(tr):
        tr.cfg.lsd = 0.0

    def no_gan(tr):
        tr.cfg.lsg_gan = 0.0

    def mean_only(tr):
        meta = dict(tr.family.real_data.meta, posterior="deterministic")
        tr.family.real_data.meta = meta

    base = gradients(lambda tr: None)
    assert len(base) == 5  # three fake-network steps, two generator steps
    for tweak, first_changed in ((no_d, 0), (no_gan, 4), (mean_only, 0)):
        other = gradients(tweak)
        diff = max((a - b).abs().max().item() for a, b in zip(base[first_changed], other[first_changed]))
        scale = max(b.abs().max().item() for b in base[first_changed])
        assert diff > 1e-4 * scale, tweak.__name__


def write_imagefolder(root, n: int = 5, size: int = 20):
    """n RGB images of size x size (not square-cropped: 20x24) with metadata.jsonl captions."""
    import PIL.Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    lines = []
    for i in range(n):
        PIL.Image.fromarray(rng.randint(0, 256, (24, size, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        lines.append(json.dumps({"file_name": f"im{i}.png", "text": f"picture\nnumber {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def build_failing_at(monkeypatch, src, dest, vae, failing_image: int) -> None:
    """A pairs build (16 px, float32, VAE batch 2) whose `failing_image`-th image read fails, as a kill would stop it;
    the reader is put back afterwards."""
    real_load, calls = pairs.load_image, []

    def failing(*a):
        calls.append(1)
        if len(calls) == failing_image:
            raise OSError("killed")
        return real_load(*a)

    monkeypatch.setattr(pairs, "load_image", failing)
    with pytest.raises(OSError):
        pairs.build(src, dest, vae, 16, dtype="float32", batch=2, log=None)
    monkeypatch.setattr(pairs, "load_image", real_load)


def test_a_pairs_folder_holds_the_vaes_posteriors_and_resumes_after_a_failure(sd3_folder, tmp_path, monkeypatch):
    vae = pairs.teacher_vae(sd3_folder)
    src = write_imagefolder(tmp_path / "src")
    n = pairs.build(src, tmp_path / "pairs", vae, 16, dtype="float32", batch=2, log=None)
    ds = pairs.PairDataset(tmp_path / "pairs")
    assert n == len(ds) == 5 and ds.latent_shape == [4, 8, 8] and ds.shape == [8, 8, 8]
    assert list(ds.captions) == [f"picture number {i}" for i in range(5)]
    items = pairs.read_imagefolder(src)
    imgs = torch.stack([pairs.load_image(p, 16, 3) for p, _ in items])
    with torch.no_grad():
        post = vae.encode(imgs).latent_dist
    assert np.allclose(ds.array()[:, :4], post.mean.numpy(), atol=1e-6)
    assert np.allclose(ds.array()[:, 4:], post.std.numpy(), atol=1e-6)
    # A draw is (mean + eps std - shift) * scale with eps from the generator.
    x = pairs.draw_latents(torch.from_numpy(np.array(ds.array())), ds.meta, torch.Generator().manual_seed(1))
    eps = torch.randn([5, 4, 8, 8], generator=torch.Generator().manual_seed(1))
    want = (post.mean + eps * post.std - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(x, want, atol=1e-5)

    # A build that fails after the first chunk resumes from it: the same folder as an uninterrupted build.
    monkeypatch.setattr(pairs, "CHUNK", 2)
    build_failing_at(monkeypatch, src, tmp_path / "again", vae, failing_image=4)
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in (tmp_path / "again.part" / "done").iterdir()) == ["0"]  # chunk 0 of 3 (2 images)
    said = []
    pairs.build(src, tmp_path / "again", vae, 16, dtype="float32", batch=2, log=said.append)
    assert said == [f"resuming {tmp_path / 'again.part'}: 1 of 3 chunks encoded"]
    assert np.array_equal(np.load(tmp_path / "again" / pairs.LATENTS), np.load(tmp_path / "pairs" / pairs.LATENTS))
    assert (tmp_path / "again" / pairs.CAPTIONS).read_text() == (tmp_path / "pairs" / pairs.CAPTIONS).read_text()


def test_bad_pairs_and_flags_are_refused_in_one_sentence(sd3_folder, tmp_path):
    vae = pairs.teacher_vae(sd3_folder)
    src = write_imagefolder(tmp_path / "src", n=3)
    pairs.build(src, tmp_path / "pairs", vae, 16, log=None)
    bad = tmp_path / "nometa"
    bad.mkdir()
    cases = [
        (lambda: pairs.read_imagefolder(bad), "no metadata.jsonl"),
        (lambda: pairs.build(src, tmp_path / "pairs", vae, 16, log=None), "exists"),
        (lambda: pairs.build(src, tmp_path / "p2", vae, 15, log=None), "not a multiple"),
        (lambda: pairs.PairDataset(bad), "not a pairs folder"),
    ]
    (tmp_path / "emptycap").mkdir()
    (tmp_path / "emptycap" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": " "}\n')
    cases.append((lambda: pairs.read_imagefolder(tmp_path / "emptycap"), "is empty"))
    meta = json.loads((tmp_path / "pairs" / pairs.META).read_text())
    (tmp_path / "pairs" / pairs.META).write_text(json.dumps(dict(meta, scaling_factor=0.5)))
    cases.append((lambda: pairs.open_pairs(str(tmp_path / "pairs"), vae), "scaling_factor 0.5"))
    for call, words in cases:
        with pytest.raises(pairs.PairsError) as e:
            call()
        assert words in str(e.value) and str(e.value).count(". ") == 0, str(e.value)
    (tmp_path / "pairs" / pairs.META).write_text(json.dumps(meta))
    with open(tmp_path / "pairs" / pairs.CAPTIONS, "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(pairs.PairsError, match="4 captions for 3 latents"):
        pairs.PairDataset(tmp_path / "pairs")

    for over, words in (
        (dict(data_prompt_text=str(src / "metadata.jsonl")), "--data-prompt-text"),
        (dict(xflip=True), "--xflip"),
        (dict(compile=True), "--compile"),  # the hook that reads the logits does not run in a compiled forward
        (dict(data=None), "--data"),
    ):
        with pytest.raises(ConfigError, match=words.replace("-", r"\-")):
            cfg = sida_config(sd3_folder, **dict(dict(data=str(tmp_path / "pairs")), **over))
            build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="read by --method sida"):
        cfg = resolve_config("sd3-medium-sid", dict(teacher=str(sd3_folder), data=str(tmp_path / "pairs"),
                                                     resolution=8, channels=4,
                                                     data_prompt_text=str(src / "metadata.jsonl")))  # fmt: skip
        build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)


def test_the_digits_preset_runs_the_data_aided_loop_on_the_bundled_digits(tmp_path):
    """digits-flow-sida: the official data-aided settings; `--data digits` pairs the bundled digits (encoded by the
    teacher's VAE) with captions naming each image's digit; a two-iteration run reaches the GAN term and records both
    adversarial losses."""
    from sid_fast.data.digits import digits_uint8
    from sid_fast.t2i import digits
    from sid_fast.training.run import run

    cfg = resolve_config("digits-flow-sida", {})
    assert (cfg.method, cfg.data, cfg.data_prompt_text, cfg.lsd, cfg.lsg_gan) == ("sida", "digits", None, 1.0, 1.0)
    assert 0 < cfg.sida_g_start_kimg < cfg.sida_gan_start_kimg < cfg.duration * 1000
    real = pairs.digits_pairs(load_sd3(cfg.teacher).vae)
    labels = digits_uint8()[1]
    assert len(real) == len(labels) and real.latent_shape == [4, 8, 8]
    assert [digits.prompt_digit(c) for c in real.captions] == labels.tolist()

    def config(outdir, duration, **kw):
        return resolve_config("digits-flow-sida", dict(outdir=str(outdir), batch=16, batch_gpu=8, duration=duration,
                                                       tick=0.016, dump=1, metrics="none", sida_g_start_kimg=0,
                                                       sida_gan_start_kimg=0.008, **kw))  # fmt: skip

    run_dir, status = run(config(tmp_path / "straight", 32e-6), log_to_stdout=False)
    assert status == "done"
    ticks = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    last = ticks[-1]
    assert last["loss_D"] > 0 and last["loss_G_gan"] > 0 and last["loss_G"] != 0, last
    # Stopped after the first iteration (no GAN term yet) and continued: the same weights bit for bit (the real
    # pairs' stream, their posterior draws and the warm-up all follow the images seen).
    first_dir, _ = run(config(tmp_path / "parts", 16e-6), log_to_stdout=False)
    _, status = run(config(tmp_path / "parts", 32e-6, run_dir=str(first_dir)), log_to_stdout=False)
    assert status == "done"
    a, b = (torch.load(sorted(d.glob("training-state-*"))[-1], weights_only=True) for d in (run_dir, first_dir))
    assert a["cur_nimg"] == b["cur_nimg"] == 32
    for key in ("G", "fake_score"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


def _fsdp_worker(rank, world, port, folder, data, out):
    from support.helpers import damp_adam, gloo_process

    from sid_fast.training.state import gathered_trained_states

    with gloo_process(rank, world, port):
        tr = damp_adam(build_trainer(sida_config(folder, data=data, fsdp=True, seed=4), torch.device("cpu"),
                                     log=lambda *a: None))  # fmt: skip
        assert all(hasattr(p, "full_tensor") for p in tr.fake.parameters())
        for _ in range(3):
            tr.step()
        states = gathered_trained_states(tr.trained)
        if rank == 0:
            torch.save({k: {n: v.clone() for n, v in states[k].items()} for k in ("G", "fake_score")}, out)


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_one_process(sd3_folder, tmp_path):
    """FSDP2 over two gloo processes equals one process through the three regimes. The real branch's logits come from
    a tap inside the fake network, not from its output: without the output in the loss's graph (flow.along) FSDP2
    runs that branch's backward with the root's parameters still sharded (a storage of size 0): this test fails
    without it."""
    import os

    import torch.multiprocessing as mp
    from support.helpers import damp_adam

    data = tmp_path / "pairs"
    pairs.build(write_imagefolder(tmp_path / "src", n=8, size=16), data, pairs.teacher_vae(sd3_folder), 16, log=None)
    single = damp_adam(build_trainer(sida_config(sd3_folder, data=str(data), seed=4), torch.device("cpu"),
                                     log=lambda *a: None))  # fmt: skip
    nets = dict(G=single.G, fake_score=single.fake)
    start = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in nets.items()}
    for _ in range(3):
        single.step()
    assert single.stats.reduce()["loss_G_gan"] > 0
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, 29700 + os.getpid() % 97, sd3_folder, str(data), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    for name, net in nets.items():
        for k, v in net.state_dict().items():
            travelled = (v - start[name][k]).abs().max().item()
            # Measured: 1.5e-4 of the distance moved at worst (reduce-scatter sums in another order, damped Adam).
            assert (got[name][k] - v).abs().max().item() <= 0.02 * travelled + 1e-6, (name, k)


def test_a_warm_data_aided_bf16_step_has_no_capture_guard_finding(sd3_folder, tmp_path, monkeypatch):
    """The real pairs' stream, their posterior draw, their captions' encoding and both adversarial terms add nothing a
    CUDA graph or an asynchronous host cannot survive; a planted blocking copy of the real batch is caught."""
    from sid_fast.guard import CaptureGuard

    data = tmp_path / "pairs"
    pairs.build(write_imagefolder(tmp_path / "src", n=8, size=16), data, pairs.teacher_vae(sd3_folder), 16, log=None)
    cfg = sida_config(sd3_folder, data=str(data), seed=4, precision="bf16", optimizer="fused", checkpointing="none",
                      sida_g_start_kimg=0, sida_gan_start_kimg=0)  # fmt: skip
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    tr.step()
    tr.step()  # the generator phase with its GAN term is warm too
    with CaptureGuard() as g:
        tr.step()
    assert [str(f) for f in g.failures()] == []
    monkeypatch.setattr(FlowSiDATrainer, "_real_inputs", lambda self, raw, idx, rnd: self.family.real_inputs(
        raw.to(self.device), idx.numpy(), self.micro_batch_rng(REAL_PAIRS, rnd)))  # fmt: skip
    with CaptureGuard() as g:
        tr.step()
    assert [f.kind for f in g.failures()] == ["host copy"] * tr.rounds, [str(f) for f in g.failures()]  # one per batch


def _build_worker(rank, world, port, folder, src, dest):
    from support.helpers import gloo_process

    with gloo_process(rank, world, port):
        pairs.CHUNK = 2
        pairs.build(src, dest, pairs.teacher_vae(folder), 16, dtype="float32", batch=2, log=None)


@pytest.mark.slow
def test_a_pairs_build_is_shared_by_ranks_and_resumes_with_another_process_count(sd3_folder, tmp_path, monkeypatch):
    """Two gloo ranks finish a build that one process left after its first chunk: each encodes its chunks (c mod 2)
    into the one array, and the folder equals a single process's uninterrupted build (a chunk left unwritten, or
    written in another's place, would be zeros or another image's latents: O(1) off)."""
    import os

    import torch.multiprocessing as mp

    vae = pairs.teacher_vae(sd3_folder)
    src = write_imagefolder(tmp_path / "src", n=7)
    monkeypatch.setattr(pairs, "CHUNK", 2)
    pairs.build(src, tmp_path / "one", vae, 16, dtype="float32", batch=2, log=None)
    build_failing_at(monkeypatch, src, tmp_path / "two", vae, failing_image=3)
    assert sorted(p.name for p in (tmp_path / "two.part" / "done").iterdir()) == ["0"]
    mp.spawn(_build_worker, args=(2, 29500 + os.getpid() % 97, str(sd3_folder), str(src), str(tmp_path / "two")),
             nprocs=2)  # fmt: skip
    assert not (tmp_path / "two.part").exists()
    # Every pair written, in its place: equal to float32 rounding (the ranks run the VAE on one thread each, and
    # oneDNN's convolutions round differently with another thread count).
    two, one = np.load(tmp_path / "two" / pairs.LATENTS), np.load(tmp_path / "one" / pairs.LATENTS)
    assert np.abs(two - one).max() <= 1e-5 * np.abs(one).max(), np.abs(two - one).max()
    for name in (pairs.CAPTIONS, pairs.META):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
