"""SiD-LSG in the SiD loop (the Stable Diffusion family, sid_fast.families.sd) on a tiny random Stable Diffusion
folder saved in diffusers' format: two iterations of the trainer against the official iteration written out here
from its formulas (SiD-LSG training/sid_training_loop.py, training/sid_sd_util.py) in float64, from the same draws;
the flags and refusals; the snapshot folder as diffusers loads it; resume."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import write_tiny_sd, write_tiny_sdxl  # noqa: E402

from sid_fast.data.prompts import read_prompts  # noqa: E402
from sid_fast.families.sd import SDFamily  # noqa: E402
from sid_fast.t2i.sd import load_sd  # noqa: E402
from sid_fast.training.config import ConfigError, resolve_config  # noqa: E402
from sid_fast.training.run import build_trainer  # noqa: E402
from sid_fast.training.sid import FAKE, GEN  # noqa: E402

PROMPTS = ["a cat", "the dog", "a handwritten seven", "a red car on the beach at night", "the moon"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def sd_trainer(cfg, sd, prompt_file, log=print):
    """The trainer of a loaded folder (e.g. in float64), through the family's constructor from parts."""
    family = SDFamily(cfg, torch.device("cpu"), sd, read_prompts(prompt_file))
    return build_trainer(cfg, torch.device("cpu"), family=family, log=log)


def lsg_config(sd_folder, prompt_file, **kw):
    values = dict(
        teacher=str(sd_folder),
        data_prompt_text=str(prompt_file),
        resolution=8,
        batch=6,
        batch_gpu=3,
        lr=1e-3,
        glr=2e-3,
        ema=0.001,
    )
    return resolve_config(kw.pop("preset", "sd15-lsg2"), dict(values, **kw))


# ----------------------------------------------------------------------------------------------------------------
# The official iteration, written from its formulas (float64), on the trainer's draws.


