"""The flow-matching digits teacher (sid_fast.t2i.digits_flow, bundled as sid_fast/assets/digits-flow) and its
laptop preset `digits-flow`: the folder is an SD3 pipeline that diffusers loads and samples and whose prompts steer it,
sid_fast's SD3 conditioning equals the pipeline's, a run records FD-digits and prompt accuracy of its few-step
generator, and the build command makes such a folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sid_fast.t2i import digits, digits_flow  # noqa: E402
from sid_fast.training.config import resolve_config  # noqa: E402


def test_the_bundled_flow_teacher_is_an_sd3_pipeline_that_follows_its_prompts():
    from sid_fast.t2i.sd3 import load_sd3

    pipe = digits_flow.pipeline()
    rows = {r["kappa"]: r for r in json.loads((digits_flow.FOLDER / digits.TEACHER_METRICS).read_text())["teacher"]}
    assert sorted(rows) == list(digits_flow.SWEEP_KAPPAS)
    # sid_fast's SD3 conditioning (8 tokens per tokenizer: their model_max_length) is the pipeline's at
    # max_sequence_length 8.
    sd3 = load_sd3(digits_flow.FOLDER)
    prompts = ["a handwritten seven", "the number 3", ""]
    ours = sd3.encode_text(prompts)
    with torch.no_grad():  # as sid_fast encodes (with autograd on, attention may take another kernel)
        states, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=digits.MAX_TOKENS)  # fmt: skip
    assert torch.equal(ours["encoder_hidden_states"], states) and torch.equal(ours["pooled_projections"], pooled)
    # The pipeline's Euler sampler at the preset's guidance: its prompt accuracy on 100 images is the recorded
    # 2,000-image value within 5 binomial standard deviations (the images are the recorded run's first 100).
    kappa = resolve_config("digits-flow", {}).cfg_eval_real
    prompts, labels = digits.eval_prompts(100)
    images = digits_flow.teacher_images(pipe, prompts, range(10_000_000, 10_000_100), kappa)
    acc = digits.score_images(images, labels)["prompt_acc"]
    p = rows[kappa]["prompt_acc"]
    assert abs(acc - p) <= 5 * math.sqrt(p * (1 - p) / 100) + 0.01, (acc, p)
    assert p > 0.9 and rows[1.0]["prompt_acc"] < p  # guidance sharpens the teacher's prompts


def test_the_preset_runs_the_official_few_step_settings_on_the_bundled_teacher():
    cfg = resolve_config("digits-flow", {})
    assert cfg.teacher == str(digits_flow.FOLDER) and cfg.data_prompt_text == str(digits.PROMPT_FILE)
    assert (cfg.generator_steps, cfg.init_timestep, cfg.noise_type, cfg.weighting) == (4, 999, "fresh", "1_minus_sigma")
    assert (cfg.alpha, cfg.ls, cfg.lsg, cfg.ema) == (1.0, 1.0, 100.0, 0.0)
    assert cfg.cfg_train_fake == cfg.cfg_eval_fake == cfg.cfg_eval_real and cfg.metrics == "fd-digits"


def test_a_digits_flow_run_records_fd_digits_and_prompt_accuracy_of_its_k_step_generator(tmp_path):
    """Two evaluations in a short run; the snapshot's values are its generator's, sampled again through the public
    flow sampler (the study's evaluation) at the run's K steps; fewer steps give other images."""
    from sid_fast.families.flow import SID_META
    from sid_fast.training.run import run
    from studies.flow_digits.study import evaluate_snapshot

    cfg = resolve_config("digits-flow", dict(outdir=str(tmp_path), batch=16, batch_gpu=16, duration=32e-6,
                                             tick=0.016, snap=1, metric_num=40))  # fmt: skip
    run_dir, status = run(cfg, log_to_stdout=False)
    assert status == "done"
    for key in ("fd_digits", "prompt_acc"):
        rows = [json.loads(x) for x in (run_dir / f"metric-{key}.jsonl").read_text().splitlines()]
        assert [r["kimg"] for r in rows] == [0.016, 0.032] and (run_dir / f"{key}.png").is_file()
    snap = run_dir / "network-snapshot-000000000032"
    meta = json.loads((snap / SID_META).read_text())
    assert meta["steps"] == 4 and 0 <= meta["metrics"]["prompt_acc"] <= 1 and meta["metrics"]["fd_digits"] > 0
    again = evaluate_snapshot(snap, cfg.teacher, 4, 40)
    assert again["prompt_acc"] == pytest.approx(meta["metrics"]["prompt_acc"], abs=1e-6)
    assert again["fd_digits"] == pytest.approx(meta["metrics"]["fd_digits"], rel=1e-6)
    assert evaluate_snapshot(snap, cfg.teacher, 1, 40)["fd_digits"] != pytest.approx(again["fd_digits"], rel=1e-6)


def test_the_build_command_writes_a_folder_that_the_family_and_diffusers_load(tmp_path):
    from click.testing import CliRunner
    from diffusers import StableDiffusion3Pipeline

    from sid_fast.t2i.sd3 import load_sd3

    r = CliRunner().invoke(digits_flow.main, ["build", "--out", str(tmp_path / "t"), "--steps", "2", "--batch", "8",
                                              "--eval-num", "10"])  # fmt: skip
    assert r.exit_code == 0, r.output
    sd3 = load_sd3(tmp_path / "t")
    assert sd3.vae.config.shift_factor == 0.0 and sd3.latent_channels == 4 and sd3.latent_resolution == 8
    assert isinstance(StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "t")), StableDiffusion3Pipeline)
    meta = json.loads((tmp_path / "t" / digits.TEACHER_METRICS).read_text())
    assert [row["kappa"] for row in meta["teacher"]] == list(digits_flow.SWEEP_KAPPAS)
    assert meta["command"].startswith("python -m sid_fast.t2i.digits_flow build --steps 2 --batch 8")
