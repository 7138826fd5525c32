"""SDXL teachers in the Stable Diffusion family (sid_fast.families.sd, sid_fast.t2i.sd) on a tiny random SDXL folder
saved as StableDiffusionXLPipeline lays it out: the conditioning equals the pipeline's own encode_prompt, a run's
snapshot exported as a pipeline folder that StableDiffusionXLPipeline loads and samples to sid_fast's latents, the
sampling command, and the refusals of mismatched folders. The iteration itself is checked against a float64
transcription in tests/test_t2i_lsg.py (its "xl" cases)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import TINY_XL_UNET, write_tiny_sdxl  # noqa: E402

from sid_fast.t2i.sd import SDError, load_sd  # noqa: E402
from sid_fast.training.config import ConfigError, resolve_config  # noqa: E402

PROMPTS = ["a cat", "the dog", "a red car on the beach at night"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return write_tiny_sdxl(root / "teacher", seed=3), prompts


def test_the_conditioning_is_the_sdxl_pipelines_own(xl):
    """Text states, pooled embedding and size conditioning as StableDiffusionXLPipeline makes them (encode_prompt,
    _get_add_time_ids at its default size), and zeros as the unconditional input (force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionXLPipeline

    folder, _ = xl
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    sd = load_sd(folder)
    cond = sd.encode_text(PROMPTS)
    states, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    assert torch.equal(cond["encoder_hidden_states"], states) and torch.equal(cond["text_embeds"], pooled)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    width = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        (size, size), (0, 0), (size, size), torch.float32, text_encoder_projection_dim=width
    )
    assert torch.equal(cond["time_ids"], time_ids.expand(len(PROMPTS), 6))
    uncond = sd.encode_uncond()
    assert torch.equal(uncond["encoder_hidden_states"], neg[:1]) and torch.equal(uncond["text_embeds"], neg_pooled[:1])
    assert not neg.any() and torch.equal(uncond["time_ids"], time_ids)
    # The second tokenizer pads with "!" (SDXL's), so its ids differ from the first's: both are used.
    assert sd.tokenizer_2.pad_token_id != sd.tokenizer.pad_token_id
    # force_zeros_for_empty_prompt false: the encoded "" is the unconditional input, as the pipeline then does.
    index = json.loads((folder / "model_index.json").read_text())
    other = folder.parent / "teacher-no-zeros"
    shutil.copytree(folder, other)
    (other / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    u = load_sd(other).encode_uncond()
    assert torch.equal(u["encoder_hidden_states"], sd.encode_text([""])["encoder_hidden_states"])


def test_a_run_exports_a_pipeline_that_diffusers_samples_as_sid_fast_does(xl, tmp_path):
    """Two iterations of SiD-LSG on the SDXL folder (the trainer's token ids for both tokenizers), its snapshot as a
    UNet folder, `hub convert --teacher` as a pipeline folder: StableDiffusionXLPipeline loads it and its one step
    (guidance 1, output_type latent) makes sid_fast's latents; the sampling command gives the same PNGs from the
    pipeline folder alone and from the snapshot with its teacher."""
    from click.testing import CliRunner
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from PIL import Image

    from sid_fast import hub
    from sid_fast.t2i import sample
    from sid_fast.t2i.export import CARD, load_unet_folder, onestep_latents, seed_latents
    from sid_fast.training.run import build_trainer

    folder, prompts = xl
    cfg = resolve_config("sdxl-lsg2", dict(teacher=str(folder), data_prompt_text=str(prompts), resolution=8, batch=4,
                                           batch_gpu=2, lr=1e-3, glr=1e-3, ema=0.001, precision="fp32",
                                           checkpointing="none"))  # fmt: skip
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    start = {k: v.clone() for k, v in tr.G.state_dict().items()}
    for _ in range(2):
        tr.step()
    assert max((v - start[k]).abs().max().item() for k, v in tr.G.state_dict().items()) > 1e-4
    snap = tr.family.write_generator(tmp_path / "snap", tr.nets, cfg, tr.cur_nimg / 1e3)
    assert "StableDiffusionXLPipeline.from_pretrained" in (snap / CARD).read_text()
    unet = UNet2DConditionModel.from_pretrained(str(snap))
    assert all(torch.equal(v, tr.G_ema.state_dict()[k]) for k, v in unet.state_dict().items())
    pipe_dir = hub.convert(
        snap, tmp_path / "pipe", teacher=folder, base_model="stabilityai/stable-diffusion-xl-base-1.0"
    )
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert "safety_checker" not in index and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipe_dir))
    z = seed_latents([0, 1], [4, 8, 8])
    abar = pipe.scheduler.alphas_cumprod[625]
    theirs = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, latents=(1 - abar).sqrt() * z,
                  output_type="latent").images  # fmt: skip
    g, _ = load_unet_folder(snap)
    sd = load_sd(folder)
    ours = onestep_latents(g, sd.schedule, z, sd.encode_text(PROMPTS[:2]), 625)
    # diffusers' DDIM step computes the same x0-prediction with the same float32 operations up to their order.
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item()), (theirs - ours).abs().max()
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = CliRunner().invoke(sample.main, ["--network", str(pipe_dir), "--prompt", "a cat", "--seeds", "0-1",
                                          "--outdir", str(a)])  # fmt: skip
    r2 = CliRunner().invoke(sample.main, ["--network", str(snap), "--teacher", str(folder), "--prompt", "a cat",
                                          "--seeds", "0-1", "--outdir", str(b)])  # fmt: skip
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))


