"""Generator folders (sid_fast.hub): model.safetensors + config.json + model card, loaded by path or Hub id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sid_fast import hub
from sid_fast.checkpoints import CheckpointError, load_network_file, save_network
from sid_fast.networks.precond import build_network

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    img_resolution=8,
    img_channels=1,
    label_dim=10,
    model_type="SongUNet",
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return build_network("EDMPrecond", TINY)


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _sample(network, outdir):
    r = subprocess.run(
        [sys.executable, "-m", "sid_fast.sample", "--network", str(network), "--seeds", "0-5", "--outdir", str(outdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [np.asarray(Image.open(p)) for p in sorted(Path(outdir).glob("*.png"))]


def test_folder_samples_in_a_fresh_process_what_the_pt_file_samples(generator, tmp_path):
    meta = dict(kind="generator", sigma_init=2.5, alpha=1.2, teacher="t.pt", kimg=4.1, metrics={"fd_digits": 3.25})
    save_network(tmp_path / "g.pt", generator, TINY, **meta)
    folder = hub.save_folder(tmp_path / "g", generator, TINY, **meta)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["class_name"] == "EDMPrecond" and config["init_kwargs"] == TINY and config["meta"] == meta
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sid_fast\n") and "| fd_digits | 3.25 |" in card
    assert "sigma_init = 2.5" in card and "10 classes" in card
    from sid_fast import sample

    r = CliRunner().invoke(
        sample.main, ["--network", str(tmp_path / "g.pt"), "--seeds", "0-5", "--outdir", str(tmp_path / "a")]
    )
    assert r.exit_code == 0, r.output
    from_pt = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a").glob("*.png"))]
    from_folder = _sample(folder, tmp_path / "b")  # in a fresh process
    assert len(from_pt) == 6 and all(np.array_equal(a, b) for a, b in zip(from_pt, from_folder))

    net, info = load_network_file(folder)
    assert info["source"] == "sid_fast-folder" and info["meta"] == meta and not net.training
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), net.state_dict().values()))
    sampler, _ = hub.load_generator(folder)
    x = sampler.sample(range(3))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    from sid_fast.export import generator_from_file  # the exporter's reader: sigma_init from config.json

    gen, _ = generator_from_file(folder)
    assert gen.sigma_init == 2.5


def test_convert_cli_and_rewrite_in_place(generator, tmp_path):
    save_network(tmp_path / "g.pt", generator, TINY, kind="generator", sigma_init=2.5)
    r = CliRunner().invoke(hub.main, ["convert", str(tmp_path / "g.pt"), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    _, info = load_network_file(tmp_path / "out")
    assert info["meta"]["converted_from"] == "g.pt" and info["meta"]["sigma_init"] == 2.5
    # The same name written again (a resumed run re-writing a snapshot) replaces the folder and leaves no temporaries.
    hub.save_folder(tmp_path / "out", generator, TINY, kind="generator", sigma_init=3.0)
    assert load_network_file(tmp_path / "out")[1]["meta"]["sigma_init"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pt", "out"]
    # A kill between the swap's two renames leaves only out.old.tmp: the next write of the name brings it back first.
    (tmp_path / "out").rename(tmp_path / "out.old.tmp")
    (tmp_path / "out.x1y2.tmp").mkdir()  # and a half-written temporary folder
    hub.save_folder(tmp_path / "out", generator, TINY, kind="generator", sigma_init=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pt", "out"]
    hub.update_meta(tmp_path / "out", metrics={"fid": 1.5})
    meta = load_network_file(tmp_path / "out")[1]["meta"]
    assert meta["sigma_init"] == 4.0 and meta["metrics"] == {"fid": 1.5}
    assert "| fid | 1.5 |" in (tmp_path / "out" / "README.md").read_text()


def test_hub_ids_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.hub_id("owner/name") == ("owner/name", None)
    assert hub.hub_id("hf://owner/name@v1.0") == ("owner/name", "v1.0")
    assert hub.hub_id("hf://owner/name") == ("owner/name", None)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "snap").mkdir()
    for local in ("runs/snap", "./a/b", "/abs/path", "a/b/c", "g.pt", "runs/g.pt", "owner/net.safetensors"):
        assert hub.hub_id(local) is None, local


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_config", "no config.json; a sid_fast generator folder holds model.safetensors and config.json"),
        ("bad_json", "config.json: not valid JSON"),
        ("foreign_config", 'config.json: not a sid_fast network config (no "format": "sid_fast.network")'),
        ("wrong_kwargs", "tensors do not match EDMPrecond built from its init kwargs: wrong shape"),
        ("no_weights", "no model.safetensors beside config.json"),
        ("truncated_weights", "model.safetensors: not a readable safetensors file"),
        ("extra_tensor", "tensors do not match EDMPrecond built from its init kwargs: unexpected ['extra']"),
    ],
)
def test_broken_folders_are_refused_in_one_sentence(generator, tmp_path, damage, message):
    folder = hub.save_folder(tmp_path / "g", generator, TINY, kind="generator", sigma_init=2.5)
    cfg = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif damage == "foreign_config":
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif damage == "wrong_kwargs":
        cfg["init_kwargs"]["model_channels"] = 16
        (folder / "config.json").write_text(json.dumps(cfg))
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "extra_tensor":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in generator.state_dict().items()}
        save_file(dict(tensors, extra=torch.zeros(2)), str(weights))
    with pytest.raises(CheckpointError) as e:
        load_network_file(folder)
    text = str(e.value)
    assert message in text and str(folder) in text and "\n" not in text


def test_unknown_hub_id_offline_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^someone/no-such-generator: not a local path, and the Hugging Face"):
        load_network_file("someone/no-such-generator")
    from sid_fast import sample

    r = CliRunner().invoke(sample.main, ["--network", "someone/no-such-generator", "--outdir", "o"])
    assert r.exit_code != 0 and "someone/no-such-generator: not a local path" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "o").exists()


def test_a_hub_id_in_the_cache_loads_offline(generator, tmp_path, monkeypatch):
    """A repository already in huggingface_hub's cache (laid out as the Hub client stores one) loads by its id with
    HF_HUB_OFFLINE=1, as on a compute node without network after a download on the login node."""
    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf"
    snap = home / "hub" / "models--someone--digits-sid" / "snapshots" / ("0" * 40)
    hub.save_folder(snap, generator, TINY, kind="generator", sigma_init=2.5)
    (home / "hub" / "models--someone--digits-sid" / "refs").mkdir()
    (home / "hub" / "models--someone--digits-sid" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    net, info = load_network_file("someone/digits-sid")
    assert info["source"] == "sid_fast-folder"
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), net.state_dict().values()))


def test_push_refuses_a_broken_folder_before_any_network_and_names_the_failure(generator, tmp_path, monkeypatch):
    folder = hub.save_folder(tmp_path / "g", generator, TINY, kind="generator", sigma_init=2.5)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        hub.push(folder, "someone/x")
    pytest.importorskip("huggingface_hub")
    folder = hub.save_folder(tmp_path / "h", generator, TINY, kind="generator", sigma_init=2.5)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    r = subprocess.run(
        [sys.executable, "-m", "sid_fast.hub", "push", str(folder), "someone/x", "--token", "hf_test"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(_env(), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0"),
    )
    assert r.returncode != 0 and "someone/x: the push failed" in r.stderr and "Traceback" not in r.stderr
