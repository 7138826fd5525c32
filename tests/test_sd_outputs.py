"""A Stable Diffusion family run's outputs as a text-to-image user takes them, each through its command in a fresh
process: `state export` of an SD-LSG training state (a diffusers UNet folder), `hub convert --teacher` (a full
diffusers pipeline folder that StableDiffusionPipeline loads and t2i.sample samples alone), `hub push` (what it would
upload; a broken folder refused before any network) and `hub download` (a pipeline folder in the Hub cache, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import write_tiny_sd  # noqa: E402

from sid_fast import hub  # noqa: E402
from sid_fast.checkpoints import CheckpointError, atomic_save  # noqa: E402
from sid_fast.t2i import export as t2i_export  # noqa: E402
from sid_fast.training.config import resolve_config  # noqa: E402
from sid_fast.training.run import build_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(SD folder, training state after one iteration, its G_ema, the run's snapshot folder)."""
    root = tmp_path_factory.mktemp("sd_out")
    sd = write_tiny_sd(root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\nthe dog\na red car\n")
    cfg = resolve_config("sd15-lsg2", dict(teacher=str(sd), data_prompt_text=str(prompts), resolution=8, batch=2,
                                           batch_gpu=2, lr=1e-3, glr=1e-3, ema=0.001))  # fmt: skip
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    tr.step()
    state = root / "training-state-000000000002.pt"
    atomic_save(tr.state_dict(), state)
    snap = tr.family.write_generator(root / "network-snapshot-000000000002", tr.nets, cfg, tr.cur_nimg / 1e3)
    return sd, state, {k: v.clone() for k, v in tr.G_ema.state_dict().items()}, snap


def test_state_export_writes_a_diffusers_unet_folder(trained, tmp_path):
    from diffusers import UNet2DConditionModel

    sd, state, g_ema, _ = trained
    r = _cli("sid_fast.training.state", "export", str(state), str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "g"))  # diffusers' own loader
    assert all(torch.equal(v, g_ema[k]) for k, v in unet.state_dict().items())
    meta = json.loads((tmp_path / "g" / "sid_fast.json").read_text())
    assert meta["init_timestep"] == 625 and meta["guidance"] == [2.0, 2.0, 2.0] and meta["kimg"] == 0.002
    r = _cli("sid_fast.training.state", "export", str(state), str(tmp_path / "g.pt"))
    assert r.returncode != 0 and "exported as a diffusers UNet folder; give a folder name." in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "g.pt").exists()


def test_hub_convert_makes_a_pipeline_folder_that_diffusers_loads_and_samples(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd, _, g_ema, snap = trained
    pipe_dir = tmp_path / "pipe"
    r = _cli("sid_fast.hub", "convert", str(snap), str(pipe_dir))
    assert r.returncode != 0 and "give the teacher's diffusers folder with --teacher" in r.stderr
    r = _cli("sid_fast.hub", "convert", str(snap), str(pipe_dir), "--teacher", str(sd))
    assert r.returncode == 0, r.stderr
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    assert all(torch.equal(v, g_ema[k]) for k, v in pipe.unet.state_dict().items())
    # t2i.sample with the pipeline folder alone makes the same images as with the snapshot and its teacher (in this
    # process: the pipeline folder was written and loaded above by fresh ones).
    from click.testing import CliRunner

    from sid_fast.t2i import sample

    a, b = tmp_path / "a", tmp_path / "b"
    r1 = CliRunner().invoke(sample.main, ["--network", str(pipe_dir), "--prompt", "a cat", "--seeds", "0-1",
                                          "--outdir", str(a)])  # fmt: skip
    r2 = CliRunner().invoke(sample.main, ["--network", str(snap), "--teacher", str(sd), "--prompt", "a cat",
                                          "--seeds", "0-1", "--outdir", str(b)])  # fmt: skip
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    r = CliRunner().invoke(sample.main, ["--network", str(snap), "--prompt", "a cat", "--outdir", str(tmp_path / "c")])
    assert r.exit_code != 0 and "--teacher is required unless --network is a pipeline folder" in r.output


def test_hub_push_uploads_every_file_of_a_text_to_image_folder(trained, tmp_path, monkeypatch):
    """What push would send, recorded by a stand-in for huggingface_hub's client (no network here): the UNet folder's
    and the pipeline folder's files, and a card naming the repository; a broken folder is refused before."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    sd, _, _, snap = trained
    sent = []

    class Recorder:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            sent.append(("create", repo_id))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            sent.append(("file", path_in_repo, Path(path_or_fileobj).read_text()))

        def upload_folder(self, folder_path, repo_id, allow_patterns, commit_message):
            sent.append(("folder", sorted(allow_patterns)))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    hub.push(snap, "someone/lsg")
    card = next(x[2] for x in sent if x[0] == "file")
    assert 'UNet2DConditionModel.from_pretrained("someone/lsg")' in card
    assert next(x[1] for x in sent if x[0] == "folder") == ["config.json", "diffusion_pytorch_model.safetensors",
                                                             "sid_fast.json"]  # fmt: skip
    pipe_dir = hub.convert(snap, tmp_path / "pipe", teacher=sd)
    sent.clear()
    hub.push(pipe_dir, "someone/lsg-pipe")
    files = next(x[1] for x in sent if x[0] == "folder")
    assert {"model_index.json", "sid_fast.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "text_encoder/model.safetensors", "scheduler/scheduler_config.json"} <= set(files)  # fmt: skip
    (pipe_dir / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    sent.clear()
    with pytest.raises(CheckpointError, match="the generator does not load"):
        hub.push(pipe_dir, "someone/lsg-pipe")
    assert sent == []  # nothing left the machine


def test_a_pipeline_folder_in_the_hub_cache_loads_offline_by_id(trained, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as constants

    sd, _, g_ema, snap = trained
    home = tmp_path / "hf"
    repo = home / "hub" / "models--someone--lsg"
    hub.convert(snap, repo / "snapshots" / ("0" * 40), teacher=sd)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local = hub.download("someone/lsg")
    unet, meta = t2i_export.load_unet_folder(local)
    assert meta["init_timestep"] == 625 and all(torch.equal(v, g_ema[k]) for k, v in unet.state_dict().items())
