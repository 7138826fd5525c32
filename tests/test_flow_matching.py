"""SiD on flow-matching teachers (sid_fast.t2i.flow, sid_fast.families.flow) on a tiny random SD3 folder saved in
diffusers' format: the conversions, the timestep law, the weights and the few-step generator against float64
formulas; two trainer iterations against the official iteration written out here from ml-sid-dit's
training/sid_dit_sd3_training_loop.py and training/sid_dit_sd3_util.py in float64, on the trainer's draws; the
refusals; the generator folder. FLUX and SANA folders the same way (their loops: training/sid_dit_flux_util.py,
training/sid_dit_util.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd3_tiny import write_tiny_flux, write_tiny_sana, write_tiny_sd3  # noqa: E402

from sid_fast.data.prompts import read_prompts  # noqa: E402
from sid_fast.families.flow import FlowFamily  # noqa: E402
from sid_fast.t2i import flow  # noqa: E402
from sid_fast.t2i.flux import load_flux  # noqa: E402
from sid_fast.t2i.sana import load_sana  # noqa: E402
from sid_fast.t2i.sd3 import load_sd3  # noqa: E402
from sid_fast.training.config import ConfigError, resolve_config  # noqa: E402
from sid_fast.training.run import build_trainer  # noqa: E402
from sid_fast.training.sid import FAKE, GEN  # noqa: E402

# The official logit mean, torch.log(torch.tensor(2.0)), evaluated where torch's default dtype is float32 (its runs).
LOG2 = float(torch.log(torch.tensor(2.0, dtype=torch.float32)))
PROMPTS = ["a cat", "the dog", "a red car on the beach at night", "the moon", "a cat on a hat"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    return write_tiny_sana(tmp_path_factory.mktemp("sana"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def flow_config(folder, prompt_file, **kw):
    values = dict(teacher=str(folder), data_prompt_text=str(prompt_file), resolution=8, channels=4, batch=4,
                  batch_gpu=2, lr=1e-3, glr=2e-3, precision="fp32", tick=1)  # fmt: skip
    return resolve_config(kw.pop("preset", "sd3-medium-sid"), dict(values, **kw))


def flow_trainer(cfg, model, prompt_file):
    family = FlowFamily(cfg, torch.device("cpu"), model, read_prompts(prompt_file))
    return build_trainer(cfg, torch.device("cpu"), family=family, log=lambda *a: None)


# ----------------------------------------------------------------------------------------------------------------
# The formulas.


def test_conversions_weights_and_step_times_equal_their_float64_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                   dtype=torch.float64)  # fmt: skip
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    tc = t.reshape(-1, 1, 1, 1)
    x_t = flow.noisy(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - tc) * x0 + tc * eps, rtol=0, atol=0)
    v = eps - x0  # the exact velocity gives back x0, and EDM's sigma of t puts x_t / (1 - t) at x0 + sigma eps
    torch.testing.assert_close(flow.x0_from_v(x_t, v, t), x0, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(x_t / (1 - tc), x0 + flow.edm_sigma(tc) * eps, rtol=1e-13, atol=1e-13)
    want = {"1_minus_sigma": 1 - t, "1_minus_sigma_squared": (1 - t) ** 2, "1_over_sigma": 1 / t,
            "1_over_sigma2": 1 / t**2, "snr_sqrt": (1 - t) / t, "snr": ((1 - t) / t) ** 2}  # fmt: skip
    for scheme, w in want.items():
        torch.testing.assert_close(flow.weight(scheme, t, x0, x0).flatten(), w, rtol=1e-14, atol=0)
    y = x0 + 0.5
    torch.testing.assert_close(flow.weight("sid_legacy", t, x0, y).flatten(), torch.full([3], 2.0, dtype=x0.dtype))
    assert set(flow.WEIGHTINGS) == set(want) | {"sid_legacy"}
    assert flow.step_times(999, 4) == [1.0, 0.75, 0.5, 0.25]
    assert flow.step_times(999, 1) == [1.0]


@pytest.mark.parametrize("scheme", ["1_minus_sigma", "sid_legacy"])
def test_a_nan_row_is_dropped_from_the_generator_loss(scheme):
    g = torch.Generator().manual_seed(4)
    x_g, y_r, y_f = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    x_bad = x_g.clone()
    x_bad[1, 0, 0, 0] = float("nan")
    rows, ok = flow.generator_loss_rows(x_bad, y_r, y_f, flow.weight(scheme, t, x_bad, y_r), 1.0)
    want, _ = flow.generator_loss_rows(x_g, y_r, y_f, flow.weight(scheme, t, x_g, y_r), 1.0)
    assert ok.tolist() == [True, False, True] and rows[1] == 0
    torch.testing.assert_close(rows[[0, 2]], want[[0, 2]], rtol=0, atol=0)


def test_the_timestep_law_is_sigmoid_of_a_normal_with_mean_log2_and_std_1_6():
    n = 40_000
    t = flow.draw_t(n, "cpu", torch.Generator().manual_seed(1), torch.float64)
    logit = torch.log(t / (1 - t))
    # The sample mean and standard deviation are within 5 standard errors of log 2 and 1.6 (a wrong law, e.g.
    # N(0, 1), misses both by more than 100 of them).
    se_mean, se_std = 1.6 / math.sqrt(n), 1.6 / math.sqrt(2 * n)
    assert abs(logit.mean().item() - math.log(2)) < 5 * se_mean
    assert abs(logit.std().item() - 1.6) < 5 * se_std
    assert 0 < t.min() and t.max() < 1


class Velocity(torch.nn.Module):
    """v = a * x + b * t (a toy velocity field with one trained parameter per term)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))

    def forward(self, x, t, cond):
        return self.a * x + self.b * t.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("noise_type", ["fresh", "fixed", "ddim"])
