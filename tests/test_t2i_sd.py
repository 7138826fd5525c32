"""Stable Diffusion teachers for SiD-LSG (sid_fast.t2i.sd): the official numerics against diffusers' own scheduler
(the calls the official code makes) in float32 and against the formulas in float64, guidance as one doubled call,
the fake-score losses, text encoding, and the refusals, on a tiny randomly initialised SD folder that diffusers and
transformers save and load in their own format."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import TINY_VAE, write_tiny_sd  # noqa: E402

from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.t2i.sd import (  # noqa: E402
    OFFICIAL_INIT_TIMESTEP,
    SDError,
    check_guidance,
    drop_prompts,
    fake_score_loss_rows,
    guided_output,
    load_sd,
    unet_model,
)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load_sd(write_tiny_sd(tmp_path_factory.mktemp("sd")))


def _ddpm(sd):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(sd.folder), subfolder="scheduler")


def test_the_test_folder_is_a_stable_diffusion_folder_to_diffusers_too(sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd.folder))
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.tokenizer.model_max_length == 77


def test_the_schedule_is_diffusers_own_bit_for_bit_in_float32(sd):
    sched, s = _ddpm(sd), sd.schedule
    assert s.alphas_cumprod.dtype == torch.float32 and not s.clip_sample
    # SD's scaled-linear schedule: abar_625 = 0.1378, EDM's sigma 2.50 (SiD's init_sigma).
    t_init = torch.tensor([OFFICIAL_INIT_TIMESTEP])
    assert float(s.alphas_cumprod[625]) == pytest.approx(0.13777, abs=1e-5)
    assert float(s.sigma(t_init)) == pytest.approx(2.50, abs=0.005)
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0, 20, 500, 625, 979])
    assert torch.equal(s.add_noise(x0, eps, t), sched.add_noise(x0, eps, t))
    assert torch.equal(s.velocity(x0, eps, t), sched.get_velocity(x0, eps, t))
    x_t = s.add_noise(x0, eps, t)
    per_sample = torch.cat(
        [sched.step(out[i : i + 1], int(t[i]), x_t[i : i + 1]).pred_original_sample for i in range(5)]
    )
    assert torch.equal(s.x0(x_t, out, t), per_sample)  # the official x0: scheduler.step per sample
    z = torch.randn(2, 4, 8, 8, generator=g)
    t2 = t_init.expand(2)
    assert torch.equal(s.generator_input(z, t2), sched.add_noise(torch.zeros_like(z), z, t2))


def test_the_schedule_in_float64_is_the_formula(sd):
    s = sd.schedule
    g = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([20, 300, 625, 979])
    a = s.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(s.x0(x_t, out, t), (x_t - (1 - a).sqrt() * out) / a.sqrt(), rtol=1e-14, atol=1e-14)
    # With the true noise the x0-prediction recovers x0; EDM's view: x_t / sqrt(abar) = x0 + sigma eps.
    torch.testing.assert_close(s.x0(x_t, eps, t), x0, rtol=1e-12, atol=1e-12)
    sigma = s.sigma(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t / a.sqrt(), x0 + sigma * eps, rtol=1e-12, atol=1e-12)
    draws = s.draw_timesteps(20000, 20, 980, "cpu", torch.Generator().manual_seed(0))
    assert int(draws.min()) == 20 and int(draws.max()) == 979


def test_guidance_is_one_doubled_call_and_commutes_with_the_x0_conversion(sd):
    unet = sd.unet.double()
    try:
        g = torch.Generator().manual_seed(2)
        x_t = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        t = torch.tensor([100, 625, 900])
        cond = sd.encode_text(["a cat", "the dog", "a handwritten seven"]).double()
        uncond = sd.encode_text([""]).double()
        with torch.no_grad():
            e_c = unet(x_t, t, encoder_hidden_states=cond).sample
            e_u = unet(x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
            for kappa in (1.0, 1.5, 4.5):
                got = guided_output(unet_model(unet), x_t, t, cond, uncond, kappa)
                want = e_c if kappa == 1 else e_u + kappa * (e_c - e_u)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
                # x0 is affine in the output at fixed x_t: guiding x0-predictions is the same number.
                s = sd.schedule
                x0_u, x0_c = s.x0(x_t, e_u, t), s.x0(x_t, e_c, t)
                torch.testing.assert_close(s.x0(x_t, got, t), x0_u + kappa * (x0_c - x0_u), rtol=1e-9, atol=1e-9)
    finally:
        sd.unet.float()


def test_fake_score_losses_in_float64(sd, tmp_path):
    s = sd.schedule
    g = torch.Generator().manual_seed(3)
    x0, eps, out = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([20, 625, 979])
    rows, ok = fake_score_loss_rows(s, out, x0, eps, t)
    torch.testing.assert_close(rows, ((out - eps) ** 2).sum((1, 2, 3)), rtol=1e-14, atol=0)
    assert ok.all()
    out[1, 0, 0, 0] = float("nan")
    rows, ok = fake_score_loss_rows(s, out, x0, eps, t)
    assert ok.tolist() == [True, False, True] and rows[1] == 0
    # v-prediction: the velocity target weighted by snr / (snr + 1) (diffusers' compute_snr).
    folder = shutil.copytree(sd.folder, tmp_path / "v")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), prediction_type="v_prediction")))
    v = load_sd(folder).schedule
    out[1, 0, 0, 0] = 0.0
    a = v.alphas_cumprod.double()[t]
    snr = a / (1 - a)
    target = a.sqrt().reshape(-1, 1, 1, 1) * eps - (1 - a).sqrt().reshape(-1, 1, 1, 1) * x0
    rows, _ = fake_score_loss_rows(v, out, x0, eps, t)
    torch.testing.assert_close(rows, (snr / (snr + 1)) * ((out - target) ** 2).sum((1, 2, 3)), rtol=1e-12, atol=0)
    # v-prediction's x0: sqrt(abar) x_t - sqrt(1 - abar) v.
    x_t = v.add_noise(x0, eps, t)
    torch.testing.assert_close(v.x0(x_t, target, t), x0, rtol=1e-12, atol=1e-12)


def test_text_encoding_pads_and_truncates_as_the_tokenizer_limit_says(sd):
    long = " ".join(["seven"] * 100)  # far beyond 77 tokens: truncated, as the official code does
    emb = sd.encode_text(["a handwritten seven", "", long])
    assert emb.shape == (3, 77, 32)
    ids = sd.tokenizer([long], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[-1] == sd.tokenizer.eos_token_id
    torch.testing.assert_close(sd.encode_text([""])[0], emb[1])


def test_prompt_dropout_and_guidance_flags():
    assert check_guidance(1, 1, 4.5) == 0.0  # long guidance only: no dropout
    assert check_guidance(2, 2, 2) == 0.1 and check_guidance(0.5, 1, 1) == 0.1
    with pytest.raises(SDError, match=r"--cfg-train-fake 0: a guidance scale must be > 0"):
        check_guidance(0, 1, 1)
    with pytest.raises(SDError, match=r"--cfg-eval-real -1.5"):
        check_guidance(1, 1, -1.5)
    prompts = [f"p{i}" for i in range(20000)]
    dropped = drop_prompts(prompts, 0.1, torch.Generator().manual_seed(0))
    n = sum(d == "" for d in dropped)
    assert abs(n - 2000) < 5 * (20000 * 0.1 * 0.9) ** 0.5  # binomial(20000, 0.1) within 5 sigma
    assert all(d in ("", p) for d, p in zip(dropped, prompts))
    assert drop_prompts(prompts[:3], 0.0) == prompts[:3]


def test_prompt_files(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(p) == ["a cat", "a dog"]
    # CRLF, whitespace-only lines, non-ASCII text, no final newline: what str.splitlines and strip keep.
    text = "  \t \r\nune crêpe au café\r\n\n\x0b\n猫が座っている\n a\tb \nlast line"
    p.write_bytes(text.encode())
    want = [s.strip() for s in text.split("\n") if s.strip()]
    got = read_prompts(p)
    assert len(got) == 4 and list(got) == want and got[-1] == "last line" and got[1] == "猫が座っている"
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptError, match=r"empty.txt: the prompt file holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PromptError, match=r"bin.txt: not a UTF-8 text file"):
        read_prompts(tmp_path / "bin.txt")
    with pytest.raises(PromptError, match=r"none.txt: no such prompt file"):
        read_prompts(tmp_path / "none.txt")


def test_folders_that_are_not_stable_diffusion_are_refused_in_one_sentence(sd, tmp_path):
    from diffusers import AutoencoderKL
    from support.sd_tiny import write_text_encoder

    with pytest.raises(SDError, match=r"nothing: no such folder"):
        load_sd(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SDError, match=r"plain: not a diffusers model folder \(no model_index.json\)"):
        load_sd(tmp_path / "plain")
    other = tmp_path / "ddpm"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": [], "scheduler": []}))
    with pytest.raises(SDError, match=r"ddpm: a diffusers folder of DDPMPipeline, not Stable Diffusion"):
        load_sd(other)
    bad_vae = shutil.copytree(sd.folder, tmp_path / "vae3")  # the tiny model with one component replaced
    AutoencoderKL(**dict(TINY_VAE, latent_channels=3)).save_pretrained(str(bad_vae / "vae"))
    with pytest.raises(SDError, match=r"vae3: the VAE makes 3-channel latents but the UNet takes 4"):
        load_sd(bad_vae)
    bad_text = shutil.copytree(sd.folder, tmp_path / "text48")
    write_text_encoder(bad_text, 48)
    with pytest.raises(
        SDError, match=r"text48: the text encoder's width 48 is not the UNet's cross-attention width 32"
    ):
        load_sd(bad_text)
    broken = shutil.copytree(sd.folder, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SDError, match=r"broken: a component does not load"):
        load_sd(broken)


@pytest.mark.parametrize("name, params", [("sd15", 859_520_964), ("sd21-base", 865_910_724), ("sdxl", 2_567_463_684)])
def test_public_unet_configurations_count_as_the_released_models(name, params):
    """The UNets of SD 1.5, SD 2.1-base and SDXL built on the meta device (no weights) from their public configurations
    have the released models' parameter counts; SD 1.5's forward at 64 x 64 latents and 77 tokens is 803.3 GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    from sid_fast.t2i.configs import build_unet, unet_inputs

    unet = build_unet(name)
    assert sum(p.numel() for p in unet.parameters()) == params
    if name == "sd15":
        args, kwargs = unet_inputs(name, 1)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = unet(*args, **kwargs).sample
        assert out.shape == (1, 4, 64, 64) and counter.get_total_flops() == 803_273_441_280
