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
    # t2i.sample takes the Hub id itself
    from click.testing import CliRunner

    from sid_fast.t2i import sample

    r = CliRunner().invoke(sample.main, ["--network", "someone/lsg", "--prompt", "a cat", "--seeds", "0",
                                         "--outdir", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 0 and (tmp_path / "out" / "000000.png").is_file(), r.output


# ----------------------------------------------------------------------------------------------------------------
# The released SiD-LSG generators: `pickle.dump(dict(ema=UNet2DConditionModel))` (official training loop, save_data).


def _official_pickle(path, unet, half=False):
    """A snapshot written the way the official loop writes it: a deep copy of G_ema in eval mode, plain pickle."""
    import copy
    import pickle

    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    with open(path, "wb") as f:
        pickle.dump(dict(ema=ema.half() if half else ema), f)
    return path


def test_an_official_pickle_loads_safely_and_serves_every_command(trained, tmp_path):
    from click.testing import CliRunner
    from diffusers import UNet2DConditionModel

    from sid_fast.t2i import sample

    sd, _, g_ema, snap = trained
    unet = UNet2DConditionModel.from_pretrained(str(snap))
    pkl = _official_pickle(tmp_path / "batch512_cfg222_t625_4812_v2.pkl", unet)
    loaded, meta = t2i_export.load_unet_folder(pkl)
    assert meta["init_timestep"] == 625 and meta["init_timestep_from"] == "file name"
    assert all(torch.equal(v, g_ema[k]) for k, v in loaded.state_dict().items())
    # fp16 weights (the official --fp16 1 runs) come back as the float32 values of those halves
    half, meta = t2i_export.load_unet_folder(_official_pickle(tmp_path / "g.pkl", unet, half=True))
    assert meta["init_timestep_from"] == "official default"
    assert all(torch.equal(v, g_ema[k].half().float()) for k, v in half.state_dict().items())
    # sampling: the same images as the snapshot folder it was made from
    a, b = tmp_path / "a", tmp_path / "b"
    for net, out in ((pkl, a), (snap, b)):
        r = CliRunner().invoke(sample.main, ["--network", str(net), "--teacher", str(sd), "--prompt", "a cat",
                                             "--seeds", "0-1", "--outdir", str(out)])  # fmt: skip
        assert r.exit_code == 0, r.output
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    # hub convert: alone a UNet folder, with the teacher a pipeline folder, each carrying the file's name
    from sid_fast.hub import main as hub_main

    r = CliRunner().invoke(hub_main, ["convert", str(pkl), str(tmp_path / "unet")])
    assert r.exit_code == 0, r.output
    assert all(torch.equal(v, g_ema[k]) for k, v in UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
               .state_dict().items())  # fmt: skip
    r = CliRunner().invoke(hub_main, ["convert", str(pkl), str(tmp_path / "pipe"), "--teacher", str(sd), "--base-model",
                                      "stable-diffusion-v1-5/stable-diffusion-v1-5", "--license",
                                      "creativeml-openrail-m"])  # fmt: skip
    assert r.exit_code == 0, r.output
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card
    assert "license: creativeml-openrail-m" in card
    assert "| converted_from | batch512_cfg222_t625_4812_v2.pkl |" in card
    # --sid-model: G and G_ema start from it, the fake score from the teacher
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    cfg = resolve_config("sd15-lsg2", dict(teacher=str(sd), data_prompt_text=str(prompts), resolution=8, batch=2,
                                           batch_gpu=2, sid_model=str(pkl)))  # fmt: skip
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    teacher = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet").state_dict()
    assert all(torch.equal(v, g_ema[k]) for k, v in tr.G.state_dict().items())
    assert all(torch.equal(v, g_ema[k]) for k, v in tr.G_ema.state_dict().items())
    assert all(torch.equal(v, teacher[k]) for k, v in tr.fake.state_dict().items())


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_official_pickles_that_are_not_generators_are_refused_and_nothing_runs(trained, tmp_path):
    import pickle

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from sid_fast.t2i.pickles import load_official_generator

    sd, _, _, snap = trained
    unet = UNet2DConditionModel.from_pretrained(str(snap)).eval()
    marker = tmp_path / "pwned"

    def refused(name, obj, match):
        path = tmp_path / name
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(CheckpointError, match=match) as e:
            load_official_generator(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return path

    # a foreign global after the UNet's classes: refused by name, never called
    refused("evil.pkl", dict(ema=unet, x=_Evil(os.system, f"touch {marker}")), r"global 'posix\.system' is not allowed")
    assert not marker.exists()
    # a diffusers function called by the file: it becomes an inert stub, so the call fails and nothing runs
    level = diffusers_logging.get_verbosity()
    refused("call.pkl", dict(ema=_Evil(diffusers_logging.set_verbosity, 50)), "not a readable generator pickle")
    assert diffusers_logging.get_verbosity() == level
    # another diffusers model, a UNet whose tensors do not match its configuration, an implausible configuration
    vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae")
    refused("vae.pkl", dict(ema=vae), "its 'ema' is a diffusers.*AutoencoderKL, not a diffusers UNet2DConditionModel")
    cut = UNet2DConditionModel.from_pretrained(str(snap))
    del cut.conv_out.bias
    cut.conv_out.register_parameter("bias", None)
    refused("cut.pkl", dict(ema=cut), r"do not match its configuration \(1 differ.*conv_out\.bias")
    big = UNet2DConditionModel.from_pretrained(str(snap))
    big._internal_dict = dict(big.config, cross_attention_dim=10**9)
    refused("big.pkl", dict(ema=big), "cross_attention_dim=1000000000 is outside any plausible UNet")
    refused("noema.pkl", dict(G=unet), "expected a dict with the key 'ema'")
    path = _official_pickle(tmp_path / "whole.pkl", unet)
    (tmp_path / "short.pkl").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_official_generator(tmp_path / "short.pkl")


# ----------------------------------------------------------------------------------------------------------------
# Model cards whose snippets run as written.


def test_the_pipeline_cards_snippet_reproduces_sid_fasts_sample_in_a_fresh_process(trained, tmp_path):
    sd, _, _, snap = trained
    pipe_dir = tmp_path / "lsg-pipeline"
    hub.convert(snap, pipe_dir, teacher=sd)  # the command's own function (its CLI runs in the tests above)
    card = (pipe_dir / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: diffusers" in meta and "pipeline_tag: text-to-image" in meta
    assert json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    code = __import__("re").search(r"```python\n(.*?)```", card, __import__("re").S).group(1)
    code += "\nimport numpy as np\nnp.save('pixels.npy', pixels.numpy())\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    prompt = __import__("re").search(r'prompt = "(.*)"', code).group(1)
    from click.testing import CliRunner

    from sid_fast.t2i import sample

    r = CliRunner().invoke(sample.main, ["--network", str(pipe_dir), "--prompt", prompt, "--seeds", "0", "--outdir",
                                         str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    mine = np.asarray(Image.open(tmp_path / "out" / "000000.png"))
    pixels = np.load(tmp_path / "pixels.npy")[0].transpose(1, 2, 0)
    assert np.array_equal(pixels, mine)  # bit for bit
    # diffusers' own PIL image: the same up to its rounding ((x + 1) * 127.5 rounded, not x * 127.5 + 128 truncated)
    image = np.asarray(Image.open(tmp_path / "sample.png")).astype(int)
    assert image.shape == mine.shape and np.abs(image - mine.astype(int)).max() <= 1


def test_validation_prompts_set_the_grid_and_a_hub_id_teacher_is_answered_with_the_command(trained, tmp_path):
    from sid_fast.flags import ConfigError
    from sid_fast.t2i.sd import SDError, load_sd

    sd, _, _, _ = trained
    prompts, grid = tmp_path / "p.txt", tmp_path / "grid.txt"
    prompts.write_text("a cat\nthe dog\n")
    grid.write_text("a red car\n")
    base = dict(teacher=str(sd), data_prompt_text=str(prompts), resolution=8, batch=2, batch_gpu=2)
    tr = build_trainer(resolve_config("sd15-lsg2", dict(base, validation_prompts=str(grid))), torch.device("cpu"),
                       log=lambda *a: None)  # fmt: skip
    assert tr.family.grid_prompts == ["a red car"]
    with pytest.raises(ConfigError, match="--validation-prompts .*missing.txt"):
        build_trainer(resolve_config("sd15-lsg2", dict(base, validation_prompts=str(tmp_path / "missing.txt"))),
                      torch.device("cpu"), log=lambda *a: None)  # fmt: skip
    with pytest.raises(ConfigError, match="--validation-prompts .*is not one"):
        resolve_config("digits", dict(validation_prompts=str(grid)))
    with pytest.raises(SDError, match=r"fetch it with `hf download someone/sd-model --local-dir sd-model --include"):
        load_sd("someone/sd-model")