def test_mismatched_sdxl_folders_are_refused_in_one_sentence(xl, tmp_path):
    from diffusers import UNet2DConditionModel

    folder, prompts = xl
    broken = tmp_path / "no-te2"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(SDError, match=r"needs unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2, "
                                      r"tokenizer_2; missing text_encoder_2"):  # fmt: skip
        load_sd(broken)
    # An SDXL UNet in a folder whose index names one text encoder.
    one = tmp_path / "one-encoder"
    shutil.copytree(folder, one)
    index = json.loads((one / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (one / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SDError, match="an SDXL UNet .addition_embed_type text_time. but the folder has no "
                                      "text_encoder_2"):  # fmt: skip
        load_sd(one)
    # A UNet whose added embedding does not fit the pooled width and size numbers.
    wide = tmp_path / "wide"
    shutil.copytree(folder, wide)
    shutil.rmtree(wide / "unet")
    UNet2DConditionModel(**dict(TINY_XL_UNET, projection_class_embeddings_input_dim=70)).save_pretrained(
        str(wide / "unet")
    )
    with pytest.raises(SDError, match=r"added embedding takes 70 numbers, but text_encoder_2's pooled width 16 and "
                                      r"six size numbers of 8 make 64"):  # fmt: skip
        load_sd(wide)
    # The preset without --teacher names the Hub repository and the command that fetches both encoders.
    with pytest.raises(ConfigError, match=r"stabilityai/stable-diffusion-xl-base-1.0.*--include 'tokenizer_2/\*'"):
        from sid_fast.training.run import build_trainer

        build_trainer(resolve_config("sdxl-lsg2", dict(data_prompt_text=str(prompts))), torch.device("cpu"))


def test_a_warm_bf16_step_on_an_sdxl_teacher_has_no_capture_finding(xl):
    """The capture guard (sid_fast.guard) over a warm bf16 + fused-Adam step, two micro-batches per phase: the
    size conditioning is made on the device once, both tokenizers' ids come from the host without a blocking copy."""
    from sid_fast.guard import CaptureGuard
    from sid_fast.training.run import build_trainer

    folder, prompts = xl
    cfg = resolve_config("sdxl-lsg2", dict(teacher=str(folder), data_prompt_text=str(prompts), resolution=8, batch=4,
                                           batch_gpu=2, optimizer="fused", checkpointing="none"))  # fmt: skip
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    tr.step()
    with CaptureGuard() as g:
        tr.step()
    assert [str(f) for f in g.failures()] == []