def test_the_few_step_generator_runs_its_steps_and_trains_only_the_last(noise_type):
    net = Velocity()
    z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for run in (1, 2, 4):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        out = flow.generate(net, z, None, 999, 4, run, noise_type, g1, train_last=True)
        # The steps written out: t_i = 1 - i/4, x_i = (1 - t_i) D + t_i n_i, D = x_i - t_i v(x_i).
        D, x, t = torch.zeros_like(z), None, None
        with torch.no_grad():
            for i in range(run - 1):
                n = z if i == 0 or noise_type == "fixed" else (
                    torch.randn(z.shape, generator=g2, dtype=z.dtype) if noise_type == "fresh"
                    else (x - (1 - t) * D) / t)  # fmt: skip
                t = 1 - i / 4
                x = (1 - t) * D + t * n
                D = x - t * (net.a * x + net.b * t)
        i = run - 1
        n = (
            z
            if i == 0 or noise_type == "fixed"
            else (torch.randn(z.shape, generator=g2, dtype=z.dtype) if noise_type == "fresh" else (x - (1 - t) * D) / t)
        )
        t = 1 - i / 4
        x = (1 - t) * D + t * n
        want = x - t * (net.a * x + net.b * t)
        torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
        # The gradient flows through the last step's network call only: d out / d a = -t x_last, d out / d b = -t^2.
        ga, gb = torch.autograd.grad(out.sum(), [net.a, net.b])
        torch.testing.assert_close(ga, (-t * x).sum(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, torch.tensor(-t * t * z.numel(), dtype=z.dtype), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# The official iteration in float64, on the trainer's draws.


class Official:
    """One process of ml-sid-dit's SD3 loop, written from its code: prompts tokenised and encoded per call (CLIP-L and
    CLIP-G penultimate states padded to T5's width and joined with T5's at 77 tokens; pooled = both projections),
    the empty prompt encoded once; guidance on the doubled batch, k steps with earlier ones detached, velocity-MSE
    and weighted SiD losses."""

    def __init__(self, tr, folder):
        self.tr, self.cfg = tr, tr.cfg
        m = self.load(folder)
        self.net, self.toks, self.encs = m.transformer, m.tokenizers, m.text_encoders
        self.G = copy.deepcopy(self.net).train().requires_grad_(True)
        self.fake = copy.deepcopy(self.net).train().requires_grad_(True)
        self.opt_fake = torch.optim.Adam(self.fake.parameters(), lr=self.cfg.lr, betas=(0.0, 0.999), eps=1e-8)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=self.cfg.glr, betas=(0.0, 0.999), eps=1e-8)
        # The empty prompt encoded once (official: `uncond_embeds` before the loop). Encoded at another batch size
        # its values differ by float64 rounding, which float32 islands of the networks (T5's RMS norm, the timestep
        # embedding) can round to float32 differences: the comparison is then only as exact as float32.
        self.uncond = self.embed([""])

    def load(self, folder):
        return load_sd3(folder, dtype=torch.float64)

    def embed(self, prompts):
        ids = [tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in self.toks]  # fmt: skip
        with torch.no_grad():
            clip, pooled = [], []
            for enc, i in zip(self.encs[:2], ids[:2]):
                out = enc(i, output_hidden_states=True)
                pooled.append(out[0])
                clip.append(out.hidden_states[-2])
            clip = torch.cat(clip, dim=-1)
            t5 = self.encs[2](ids[2])[0]
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def velocity(self, net, x, t, prompts, kappa):
        pe, pp = self.embed(prompts)
        if kappa == 1:
            return net(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pp, timestep=1000 * t.flatten(),
                       return_dict=False)[0]  # fmt: skip
        ue, up = (u.expand(len(prompts), *u.shape[1:]) for u in self.uncond)
        v = net(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([ue, pe]),
                pooled_projections=torch.cat([up, pp]), timestep=1000 * torch.cat([t, t]).flatten(),
                return_dict=False)[0]  # fmt: skip
        v_u, v_c = v.chunk(2)
        return v_u + kappa * (v_c - v_u)

    def generate(self, net, z, prompts, k, g, train):
        K, D, x, t = self.cfg.generator_steps, torch.zeros_like(z), None, None
        for i in range(k):
            if i == 0 or self.cfg.noise_type == "fixed":
                n = z
            elif self.cfg.noise_type == "fresh":
                n = torch.randn(z.shape, generator=g)
            else:
                n = ((x - (1.0 - t) * D) / t).detach()
            t = torch.full((z.shape[0],), 999 * (1.0 - i / K) / 999.0).view(-1, 1, 1, 1)
            x = (1.0 - t) * D + t * n
            if train and i == k - 1:
                x = x.detach()
                D = x - t * self.velocity(net, x, t, prompts, 1)
            else:
                with torch.no_grad():
                    D = x - t * self.velocity(net, x, t, prompts, 1)
        return D

    def prompts(self, g, b):
        return [PROMPTS[i] for i in torch.randint(len(PROMPTS), [b], generator=g).tolist()]

    def step(self):
        cfg, total, b = self.cfg, self.cfg.batch, self.cfg.batch_gpu
        k = self.tr.generator_steps_now()  # the iteration's draw (its law: the next test)
        self.opt_fake.zero_grad(set_to_none=True)
        for rnd in range(cfg.batch // b):
            g = self.tr.micro_batch_rng(FAKE, rnd)
            prompts, z = self.prompts(g, b), torch.randn([b, 4, 8, 8], generator=g)
            images = self.generate(self.G, z, prompts, k, g, train=False)
            t = torch.sigmoid(torch.normal(LOG2, 1.6, (b,), generator=g))
            noise = torch.randn(images.shape, generator=g)
            tc = t.view(-1, 1, 1, 1)
            x_t = (1 - tc) * images + tc * noise
            out = self.velocity(self.fake, x_t, t, prompts, cfg.cfg_train_fake)
            loss = torch.nn.functional.mse_loss(noise - images, out, reduction="sum") * (cfg.ls / total)
            loss.backward()
        for p in self.fake.parameters():
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt_fake.step()
        self.opt_g.zero_grad(set_to_none=True)
        for rnd in range(cfg.batch // b):
            g = self.tr.micro_batch_rng(GEN, rnd)
            prompts, z = self.prompts(g, b), torch.randn([b, 4, 8, 8], generator=g)
            t = torch.sigmoid(torch.normal(LOG2, 1.6, (b,), generator=g))
            noise = torch.randn(z.shape, generator=g)
            images = self.generate(self.G, z, prompts, k, g, train=True)
            tc = t.view(-1, 1, 1, 1)
            x_t = (1 - tc) * images + tc * noise
            y_fake = x_t - tc * self.velocity(self.fake, x_t, t, prompts, cfg.cfg_eval_fake)
            y_real = x_t - tc * self.velocity(self.net, x_t, t, prompts, cfg.cfg_eval_real)
            with torch.no_grad():
                w = {"1_minus_sigma": 1 - tc, "snr": 1 / ((tc / (1 - tc)) ** 2).clip(min=1e-5),
                     "sid_legacy": 1 / (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5),
                     }[cfg.weighting]  # fmt: skip
            if cfg.alpha == 1:
                loss = (y_real - y_fake) * (y_fake - images) * w
            else:
                loss = (y_real - y_fake) * ((y_real - images) - cfg.alpha * (y_real - y_fake)) * w
            (loss.sum() * (cfg.lsg / total)).backward()
        for p in self.G.parameters():
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt_g.step()
        return k


class FluxOfficial(Official):
    """ml-sid-dit's FLUX loop (training/sid_dit_flux_util.py): CLIP-L's pooled output at 77 tokens and T5's states at
    512; latents packed in 2x2 patches with (0, row, column) image positions and zero text positions; the transformer
    at timestep t with its guidance embedding at the call's scale (1 for G), CFG on top where the scale is not 1."""

    def load(self, folder):
        return load_flux(folder, 8, dtype=torch.float64)

    def embed(self, prompts):
        clip, t5 = self.toks
        ids_c = clip(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids_t = t5(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            pooled = self.encs[0](ids_c, output_hidden_states=False).pooler_output
            return self.encs[1](ids_t)[0], pooled

    def velocity(self, net, x, t, prompts, kappa):
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] = img_ids[..., 1] + torch.arange(h // 2)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3)
        pe, pp = self.embed(prompts)
        txt_ids = torch.zeros(pe.shape[1], 3)
        guidance = torch.tensor([kappa]).expand(b)
        if kappa == 1:
            v = net(hidden_states=packed, timestep=t.flatten(), guidance=guidance, pooled_projections=pp,
                    encoder_hidden_states=pe, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        else:
            ue, up = (u.expand(b, *u.shape[1:]) for u in self.uncond)
            v = net(hidden_states=torch.cat([packed] * 2), timestep=torch.cat([t] * 2).flatten(),
                    guidance=torch.cat([guidance] * 2), pooled_projections=torch.cat([up, pp]),
                    encoder_hidden_states=torch.cat([ue, pe]), txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]  # fmt: skip
            v_u, v_c = v.chunk(2)
            v = v_u + kappa * (v_c - v_u)
        return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class SanaOfficial(Official):
    """ml-sid-dit's SANA loop (training/sid_dit_util.py): prompts encoded by SanaPipeline.encode_prompt with the
    complex human instruction (the official call), the empty prompt without it; the transformer at timestep 1000 t
    with the states' attention mask."""

    def load(self, folder):
        from diffusers import SanaPipeline

        self.cache = {}
        m = load_sana(folder, dtype=torch.float64, text_dtype=torch.float64)
        self.pipe = SanaPipeline(tokenizer=m.tokenizers[0], text_encoder=m.text_encoders[0], vae=None,
                                 transformer=None, scheduler=None)  # fmt: skip
        return m

    def embed(self, prompts):
        key = tuple(prompts)  # Gemma over ~1,350 tokens in float64: each distinct batch of prompts encoded once
        if key not in self.cache:
            self.cache[key] = self._embed(prompts)
        return self.cache[key]

    def _embed(self, prompts):
        from sid_fast.t2i.sana import complex_human_instruction

        with torch.no_grad():
            chi = False if prompts == [""] else complex_human_instruction().split("\n")
            out = self.pipe.encode_prompt(prompts, complex_human_instruction=chi, do_classifier_free_guidance=False)
        return out[0], out[1]

    def velocity(self, net, x, t, prompts, kappa):
        pe, pm = self.embed(prompts)
        if kappa == 1:
            return net(hidden_states=x, encoder_hidden_states=pe, encoder_attention_mask=pm,
                       timestep=1000 * t.flatten(), return_dict=False)[0]  # fmt: skip
        ue, um = (u.expand(len(prompts), *u.shape[1:]) for u in self.uncond)
        v = net(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([ue, pe]),
                encoder_attention_mask=torch.cat([um, pm]), timestep=1000 * torch.cat([t, t]).flatten(),
                return_dict=False)[0]  # fmt: skip
        v_u, v_c = v.chunk(2)
        return v_u + kappa * (v_c - v_u)


def _record_gradients(opt, net, out: list) -> None:
    """Record the gradients of `net` each time `opt` steps."""
    step = opt.step

    def recording(*a, **kw):
        out.append([p.grad.detach().clone() for p in net.parameters()])
        return step(*a, **kw)

    opt.step = recording


def _max_rel(a, b, start, skip=()) -> float:
    """max over tensors (but `skip`) of |a - b| / how far training moved the tensor."""
    worst = 0.0
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if k not in skip:
            moved = (pa - start[k]).abs().max().item()
            worst = max(worst, (pa - pb).abs().max().item() / max(moved, 1e-30))
    return worst


def _noise_only(net, steps) -> set:
    """Names of `net`'s parameters whose recorded gradients are zero or rounding noise at every step (below 1e-12 of
    the network's largest entry: an exact gradient of zero, e.g. SANA's cross-attention key bias, which softmax
    ignores, or SD3's last block's unused text queries).
    Adam turns such noise g into steps lr g / (|g| + eps) that two exact computations do not share."""
    names = [n for n, _ in net.named_parameters()]
    out = set()
    for i, name in enumerate(names):
        if all(g[i].abs().max() <= 1e-12 * max(x.abs().max() for x in g) for g in steps):
            out.add(name)
    return out


def record_both(tr, ref):
    """(G's and the fake score's starting weights, {tr_/ref_ + fake/G: the gradients of every optimizer step}) of a
    trainer and its official transcription, recorded from here on."""
    start = {k: v.clone() for k, v in ref.G.state_dict().items()}
    start_fake = {k: v.clone() for k, v in ref.fake.state_dict().items()}
    grads = {}
    for key, opt, net in (("tr_fake", tr.opt_fake, tr.fake), ("ref_fake", ref.opt_fake, ref.fake),
                          ("tr_G", tr.opt_g, tr.G), ("ref_G", ref.opt_g, ref.G)):  # fmt: skip
        _record_gradients(opt, net, grads.setdefault(key, []))
    return start, start_fake, grads


def assert_trains_like(tr, ref, grads, start, start_fake) -> None:
    """The trainer's gradients equal the transcription's to 1e-11 of their largest entry (with a floor at 1e-14 of
    the network's largest gradient entry, for parameters whose exact gradient is zero), and its weights moved as the
    transcription's to 1e-6 of the distance moved."""
    for net in ("fake", "G"):
        for mine, theirs in zip(grads[f"tr_{net}"], grads[f"ref_{net}"]):
            scale = max(b.abs().max() for b in theirs)
            for a, b in zip(mine, theirs):
                assert (a - b).abs().max() <= 1e-11 * max(b.abs().max(), 1e-3 * scale), net
    # As the SiD-LSG test: Adam's first steps map a gradient rounding difference d to at most lr d / eps, ~1e-7 of the
    # movement; a wrong draw, scale, weight, guidance or detach moves it by O(1).
    assert _max_rel(tr.G, ref.G, start, _noise_only(ref.G, grads["ref_G"])) < 1e-6
    assert _max_rel(tr.fake, ref.fake, start_fake, _noise_only(ref.fake, grads["ref_fake"])) < 1e-6


@pytest.mark.parametrize(
    "kind, over",
    [
        ("sd3", dict(seed=0)),  # the presets' four steps with fresh noise, w = 1 - t, kappa 4.5
        ("sd3", dict(seed=2, noise_type="ddim", weighting="snr", cfg_train_fake=1.0, cfg_eval_fake=2.0,
                     cfg_eval_real=3.0)),
        ("sd3", dict(seed=4, noise_type="fixed", weighting="sid_legacy", alpha=1.2, generator_steps=2)),
        ("flux", dict(seed=0)),  # guidance embedding at 4.5 with CFG on top, G's at 1
        ("flux", dict(seed=2, noise_type="ddim", cfg_train_fake=1.0, cfg_eval_fake=2.0, cfg_eval_real=3.0)),
        ("sana", dict(seed=0)),  # Gemma's states with the instruction and their mask, kappa 4.5 (the example's)
    ],
)  # fmt: skip
def test_two_iterations_equal_the_official_loop_in_float64(sd3_folder, flux_folder, sana_folder, prompt_file, kind,
                                                           over):  # fmt: skip
    folder = {"sd3": sd3_folder, "flux": flux_folder, "sana": sana_folder}[kind]
    cfg = flow_config(folder, prompt_file, **over, **({"preset": "flux-dev-sid"} if kind == "flux" else {}))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = {"sd3": lambda: load_sd3(folder, dtype=torch.float64),
                 "flux": lambda: load_flux(folder, 8, dtype=torch.float64),
                 "sana": lambda: load_sana(folder, dtype=torch.float64, text_dtype=torch.float64)}[kind]()  # fmt: skip
        tr = flow_trainer(cfg, model, prompt_file)
        ref = {"sd3": Official, "flux": FluxOfficial, "sana": SanaOfficial}[kind](tr, folder)
        start, start_fake, grads = record_both(tr, ref)
        ks = []
        for _ in range(2):
            ks.append(ref.step())
            tr.step()
    finally:
        torch.set_default_dtype(default)
    assert max(ks) > 1  # a multi-step iteration was compared (the seeds are chosen so)
    # The gradients each optimizer step receives agree to float64 rounding (measured: <= 3e-14 of each tensor's
    # largest entry). A float32 value where the official code has one in float64 (or the reverse) shows as >= 1e-9:
    # e.g. log 2 in float64 instead of the official float32 moves t by 4e-10 and the gradients by 4e-8 to 5e-5.
    # A parameter whose exact gradient is zero (SANA's cross-attention key bias: softmax ignores it) holds rounding
    # noise only: its tolerance has a floor at 1e-14 of the network's largest gradient entry.
    assert_trains_like(tr, ref, grads, start, start_fake)
    # EMA off (--ema 0, as ml-sid-dit): G_ema is not updated every step (it waits, off the accelerator) and is G
    # whenever it is read (a snapshot, a training state).
    assert not all(torch.equal(a, b) for a, b in zip(tr.G_ema.parameters(), tr.G.parameters()))
    tr.refresh_ema()
    for a, b in zip(tr.G_ema.parameters(), tr.G.parameters()):
        assert torch.equal(a, b)
    moved = max((p - start[k]).abs().max().item() for k, p in tr.G.state_dict().items())
    assert moved > 1e-4


def test_the_step_count_is_uniform_on_1_to_K_and_the_same_for_every_rank(sd3_folder, prompt_file):
    cfg = flow_config(sd3_folder, prompt_file)
    tr = flow_trainer(cfg, load_sd3(sd3_folder), prompt_file)
    n, counts = 4000, [0] * 5
    for it in range(n):
        tr.cur_nimg = it * cfg.batch
        counts[tr.generator_steps_now()] += 1
    assert counts[0] == 0
    # Each of 1..4 within 5 standard deviations of n/4 (a constant k, or 0..3, fails by far).
    sd = math.sqrt(n * 0.25 * 0.75)
    assert all(abs(c - n / 4) < 5 * sd for c in counts[1:]), counts
    # k depends on the seed and the iteration only: every rank, and a trainer built again (a resumed run), agree.
    ks = [tr.generator_steps_now()]
    tr.rank = 3
    ks.append(tr.generator_steps_now())
    again = flow_trainer(cfg, load_sd3(sd3_folder), prompt_file)
    again.cur_nimg = tr.cur_nimg
    ks.append(again.generator_steps_now())
    assert len(set(ks)) == 1, ks


# ----------------------------------------------------------------------------------------------------------------
# Refusals and outputs.


def test_bad_input_is_refused_in_one_sentence(sd3_folder, prompt_file, tmp_path):
    import shutil

    from sid_fast.families import load as load_family

    for over, words in (
        (dict(method="sida", data=str(prompt_file)), "--method sida"),
        (dict(precision="fp16"), "--precision fp16"),
        (dict(metrics="fid", data_stat="x.npz"), "--metrics fid"),
        (dict(data_prompt_text=None), "--data-prompt-text is required"),
        (dict(resolution=16), "makes 4x8x8 latents"),
    ):
        with pytest.raises(ConfigError, match=words) as e:
            cfg = flow_config(sd3_folder, prompt_file, **over)
            load_family(cfg, torch.device("cpu"))
        assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")
    with pytest.raises(ConfigError, match="--noise-type 'euler': choose one of fresh, fixed, ddim"):
        resolve_config("digits", dict(generator_steps=4, noise_type="euler"))
    broken = tmp_path / "broken"
    shutil.copytree(sd3_folder, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ConfigError, match="missing text_encoder_3"):
        load_family(flow_config(broken, prompt_file), torch.device("cpu"))
    shutil.rmtree(broken)
    wide = write_tiny_sd3(tmp_path / "wide", transformer=dict(joint_attention_dim=48))
    with pytest.raises(ConfigError, match="T5's width 32 is not the transformer's joint_attention_dim 48"):
        load_family(flow_config(wide, prompt_file), torch.device("cpu"))


def test_a_run_writes_transformer_folders_and_resumes_bit_exactly(sd3_folder, prompt_file, tmp_path):
    import json

    from diffusers import SD3Transformer2DModel

    from sid_fast.training.run import run

    def config(outdir, duration, **kw):
        return flow_config(sd3_folder, prompt_file, outdir=str(outdir), duration=duration, tick=0.004, snap=1, dump=1,
                           extra_snapshots=False, seed=4, **kw)  # fmt: skip

    run_dir, status = run(config(tmp_path / "straight", 12e-6), log_to_stdout=False)
    assert status == "done"
    snaps = sorted(run_dir.glob("network-snapshot-*"))
    assert [p.name for p in snaps][-1] == "network-snapshot-000000000012"
    assert sorted(run_dir.glob("fakes-*.png"))
    net = SD3Transformer2DModel.from_pretrained(str(snaps[-1]))  # diffusers' own loader
    states = sorted(run_dir.glob("training-state-*"))
    state = torch.load(states[-1], weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["G_ema"][k]), k
        assert torch.equal(v, state["G"][k]), k  # --ema 0: what a state or a snapshot reads of G_ema is G
    meta = json.loads((snaps[-1] / "sid_fast.json").read_text())
    assert (meta["steps"], meta["init_timestep"], meta["noise_type"], meta["kimg"]) == (4, 999, "fresh", 0.012)
    # Stopped after 4 images and continued to 12 in the same directory: the same weights bit for bit (the step
    # count k and every draw come from the seed and the iteration, not from a process's history).
    part = config(tmp_path / "parts", 4e-6)
    first_dir, _ = run(part, log_to_stdout=False)
    resumed = config(tmp_path / "parts", 12e-6, run_dir=str(first_dir))
    _, status = run(resumed, log_to_stdout=False)
    assert status == "done"
    other = torch.load(sorted(first_dir.glob("training-state-*"))[-1], weights_only=True)
    ticks = [
        [json.loads(x)["kimg"] for x in (d / "stats.jsonl").read_text().splitlines()] for d in (run_dir, first_dir)
    ]
    assert ticks[0] == ticks[1]  # continued, not started again (which would log the first ticks twice)
    for key in ("G", "fake_score", "G_ema"):
        for k, v in state[key].items():
            assert torch.equal(v, other[key][k]), (key, k)
    # A (prompt, seed) pair gives the same latents whatever the batch it is sampled in.
    fam = FlowFamily(part, torch.device("cpu"), load_sd3(sd3_folder), read_prompts(prompt_file))
    one = fam.sample_latents(net, part, ["a cat"], [7], "cpu")
    two = fam.sample_latents(net, part, ["the moon", "a cat"], [1, 7], "cpu")
    torch.testing.assert_close(one[0], two[1], rtol=1e-5, atol=1e-5)
    # The sampling command on the snapshot and its teacher folder writes those images (K = 4 steps), and 2 steps
    # when asked.
    import numpy as np
    import PIL.Image
    from click.testing import CliRunner

    from sid_fast.families.flow import decode_flow
    from sid_fast.t2i import sample

    for steps, out in ((None, tmp_path / "s4"), (2, tmp_path / "s2")):
        args = ["--network", str(snaps[-1]), "--teacher", str(sd3_folder), "--prompt", "a cat", "--seeds", "7",
                "--outdir", str(out)] + (["--steps", str(steps)] if steps else [])  # fmt: skip
        r = CliRunner().invoke(sample.main, args)
        assert r.exit_code == 0, r.output
    want = decode_flow(fam.model.vae, one, "cpu")[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "s4" / "000000.png")), want)
    two_steps = np.asarray(PIL.Image.open(tmp_path / "s2" / "000000.png"))
    assert two_steps.shape == want.shape and not np.array_equal(two_steps, want)


def _fsdp_worker(rank, world, port, folder, prompt_file, out):
    from support.helpers import damp_adam, gloo_process

    from sid_fast.training.state import gathered_trained_states

    with gloo_process(rank, world, port):
        tr = damp_adam(build_trainer(flow_config(folder, prompt_file, fsdp=True, seed=4), torch.device("cpu"),
                                     log=lambda *a: None))  # fmt: skip
        # every MMDiT block is its own FSDP unit, its weights sharded (the frozen teacher's too)
        assert all(hasattr(p, "full_tensor") for net in (tr.G, tr.teacher) for p in net.parameters())
        tr.step()
        tr.step()
        states = gathered_trained_states(tr.trained)
        if rank == 0:
            torch.save({k: {n: v.clone() for n, v in states[k].items()} for k in ("G", "fake_score")}, out)


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_one_process(sd3_folder, prompt_file, tmp_path):
    """FSDP2 over the three transformers (each MMDiT block a unit) on two gloo processes equals one process, the
    four-step generator's k included."""
    import os

    import torch.multiprocessing as mp
    from support.helpers import damp_adam

    single = damp_adam(build_trainer(flow_config(sd3_folder, prompt_file, seed=4), torch.device("cpu"),
                                     log=lambda *a: None))  # fmt: skip
    init = {k: v.clone() for k, v in single.G.state_dict().items()}
    single.step()
    single.step()
    ref = dict(G=single.G.state_dict(), fake_score=single.fake.state_dict())
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, 29800 + os.getpid() % 97, sd3_folder, prompt_file, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    for net in ("G", "fake_score"):
        for k, v in ref[net].items():
            # Reduce-scattered gradients are summed in another order: round-off that the damped Adam keeps far below
            # the distance each tensor moved.
            travelled = (v - init[k]).abs().max().item()
            assert (got[net][k] - v).abs().max().item() <= 0.02 * travelled + 1e-6, (net, k)
    assert max((ref["G"][k] - v).abs().max().item() for k, v in init.items()) > 1e-4


def test_checkpointing_changes_nothing_and_bf16_stays_close(sd3_folder, prompt_file):
    """--checkpointing selective (diffusers' per-block recomputation on the teacher, G and the fake score) gives the
    same step bit for bit in fp32; bf16 autocast with fp32 masters stays within bf16's reach of it."""
    runs = {}
    for name, over in (("fp32", dict(checkpointing="none")), ("ckpt", dict(checkpointing="selective")),
                       ("bf16", dict(precision="bf16", checkpointing="none"))):  # fmt: skip
        tr = flow_trainer(flow_config(sd3_folder, prompt_file, seed=4, **over), load_sd3(sd3_folder), prompt_file)
        start = {k: v.clone() for k, v in tr.G.state_dict().items()}
        tr.step()
        runs[name] = ({k: v - start[k] for k, v in tr.G.state_dict().items()}, tr.stats.reduce())
    for k, d in runs["fp32"][0].items():
        assert torch.equal(d, runs["ckpt"][0][k]), k
    # bf16 keeps ~3 significant digits per operation: the step's updates agree in direction (cosine) and in size.
    a = torch.cat([d.flatten() for d in runs["fp32"][0].values()])
    b = torch.cat([d.flatten() for d in runs["bf16"][0].values()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert 0.5 < b.norm() / a.norm() < 2
    assert all(math.isfinite(float(v)) for v in runs["bf16"][1].values())


def test_a_flux_folder_is_detected_loaded_trained_and_written(flux_folder, prompt_file, tmp_path):
    import shutil

    from diffusers import FluxTransformer2DModel

    from sid_fast.families import detect
    from sid_fast.families import load as load_family
    from sid_fast.families.flow import FlowFamily

    cfg = flow_config(flux_folder, prompt_file, preset="flux-dev-sid", seed=4)
    assert detect(cfg) is FlowFamily
    fam = load_family(cfg, torch.device("cpu"))
    tr = build_trainer(cfg, torch.device("cpu"), family=fam, log=lambda *a: None)
    tr.step()
    tr.refresh_ema()  # --ema 0: G_ema is G when read
    folder = fam.write_generator(tmp_path / "gen", tr.nets, cfg, 0.004)
    net = FluxTransformer2DModel.from_pretrained(str(folder))
    for a, b in zip(net.state_dict().values(), tr.G_ema.state_dict().values()):
        assert torch.equal(a, b)
    # A training state exports to the same folder through the recorded class.
    out = FlowFamily.export(tr.state_dict(), "state.pt", tmp_path / "exported", overwrite=False)
    again = FluxTransformer2DModel.from_pretrained(str(out))
    for a, b in zip(again.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    broken = tmp_path / "broken"
    shutil.copytree(flux_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="missing text_encoder_2"):
        load_family(flow_config(broken, prompt_file, preset="flux-dev-sid"), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_warm_fast_path_dit_step_has_no_capture_guard_finding(sd3_folder, flux_folder, prompt_file, kind):
    """The capture guard (sid_fast.guard) over a warm bf16 + fused-Adam + fused-adaLN step of a DiT teacher with two
    micro-batches per phase and the iteration's k = 4 generator steps: no host read, host copy or CPU-generator draw
    into a device tensor (prompt indices come from a host copy of the micro-batch's seed, tokens from the per-run
    cache)."""
    from sid_fast.guard import CaptureGuard

    folder, preset = (sd3_folder, "sd3-medium-sid") if kind == "sd3" else (flux_folder, "flux-dev-sid")
    cfg = flow_config(folder, prompt_file, preset=preset, precision="bf16", optimizer="fused", seed=2,
                      kernels="ada_norm")  # fmt: skip
    model = load_sd3(folder) if kind == "sd3" else load_flux(folder, 8)
    tr = flow_trainer(cfg, model, prompt_file)
    tr.step()  # warm-up: constants are made on the device at their first use
    assert tr.generator_steps_now() == 4  # seed 2's second iteration runs all four generator steps
    with CaptureGuard() as g:
        tr.step()
    assert [str(f) for f in g.failures()] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_instruction_prefix_gives_the_whole_sequences_states_at_a_quarter_of_gemmas_flops(sana_folder, dtype):
    """SANA's instruction is run through Gemma once (sid_fast.t2i.sana.InstructionPrefix): every instructed prompt's
    kept states equal those of the whole sequence (float64: to rounding; bf16 on this CPU: measured equal, asserted
    to one bf16 step of their scale), the instruction's tokens up to the boundary form the prefix, and ids that do
    not start with it (the empty prompt's) run whole."""
    from torch.utils.flop_counter import FlopCounterMode

    from sid_fast.t2i.sana import MAX_SEQUENCE

    model = load_sana(sana_folder, dtype=torch.float32, text_dtype=dtype)
    prompts = ["A cat", "the dog on a hat", "x", "Über café 12", "a red car on the beach at night", "."]
    ids = model.tokenize(prompts)
    plain = load_sana(sana_folder, dtype=torch.float32, text_dtype=dtype)
    plain.prefix_cache = False
    prefix = model.prefix_ids()
    n_instr = len(model.tokenizers[0].encode(model.instruction))  # with the start token
    assert n_instr - 3 <= len(prefix) <= min(n_instr, model.length - MAX_SEQUENCE + 1)
    assert (ids[0][:, : len(prefix)] == prefix).all()
    counts = []
    for m in (plain, model, model):  # the prefix is made at the first call and reused at the second
        with FlopCounterMode(display=False) as fc:
            out = m.encode_ids([ids[0].clone()])
        counts.append(fc.get_total_flops())
        if m is plain:
            ref = out
        else:
            got = out
    assert torch.equal(got["encoder_attention_mask"], ref["encoder_attention_mask"])
    a, b = got["encoder_hidden_states"].double(), ref["encoder_hidden_states"].double()
    tol = 1e-12 if dtype == torch.float64 else 2**-7
    assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()
    # Gemma over the 299-token suffix (plus the kept tail's attention to the prefix) against the whole ~1,350 tokens.
    assert counts[2] < 0.3 * counts[0], counts
    # The comparison sees the cache's reset: without it the second call runs over the first call's keys too.
    from sid_fast.t2i.sana import InstructionPrefix

    stale = load_sana(sana_folder, dtype=torch.float32, text_dtype=dtype)
    reset, InstructionPrefix._reset = InstructionPrefix._reset, lambda self, cache, n: None
    try:
        stale.encode_ids([ids[0].clone()])
        wrong = stale.encode_ids([ids[0].clone()])["encoder_hidden_states"].double()
    finally:
        InstructionPrefix._reset = reset
    assert (wrong - b).abs().max() > tol * b.abs().max()  # bf16: 0.026 of the scale against one step of 0.0078
    # The empty prompt's ids (no instruction) do not start with the prefix: encoded whole, as before.
    blank = model.blank_ids(2)
    assert not model._prefix(torch.device("cpu")).starts(blank[0])
    assert torch.equal(
        model.encode_ids(blank)["encoder_hidden_states"], plain.encode_ids(blank)["encoder_hidden_states"]
    )


def test_a_sana_folder_is_detected_trained_written_and_sampled(sana_folder, prompt_file, tmp_path):
    """SANA: detected by its model_index.json, Gemma kept in bf16 (the official loop's), a step with the bf16 fast
    path (no capture-guard finding when warm), a SanaTransformer2DModel folder, a training state exported through
    the recorded class, the sampling command's images, and a folder without its text encoder refused."""
    import shutil

    from click.testing import CliRunner
    from diffusers import SanaTransformer2DModel

    from sid_fast.families import detect
    from sid_fast.families import load as load_family
    from sid_fast.guard import CaptureGuard
    from sid_fast.t2i import sample

    cfg = flow_config(sana_folder, prompt_file, seed=4, precision="bf16", optimizer="fused", checkpointing="none")
    assert detect(cfg) is FlowFamily
    fam = load_family(cfg, torch.device("cpu"))
    assert fam.model.text_encoders[0].dtype == torch.bfloat16
    tr = build_trainer(cfg, torch.device("cpu"), family=fam, log=lambda *a: None)
    tr.step()
    with CaptureGuard() as g:
        tr.step()
    assert [str(f) for f in g.failures()] == []
    tr.refresh_ema()
    folder = fam.write_generator(tmp_path / "gen", tr.nets, cfg, 0.008)
    net = SanaTransformer2DModel.from_pretrained(str(folder))
    for a, b in zip(net.state_dict().values(), tr.G_ema.state_dict().values()):
        assert torch.equal(a, b)
    out = FlowFamily.export(tr.state_dict(), "state.pt", tmp_path / "exported", overwrite=False)
    again = SanaTransformer2DModel.from_pretrained(str(out))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    r = CliRunner().invoke(sample.main, ["--network", str(folder), "--teacher", str(sana_folder), "--prompt", "a cat",
                                         "--seeds", "0-1", "--outdir", str(tmp_path / "png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == ["000000.png", "000001.png"]
    broken = tmp_path / "broken"
    shutil.copytree(sana_folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ConfigError, match="a SANA folder needs .*; missing text_encoder"):
        load_family(flow_config(broken, prompt_file), torch.device("cpu"))
