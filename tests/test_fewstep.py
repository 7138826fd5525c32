"""Few-step generators for the EDM and Stable Diffusion families (sid_fast.fewstep): the levels against their
formulas; the EDM trainer's K-step generator against the steps written out, with its gradient through the last step
only; two SiD-LSG iterations of a K-step generator against the official iteration of tests/test_t2i_lsg.py with the
steps written out (float64, the trainer's draws, the mixture's k included; a planted level law caught); a K-step run's
generator folder, its samplers and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from support.helpers import cfg_for, cpu_trainer

from sid_fast import fewstep
from sid_fast.training.config import ConfigError, resolve_config

# ----------------------------------------------------------------------------------------------------------------
# The levels.


def test_the_levels_follow_their_formulas():
    # EDM: flow time t = sigma / (1 + sigma), t_i = t_0 (1 - i / K), back by sigma = t / (1 - t).
    for sigma_init, K in ((2.5, 4), (2.5, 1), (0.7, 3), (80.0, 6)):
        t0 = sigma_init / (1 + sigma_init)
        want = [t0 * (K - i) / K / (1 - t0 * (K - i) / K) for i in range(K)]
        got = fewstep.edm_sigmas(sigma_init, K)
        assert got[0] == sigma_init and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(got, want)), got
        assert all(a > b > 0 for a, b in zip(got, got[1:]))
    assert [round(s, 4) for s in fewstep.edm_sigmas(2.5, 4)] == [2.5, 1.1538, 0.5556, 0.2174]
    # Stable Diffusion: round half up of T (K - i) / K, in integers: floor((2 T (K - i) + K) / 2K).
    assert fewstep.timestep_indices(625, 4) == [625, 469, 313, 156]
    assert fewstep.timestep_indices(999, 4) == [999, 749, 500, 250]
    for T in (1, 2, 7, 625, 999):
        for K in range(1, min(T, 9) + 1):
            got = fewstep.timestep_indices(T, K)
            assert got == [(2 * T * (K - i) + K) // (2 * K) for i in range(K)]
            assert got[0] == T and got[-1] >= 1 and all(a > b for a, b in zip(got, got[1:]))  # distinct when K <= T
    z = torch.zeros(1, 1, 2, 2)
    for run, noise in ((0, "fresh"), (3, "fresh"), (1, "euler")):
        with pytest.raises(ValueError, match="run 0|run 3|unknown noise type"):
            fewstep.generate(lambda x, lvl: x, lambda lvl: (1.0, lvl), [1.0, 0.5], z, run, noise)


# ----------------------------------------------------------------------------------------------------------------
# The EDM family: the trainer's generator against the steps written out.


@pytest.mark.parametrize("noise_type", ["fresh", "fixed", "ddim"])
def test_the_edm_k_step_generator_runs_its_levels_and_trains_only_the_last(teacher_file, noise_type):
    """x_i = D_{i-1} + sigma_i n_i, D_i = G(x_i, sigma_i, labels, zero augment labels), at the sigmas written out;
    the gradient of G's parameters comes from the last call alone (its input detached). Planted: the same steps with
    the gradient through every call give other gradients, which the comparison sees."""
    tr = cpu_trainer(cfg_for(teacher_file, generator_steps=3, noise_type=noise_type, dropout=0.0))  # G deterministic
    K, G = 3, tr.G.train().requires_grad_(True)
    t0 = 2.5 / 3.5
    sigmas = [2.5] + [t0 * (K - i) / K / (1 - t0 * (K - i) / K) for i in range(1, K)]
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.eye(3)[torch.tensor([0, 2, 1, 1])]
    aug = torch.zeros(4, G.model.map_augment.in_features)
    params = [p for p in G.parameters()]

    def written_out(run, g, detach_earlier: bool):
        D, x, s_prev = torch.zeros_like(z), None, None
        for i in range(run):
            n = z if i == 0 or noise_type == "fixed" else (
                torch.randn(z.shape, generator=g) if noise_type == "fresh" else (x - D) / s_prev)  # fmt: skip
            sigma = torch.full([4, 1, 1, 1], sigmas[i])
            with torch.set_grad_enabled(i == run - 1 or not detach_earlier):
                x = D + sigmas[i] * n
                if i == run - 1 and detach_earlier:
                    x = x.detach()
                D = G(x, sigma, labels, augment_labels=aug)
            s_prev = sigmas[i]
        return D

    for run in (1, 2, 3):
        out = tr.denoiser.generate(tr.calls.G_train, z, labels, run, torch.Generator().manual_seed(7), train=True)
        grads = torch.autograd.grad(out.square().sum(), params)
        want = written_out(run, torch.Generator().manual_seed(7), True)
        want_grads = torch.autograd.grad(want.square().sum(), params)
        # The same float32 operations in the same order: equal up to float32 rounding of the network (1e-5 of scale).
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        scale = max(g.abs().max().item() for g in want_grads)
        assert max((a - b).abs().max().item() for a, b in zip(grads, want_grads)) < 1e-4 * scale
        if run > 1:
            through = written_out(run, torch.Generator().manual_seed(7), False)
            planted = torch.autograd.grad(through.square().sum(), params)
            assert max((a - b).abs().max().item() for a, b in zip(grads, planted)) > 1e-2 * scale


def test_a_k_step_edm_run_writes_its_steps_and_the_samplers_follow_them(tmp_path):
    """A K-step digits run's generator folder records steps and re-noising; `python -m sid_fast.sample`'s sampler
    (auto) draws what the run's own evaluation draws, per seed in any batch (to the network's float32 rounding);
    --sampler onestep is its first step; the card names the steps; the export package refuses it."""
    from sid_fast.checkpoints import load_network_file
    from sid_fast.export import ExportError, generator_from_file
    from sid_fast.families import load as load_family
    from sid_fast.sampling import generate, onestep_sample
    from sid_fast.training.run import run

    cfg = resolve_config("digits", dict(outdir=str(tmp_path / "runs"), batch=32, batch_gpu=32, tick=0.032, dump=1,
                                        snap=1, metrics="none", duration=0.000064, generator_steps=4,
                                        noise_type="fresh"))  # fmt: skip
    run(cfg, log_to_stdout=False)
    snap = sorted((tmp_path / "runs").glob("*/network-snapshot-*"))[-1]
    net, info = load_network_file(snap)
    assert (info["meta"]["steps"], info["meta"]["noise_type"], info["meta"]["sigma_init"]) == (4, "fresh", 2.5)
    assert "# 4-step generator distilled" in (snap / "README.md").read_text()
    family = load_family(cfg, torch.device("cpu"))
    seeds = [3, 11, 12, 40]
    with torch.no_grad():
        ours = family.sample(net, cfg, seeds, "cpu")
        cli = generate(net, info, seeds, "cpu")
        split = torch.cat([generate(net, info, seeds[:1], "cpu"), generate(net, info, seeds[1:], "cpu")])
        first = generate(net, info, seeds, "cpu", sampler="onestep")
        z = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    assert torch.equal(ours, cli)
    # Another batch: the network's batch-dependent float32 rounding only (each seed's z and noises are its own).
    torch.testing.assert_close(split, cli, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, onestep_sample(net, z, 2.5), rtol=0, atol=0)
    assert (ours - first).abs().max() > 1e-3  # four steps are not the first step
    with pytest.raises(ExportError, match="a 4-step generator; the export package holds one-step generators"):
        generator_from_file(snap)


def test_k_step_refusals_name_the_flag():
    with pytest.raises(ConfigError, match="--noise-type 'euler': choose one of fresh, fixed, ddim."):
        resolve_config("digits", dict(generator_steps=2, noise_type="euler"))


# ----------------------------------------------------------------------------------------------------------------
# The Stable Diffusion family: two iterations against the official formulas with the K steps written out.

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import write_tiny_sd  # noqa: E402
from test_t2i_lsg import PROMPTS, Official, _max_rel, lsg_config, sd_trainer  # noqa: E402

from sid_fast.t2i.sd import load_sd  # noqa: E402


class KStepOfficial(Official):
    """The official SiD-LSG iteration with G's one step replaced by K steps written out: timesteps round half up of
    init_timestep (1 - i / K), x_i = sqrt(abar) D_{i-1} + sqrt(1 - abar) n_i, D_i the x0-prediction; this iteration's
    k from the trainer (the same on every rank); fresh re-noising drawn from the micro-batch's generator after its
    other draws (the fake phase: before t and eps; the generator phase: after them); in the generator phase steps
    0..k-2 without gradient and step k-1 on its detached input."""

    def draws(self, phase, rnd, dropout):
        out = super().draws(phase, rnd, dropout)
        self.g = self.tr.micro_batch_rng(phase, rnd, reseed=False)  # the same generator, after the draws
        return out

    def timesteps(self):
        K, T = self.cfg.generator_steps, self.cfg.init_timestep
        return [int(math.floor(T * (K - i) / K + 0.5)) for i in range(K)]

    def sample(self, net, z, prompts):
        k, train = self.tr.generator_steps_now(), torch.is_grad_enabled()
        D, x, a_prev = torch.zeros_like(z), None, None
        cond = self.embed(prompts)
        for i, ti in enumerate(self.timesteps()[:k]):
            if i == 0 or self.cfg.noise_type == "fixed":
                n = z
            elif self.cfg.noise_type == "fresh":
                n = torch.randn(z.shape, generator=self.g)
            else:
                n = (x - a_prev.sqrt() * D) / (1 - a_prev).sqrt()
            t = torch.full([len(prompts)], ti, dtype=torch.long)
            a = self.abar[ti]
            with torch.set_grad_enabled(train and i == k - 1):
                x = a.sqrt() * D + (1 - a).sqrt() * n
                if train and i == k - 1:
                    x = x.detach()
                out = self.call(net, x, t, cond)
                D = (x - (1 - a).sqrt() * out) / a.sqrt()
            a_prev = a
        return D


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _two_iterations(cfg, sd_folder, prompt_file):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tr = sd_trainer(cfg, load_sd(sd_folder, dtype=torch.float64), prompt_file, log=lambda *a: None)
        ref = KStepOfficial(tr, sd_folder)
        start = {k: v.clone() for k, v in ref.G.state_dict().items()}
        ks = []
        for _ in range(2):
            ks.append(tr.generator_steps_now())
            ref.step()
            tr.step()
    finally:
        torch.set_default_dtype(default)
    return tr, ref, start, ks


@pytest.mark.parametrize("noise_type", ["fresh", "ddim"])
def test_two_sd_iterations_of_a_k_step_generator_equal_the_official_formulas(sd_folder, prompt_file, noise_type,
                                                                              monkeypatch):  # fmt: skip
    """In float64, on the trainer's draws."""
    cfg = lsg_config(sd_folder, prompt_file, generator_steps=3, noise_type=noise_type, seed=5)
    tr, ref, start, ks = _two_iterations(cfg, sd_folder, prompt_file)
    assert ks == [3, 2]  # seed 5 draws k = 3, then 2: every re-noising rule and the detach rule run
    # As tests/test_t2i_lsg.py: float64 rounding through Adam's first step, 1e-7 of the movement at worst.
    assert _max_rel(tr.G, ref.G, start) < 1e-6
    assert _max_rel(tr.G_ema, ref.G_ema, start) < 1e-6
    assert max((p - start[k]).abs().max().item() for k, p in tr.G.state_dict().items()) > 1e-4
    if noise_type == "fresh":  # planted: every step at init_timestep (levels not lowered); the comparison sees it
        monkeypatch.setattr(fewstep, "timestep_indices", lambda T, K: [T] * K)
        tr, ref, start, _ = _two_iterations(cfg, sd_folder, prompt_file)
        assert _max_rel(tr.G, ref.G, start) > 1e-3