class Official:
    """One process of the official loop: prompts tokenized per call (dropped ones as ""), the empty prompt encoded
    per call, add_noise and the x0-prediction as their formulas, per-sample loops where the official code has them.
    An SDXL folder's conditioning as diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids make
    it, the empty prompt as zeros (force_zeros_for_empty_prompt), passed as added_cond_kwargs."""

    def __init__(self, tr, sd_folder):
        from sid_fast.t2i.sd import load_sd

        self.tr, self.cfg = tr, tr.cfg
        sd = load_sd(sd_folder, dtype=torch.float64)
        self.unet, self.tok, self.te = sd.unet, sd.tokenizer, sd.text_encoder
        self.xl, self.tok2, self.te2 = sd.xl, sd.tokenizer_2, sd.text_encoder_2
        size = sd.unet.config.sample_size * 2 ** (len(sd.vae.config.block_out_channels) - 1)  # the pipeline's default
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float64)
        self.abar = sd.schedule.alphas_cumprod.double()  # diffusers' float32 values, as the official code reads them
        self.v = sd.schedule.prediction_type == "v_prediction"
        self.G = copy.deepcopy(self.unet).train().requires_grad_(True)
        self.fake = copy.deepcopy(self.unet).train().requires_grad_(True)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        cfg = self.cfg
        self.opt_fake = torch.optim.Adam(self.fake.parameters(), lr=cfg.lr, betas=(0.0, 0.999), eps=1e-8)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.glr, betas=(0.0, 0.999), eps=1e-8)
        self.nimg = 0

    def embed(self, prompts):
        def ids(tok):
            return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids  # fmt: skip

        with torch.no_grad():
            if not self.xl:
                return self.te(ids(self.tok))[0]
            one = self.te(ids(self.tok), output_hidden_states=True)
            two = self.te2(ids(self.tok2), output_hidden_states=True)
        empty = torch.tensor([p == "" for p in prompts])
        states = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        states = torch.where(empty[:, None, None], 0.0, states)
        pooled = torch.where(empty[:, None], 0.0, two.text_embeds)
        return dict(states=states, text_embeds=pooled, time_ids=self.time_ids.repeat(len(prompts), 1))

    def call(self, net, x, t, cond):
        if not self.xl:
            return net(x, t, encoder_hidden_states=cond).sample
        extra = dict(text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])
        return net(x, t, encoder_hidden_states=cond["states"], added_cond_kwargs=extra).sample

    @staticmethod
    def cat(a, b):
        return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])

    def add_noise(self, x, eps, t):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * eps

    def x0(self, x_t, out, t):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        if self.v:  # scheduler.step's v-prediction branch
            return torch.stack([a[i].sqrt() * x_t[i] - (1 - a[i]).sqrt() * out[i] for i in range(len(t))])
        return torch.stack([(x_t[i] - (1 - a[i]).sqrt() * out[i]) / a[i].sqrt() for i in range(len(t))])

    def denoise(self, net, x, eps, prompts, t, kappa, predict_x0=True):
        x_t = self.add_noise(x, eps, t)
        cond = self.embed(prompts)
        if kappa == 1:
            out = self.call(net, x_t, t, cond)
        else:
            uncond = self.embed([""] * len(prompts))
            out = self.call(net, torch.cat([x_t, x_t]), torch.cat([t, t]), self.cat(uncond, cond))
            out_u, out_c = out.chunk(2)
            out = out_u + kappa * (out_c - out_u)
        return self.x0(x_t, out, t) if predict_x0 else out

    def sample(self, net, z, prompts):
        t = torch.full([len(prompts)], self.cfg.init_timestep, dtype=torch.long)
        latents = self.add_noise(torch.zeros_like(z), z, t)
        out = self.call(net, latents, t, self.embed(prompts))
        a = self.abar[t[0]]  # scheduler.step at init_timesteps[0]
        return a.sqrt() * latents - (1 - a).sqrt() * out if self.v else (latents - (1 - a).sqrt() * out) / a.sqrt()

    def draws(self, phase, rnd, dropout):
        """The trainer's draws of this micro-batch, in its order: prompt indices, z, dropout; then t, eps."""
        b = self.cfg.batch_gpu
        g = self.tr.micro_batch_rng(phase, rnd)
        idx = torch.randint(len(PROMPTS), [b], generator=g)
        z = torch.randn([b, 4, 8, 8], generator=g)
        prompts = [PROMPTS[i] for i in idx.tolist()]
        if dropout:
            drop = torch.rand([b], generator=g) < 0.1
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        if phase == FAKE:
            return prompts, z, g
        t = torch.randint(self.cfg.tmin, self.cfg.tmax, (b,), generator=g)
        eps = torch.randn([b, 4, 8, 8], generator=g)
        return prompts, z, t, eps

    def step(self):
        cfg, total = self.cfg, self.cfg.batch  # one process: batch_gpu_total = batch
        rounds = cfg.batch // cfg.batch_gpu
        dropout = cfg.cfg_train_fake != 1 or cfg.cfg_eval_fake != 1
        self.fake.train().requires_grad_(True)
        self.opt_fake.zero_grad(set_to_none=True)
        for rnd in range(rounds):
            prompts, z, g = self.draws(FAKE, rnd, dropout)
            with torch.no_grad():
                images = self.sample(self.G.eval(), z, prompts)
            t = torch.randint(cfg.tmin, cfg.tmax, (cfg.batch_gpu,), generator=g)
            noise = torch.randn(images.shape, generator=g)
            noise_fake = self.denoise(self.fake, images, noise, prompts, t, cfg.cfg_train_fake, predict_x0=False)
            if self.v:  # get_velocity target, compute_snr weight snr / (snr + 1)
                a = self.abar[t].reshape(-1, 1, 1, 1)
                target = a.sqrt() * noise - (1 - a).sqrt() * images
                snr = a / (1 - a)
                loss = ((noise_fake - target) ** 2 * snr / (snr + 1)).sum() * (cfg.ls / total)
            else:
                loss = ((noise_fake - noise) ** 2).sum() * (cfg.ls / total)
            loss.backward()
        for p in self.fake.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt_fake.step()
        self.fake.eval().requires_grad_(False)
        self.G.train().requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        for rnd in range(rounds):
            prompts, z, t, noise = self.draws(GEN, rnd, False)
            images = self.sample(self.G, z, prompts)
            y_fake = self.denoise(self.fake, images, noise, prompts, t, cfg.cfg_eval_fake)
            y_real = self.denoise(self.unet, images, noise, prompts, t, cfg.cfg_eval_real)
            with torch.no_grad():
                w = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
            if cfg.alpha == 1:
                loss = (y_real - y_fake) * (y_fake - images) / w
            else:
                loss = (y_real - y_fake) * ((y_real - images) - cfg.alpha * (y_real - y_fake)) / w
            (loss.sum() * (cfg.lsg / total)).backward()
        for p in self.G.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt_g.step()
        self.G.eval().requires_grad_(False)
        half = min(int(cfg.ema * 1000) * 1000, self.nimg * 0.05)
        beta = 0.5 ** (cfg.batch / max(half, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        self.nimg += cfg.batch


def _max_rel(a: torch.nn.Module, b: torch.nn.Module, start: dict) -> float:
    """max over tensors of |a - b| / max|a - start|: the disagreement relative to how far training moved them."""
    worst = 0.0
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        moved = (pa - start[k]).abs().max().item()
        worst = max(worst, (pa - pb).abs().max().item() / max(moved, 1e-30))
    return worst


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd_v"), seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), seed=2)


@pytest.mark.parametrize(
    "kappas, kind",
    [((2.0, 2.0, 2.0), "eps"), ((1.0, 1.0, 3.0), "eps"), ((0.5, 1.5, 1.0), "eps"), ((2.0, 2.0, 2.0), "v"),
     ((2.0, 2.0, 2.0), "xl"), ((1.0, 1.5, 3.0), "xl")],
)  # fmt: skip
def test_two_iterations_equal_the_official_formulas_in_float64(sd_folder, v_folder, xl_folder, prompt_file, kappas,
                                                               kind):  # fmt: skip
    """Also an SDXL folder (two text encoders, pooled embedding, size conditioning, zeros as the empty prompt): the
    same iteration with its conditioning as diffusers' SDXL pipeline makes it, the dropout of the fake-score phase
    (kappa2 1.5) included."""
    k1, k2, k4 = kappas
    sd_folder = {"eps": sd_folder, "v": v_folder, "xl": xl_folder}[kind]
    cfg = lsg_config(sd_folder, prompt_file, cfg_train_fake=k1, cfg_eval_fake=k2, cfg_eval_real=k4,
                     alpha=1.0 if k1 == 2 else 1.2)  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tr = sd_trainer(cfg, load_sd(sd_folder, dtype=torch.float64), prompt_file, log=lambda *a: None)
        ref = Official(tr, sd_folder)
        start = {k: v.clone() for k, v in ref.G.state_dict().items()}
        start_fake = {k: v.clone() for k, v in ref.fake.state_dict().items()}
        for _ in range(2):
            ref.step()  # first: it reads the iteration's seeds from the trainer's image count
            tr.step()
    finally:
        torch.set_default_dtype(default)
    assert tr.family.drop_p == (0.1 if (k1, k2) != (1, 1) else 0.0)
    # The trainer and the official formulas agree to float64 rounding. Adam's first step maps a gradient g to
    # lr g / (|g| + eps): where |g| is near eps (1e-8) a rounding difference d of the gradient (float64 sums of
    # terms up to ~0.1: d ~ 1e-16 to 1e-15) moves the update by up to lr d / eps, 1e-7 of lr, i.e. of the movement; a
    # wrong draw, scale or guidance moves it by O(1).
    assert _max_rel(tr.G, ref.G, start) < 1e-6
    assert _max_rel(tr.fake, ref.fake, start_fake) < 1e-6
    assert _max_rel(tr.G_ema, ref.G_ema, start) < 1e-6
    moved = max((p - start[k]).abs().max().item() for k, p in tr.G.state_dict().items())
    assert moved > 1e-4  # G trained: the comparison is not of two untouched copies


# ----------------------------------------------------------------------------------------------------------------
# Runs: the snapshot folder as diffusers users load it, resume, the fast path's options.


def test_a_run_writes_a_diffusers_unet_whose_card_snippet_samples_it(sd_folder, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    from sid_fast.t2i.export import CARD, decode, load_unet_folder, onestep_latents
    from sid_fast.t2i.sd import load_sd
    from sid_fast.training.run import run

    cfg = lsg_config(sd_folder, prompt_file, outdir=str(tmp_path / "runs"), batch=4, batch_gpu=2, duration=8e-6,
                     tick=0.004, snap=1, dump=1, extra_snapshots=False)  # fmt: skip
    run_dir, status = run(cfg, log_to_stdout=False)
    assert status == "done"
    snaps = sorted(run_dir.glob("network-snapshot-*"))
    assert [p.name for p in snaps] == ["network-snapshot-000000000004", "network-snapshot-000000000008"]
    assert sorted(run_dir.glob("fakes-*.png")) and sorted(run_dir.glob("training-state-*"))
    options = json.loads((run_dir / "training_options.json").read_text())
    assert options["class_labels"] == f"prompts of {prompt_file} (5)"
    unet = UNet2DConditionModel.from_pretrained(str(snaps[-1]))  # diffusers' own loader
    state = torch.load(sorted(run_dir.glob("training-state-*"))[-1], weights_only=True)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, state["G_ema"][k]), k
    g, meta = load_unet_folder(snaps[-1])
    assert meta["init_timestep"] == 625 and meta["guidance"] == [2.0, 2.0, 2.0] and meta["kimg"] == 0.008
    # The model card's snippet, run as a diffusers user would (the teacher's folder name given as its path), makes
    # exactly sid_fast's latents and pixels (the snapshot's path is the card's own).
    card = (snaps[-1] / CARD).read_text()
    assert f'UNet2DConditionModel.from_pretrained("{snaps[-1]}")' in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace(f'"{sd_folder.name}"', repr(str(sd_folder))).replace('image.save("sample.png")', "")
    ns = {}
    exec(code, ns)
    sd = load_sd(sd_folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = onestep_latents(g, sd.schedule, z, sd.encode_text([ns["prompt"]]), 625)
    assert torch.equal(ns["latents"], want)
    assert torch.equal(ns["pixels"], decode(sd.vae, want, "cpu"))


def test_resume_continues_bit_exactly(sd_folder, prompt_file, tmp_path):
    from sid_fast.checkpoints import atomic_save
    from sid_fast.training.run import load_state_file

    cfg = lsg_config(sd_folder, prompt_file, batch=4, batch_gpu=2)

    def trainer():
        return sd_trainer(cfg, load_sd(sd_folder), prompt_file)

    a = trainer()
    for _ in range(2):
        a.step()
    b = trainer()
    b.step()
    path = tmp_path / "training-state-000000000004.pt"
    atomic_save(b.state_dict(), path)
    c = trainer()
    c.load_state_dict(load_state_file(path), str(path))
    c.step()
    for net in ("G", "fake", "G_ema"):
        for (k, va), vc in zip(getattr(a, net).state_dict().items(), getattr(c, net).state_dict().values()):
            assert torch.equal(va, vc), (net, k)


def _one_step_params(cfg, sd_folder, prompt_file):
    tr = sd_trainer(cfg, load_sd(sd_folder), prompt_file)
    tr.step()
    return {k: v.float() for k, v in tr.G.state_dict().items()}, tr


def test_checkpointing_changes_nothing_and_bf16_stays_close(sd_folder, prompt_file):
    ref, tr = _one_step_params(lsg_config(sd_folder, prompt_file), sd_folder, prompt_file)
    start = tr.teacher.state_dict()
    for mode in ("nets", "selective"):  # recomputed forwards: the same arithmetic, the same numbers
        got, tr = _one_step_params(lsg_config(sd_folder, prompt_file, checkpointing=mode), sd_folder, prompt_file)
        assert tr.G.is_gradient_checkpointing == (mode == "selective")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7, msg=f"{mode} {k}")
    # bf16 autocast (fp32 master weights): Adam's first step is lr * sign(g) where |g| >> eps, so a parameter moves
    # the same way as fp32's unless its gradient's sign flips under bf16 rounding; most must agree.
    got, tr = _one_step_params(lsg_config(sd_folder, prompt_file, precision="bf16"), sd_folder, prompt_file)
    assert next(tr.teacher.parameters()).dtype == torch.bfloat16 and next(tr.G.parameters()).dtype == torch.float32
    same = total = 0
    for k in ref:
        d_ref, d_got = ref[k] - start[k].float(), got[k] - start[k].float()
        same += int((torch.sign(d_ref) == torch.sign(d_got)).sum())
        total += d_ref.numel()
    assert same / total > 0.9, same / total


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one sentence naming the flag or path, nothing written.


def test_bad_input_is_refused_in_one_sentence_before_anything_is_written(sd_folder, prompt_file, tmp_path):
    from click.testing import CliRunner

    import train
    from sid_fast.training.run import run

    out = tmp_path / "runs"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (dict(), "--teacher is required for preset 'sd15-lsg2': a local diffusers folder of stable-diffusion-v1-5"),
        (dict(teacher=str(sd_folder)), "--data-prompt-text is required with the Stable Diffusion teacher"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(empty)), f"--data-prompt-text {empty}: the prompt file"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=64),
         f"--teacher {sd_folder}: the UNet makes 4x8x8 latents (preset sd15-lsg2: 4x64x64)."),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, precision="fp16"),
         "--precision fp16: the official --fp16 1 mode (fp16 weights and Adam states) is not built"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, metrics="fid",
              data_stat="ref.npz"), "--metrics fid: FID-30k and CLIP score"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, metrics="fd-digits"),
         f"--metrics fd-digits: the teacher {sd_folder} makes 3x16x16 images, not 8x8 digits"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, tmax=1001), "--tmax must be"),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, tmin=980),
         "--tmin 980 and --tmax 980: timesteps are drawn in [tmin, tmax), which is empty."),
        (dict(teacher=str(sd_folder), data_prompt_text=str(prompt_file), resolution=8, cfg_eval_real=0.0),
         "--cfg-eval-real must be a finite number in (0, 100] (1 is no guidance), got 0.0"),
        (dict(preset="digits", cfg_eval_real=2.0), "--cfg-eval-real 2: guidance applies to Stable Diffusion teachers"),
        (dict(preset="digits", data_prompt_text=str(prompt_file)), "prompts condition Stable Diffusion teachers"),
    ]  # fmt: skip
    for flags, message in cases:
        flags = dict(flags)
        preset = flags.pop("preset", "sd15-lsg2")
        with pytest.raises(ConfigError) as e:
            run(resolve_config(preset, dict(flags, outdir=str(out))), log_to_stdout=False)
        assert message in str(e.value), (flags, str(e.value))
        assert "\n" not in str(e.value)
        assert not out.exists() or not any(out.iterdir()), flags
    # Conflicting guidance flags on the command line.
    r = CliRunner().invoke(
        train.main, ["--preset", "sd15-lsg2", "--guidance", "2", "--cfg_eval_real", "3", "--dry-run"]
    )
    assert r.exit_code != 0 and "--guidance 2 sets all three scales but --cfg-eval-real 3 differs" in r.output
    r = CliRunner().invoke(
        train.main,
        [
            "--preset",
            "sd21base-lsg4.5",
            "--teacher",
            "sd21",
            "--data-prompt-text",
            "p.txt",
            "--guidance",
            "1.5",
            "--dry-run",
        ],
    )
    assert r.exit_code == 0, r.output
    sections = json.loads(r.output)  # by section: the SD family's own settings in "family"
    assert sections["teacher_family"] == "sd" and "cfg_eval_real" in sections["family"]
    assert "P_mean" not in sections["family"]  # EDM's, not shown for a Stable Diffusion teacher
    got = {k: v for s in sections.values() if isinstance(s, dict) for k, v in s.items()}
    assert [got[k] for k in ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real")] == [1.5, 1.5, 1.5]
    assert (got["tmin"], got["tmax"], got["init_timestep"], got["alpha"], got["lsg"]) == (20, 980, 625, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Several processes: FSDP2 (diffusers' resnets and transformers as the sharded units) over gloo.


def _dist_worker(rank, world, port, sd_folder, prompt_file, out, fsdp):
    from support.helpers import damp_adam, gloo_process

    with gloo_process(rank, world, port):
        tr = damp_adam(build_trainer(lsg_config(sd_folder, prompt_file, batch=4, batch_gpu=2, fsdp=fsdp),
                                     torch.device("cpu"), log=lambda *a: None))  # fmt: skip
        assert tr.world == world and tr.par.fsdp == fsdp
        if fsdp:  # every resnet and transformer is its own FSDP unit, its weights sharded (the frozen teacher's too)
            assert all(hasattr(p, "full_tensor") for net in (tr.G, tr.teacher) for p in net.parameters())
        tr.step()
        tr.step()
        from sid_fast.training.state import gathered_trained_states

        states = (
            gathered_trained_states(tr.trained) if fsdp else dict(G=tr.G.state_dict(), fake_score=tr.fake.state_dict())
        )
        if rank == 0:
            torch.save({k: {n: v.clone() for n, v in s.items()} for k, s in states.items() if k in ("G", "fake_score")},
                       out)  # fmt: skip


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_one_process(sd_folder, prompt_file, tmp_path):
    """FSDP2 with diffusers' resnets and transformers as units (DDP's path is the EDM networks', tested there)."""
    import os

    import torch.multiprocessing as mp
    from support.helpers import damp_adam

    single = damp_adam(build_trainer(lsg_config(sd_folder, prompt_file, batch=4, batch_gpu=2), torch.device("cpu"),
                                     log=lambda *a: None))  # fmt: skip
    init = {k: v.clone() for k, v in single.G.state_dict().items()}
    single.step()
    single.step()
    ref = dict(G=single.G.state_dict(), fake_score=single.fake.state_dict())
    out = tmp_path / "fsdp.pt"
    mp.spawn(_dist_worker, args=(2, 29900 + os.getpid() % 97, sd_folder, prompt_file, str(out), True), nprocs=2)
    got = torch.load(out, weights_only=True)
    for net in ("G", "fake_score"):
        for k, v in ref[net].items():
            # Gradients reduce-scattered across processes are summed in another order: round-off that the damped
            # Adam keeps far below the distance each tensor moved (>= 1e-4 for the trained ones).
            travelled = (v - init[k]).abs().max().item()
            assert (got[net][k] - v).abs().max().item() <= 0.02 * travelled + 1e-6, (net, k)
    assert max((ref["G"][k] - v).abs().max().item() for k, v in init.items()) > 1e-4


def test_the_sampling_cli_makes_the_same_image_for_a_prompt_and_seed_in_any_batch(sd_folder, prompt_file, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sid_fast.t2i import sample
    from sid_fast.t2i.export import save_unet_folder
    from sid_fast.t2i.sd import load_sd

    net = save_unet_folder(tmp_path / "g", load_sd(sd_folder).unet, init_timestep=625)
    common = ["--network", str(net), "--teacher", str(sd_folder)]
    r = CliRunner().invoke(sample.main, [*common, "--prompts", str(prompt_file), "--outdir", str(tmp_path / "a"),
                                         "--batch", "2", "--grid", str(tmp_path / "grid.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"{i:06d}.png" for i in range(len(PROMPTS))]
    assert (tmp_path / "grid.png").is_file()
    # Line 3 alone (seed 3), in a batch of its own: the same pixels.
    r = CliRunner().invoke(sample.main, [*common, "--prompts", str(prompt_file), "--seeds", "3", "--outdir",
                                         str(tmp_path / "b")])  # fmt: skip
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(tmp_path / d / "000003.png")) for d in ("a", "b"))
    assert a.shape == (16, 16, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batch-size round-off
    # --resolution: PIL's LANCZOS resize of the decoded image (the official FID-30k evaluates at 256).
    r = CliRunner().invoke(sample.main, [*common, "--prompts", str(prompt_file), "--seeds", "3", "--resolution", "8",
                                         "--outdir", str(tmp_path / "r")])  # fmt: skip
    assert r.exit_code == 0, r.output
    small = np.asarray(Image.open(tmp_path / "r" / "000003.png"))
    assert np.array_equal(small, np.asarray(Image.fromarray(b).resize((8, 8), Image.LANCZOS)))
    for args, message in (
        ([], "give one of --prompt TEXT or --prompts FILE"),
        (["--prompts", str(prompt_file), "--seeds", "5"], "seed 5 has no line in"),
        (["--prompt", "a cat", "--network", str(tmp_path)], "not a sid_fast text-to-image generator"),
    ):
        r = CliRunner().invoke(sample.main, [*common, *args, "--outdir", str(tmp_path / "c")])
        assert r.exit_code != 0 and message in r.output, (args, r.output)