def test_a_k_step_sd_generator_folder_records_its_steps_and_samples_per_seed(sd_folder, prompt_file, tmp_path):
    """The generator folder of a K-step SiD-LSG trainer records steps and re-noising; sid_fast.t2i.sample's latents
    equal the family's own (the snapshot grid's) per (prompt, seed) in any batch; a pipeline folder is refused."""
    from sid_fast.t2i import export
    from sid_fast.t2i.sample import generate

    cfg = lsg_config(sd_folder, prompt_file, generator_steps=3, noise_type="fresh")
    tr = sd_trainer(cfg, load_sd(sd_folder), prompt_file, log=lambda *a: None)
    tr.step()
    folder = tr.family.write_generator(tmp_path / "gen", _nets(tr), cfg, 0.006)
    meta = json.loads((folder / export.SID_META).read_text())
    assert (meta["steps"], meta["noise_type"], meta["init_timestep"]) == (3, "fresh", 625)
    card = (folder / export.CARD).read_text()
    assert "# 3-step text-to-image generator" in card and "625, 417, 208" in card and "DDIMScheduler" not in card
    unet, _ = export.load_unet_folder(folder)
    prompts, seeds = ["a cat", "the moon", "the dog"], [4, 9, 1]
    with torch.no_grad():
        ours = tr.family.sample_latents(unet, cfg, prompts, seeds, "cpu")
    images = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        generate(str(folder), str(sd_folder), [(i, p, s) for i, (p, s) in enumerate(zip(prompts, seeds))], out, batch,
                 torch.float32, "cpu", log=lambda *a: None)  # fmt: skip
        images[batch] = sorted(p.read_bytes() for p in out.glob("*.png"))
    assert images[1] == images[3]
    want = export.decode(tr.family.sd.vae, ours, "cpu").permute(0, 2, 3, 1).numpy()
    want = want[..., 0] if want.shape[-1] == 1 else want
    got = np.stack([np.asarray(PIL.Image.open(tmp_path / "out3" / f"{i:06d}.png")) for i in range(3)])
    assert np.array_equal(got, want), "the sampler's images are not G's"
    with pytest.raises(export.SDError, match="a 3-step generator; a pipeline folder's scheduler holds one-step"):
        export.save_pipeline_folder(tmp_path / "pipe", folder, sd_folder)


def _nets(tr):
    from sid_fast.families.base import Networks

    return Networks(tr.teacher, tr.G, tr.fake, tr.G_ema, "", {}, {}, {})
