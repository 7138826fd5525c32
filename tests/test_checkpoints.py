"""Safe loading of EDM/SiD pickles and sid_fast checkpoints; refusal of malicious, foreign and broken files."""

import os
import pickle

import numpy as np
import pytest
import torch
from support.edm_pickle_writer import PAYLOAD_TEMPLATE, write_edm_pickle

from sid_fast.checkpoints import CheckpointError, atomic_save, load_network, load_network_file, save_network
from sid_fast.networks import build_network

CONFIGS = {
    "ncsnpp-cond": (
        "EDMPrecond",
        dict(
            model_type="SongUNet",
            img_resolution=16,
            img_channels=3,
            label_dim=4,
            augment_dim=9,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            embedding_type="fourier",
            encoder_type="residual",
            channel_mult_noise=2,
            resample_filter=[1, 3, 3, 1],
            dropout=np.float64(0.13),
        ),
    ),
    "ddpmpp-skip-vp": (
        "VPPrecond",
        dict(
            img_resolution=16,
            img_channels=1,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            encoder_type="skip",
            decoder_type="skip",
        ),
    ),
    "adm-cond": (
        "EDMPrecond",
        dict(
            model_type="DhariwalUNet",
            img_resolution=16,
            img_channels=3,
            label_dim=5,
            model_channels=64,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[8],
            use_fp16=True,
        ),
    ),
    "ve": (
        "VEPrecond",
        dict(
            img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4]
        ),
    ),
}


def _perturbed(class_name, cfg):
    torch.manual_seed(3)
    net = build_network(class_name, cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def _inputs(net):
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.eye(net.label_dim)[[0, 1]] if net.label_dim else None
    return x, torch.tensor([0.4, 7.0]), labels


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_edm_pickle_roundtrip_without_executing_code(tmp_path, key):
    class_name, cfg = CONFIGS[key]
    net = _perturbed(class_name, cfg)
    marker = tmp_path / "executed.txt"
    path = tmp_path / "network-snapshot.pkl"
    write_edm_pickle(
        path,
        net,
        cfg,
        module_src=PAYLOAD_TEMPLATE.format(path=str(marker)),
        extra=dict(loss_fn=None, augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip", xflip=False)),
    )
    loaded, info = load_network_file(path)
    assert not marker.exists(), "the embedded module source was executed"
    assert type(loaded) is type(net) and info["source"] == "edm-pickle" and info["class_name"] == class_name
    assert info["meta"]["dataset_kwargs"]["path"] == "cifar10.zip"
    assert info["init_kwargs"]["img_resolution"] == cfg["img_resolution"]
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, sigma, labels = _inputs(net)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("fn_name", ["os.system", "builtins.eval", "builtins.exec"])
def test_foreign_global_is_refused_and_nothing_runs(tmp_path, fn_name):
    marker = tmp_path / "pwned"
    fn = {"os.system": os.system, "builtins.eval": eval, "builtins.exec": exec}[fn_name]
    arg = f"touch {marker}" if fn_name == "os.system" else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump(dict(ema=_Evil(fn, arg)), f, protocol=4)
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*not allowed"):
        load_network(path)
    assert not marker.exists()


def test_unknown_class_is_refused(tmp_path):
    class_name, cfg = CONFIGS["ve"]
    net = _perturbed(class_name, cfg)
    path = tmp_path / "iddpm.pkl"
    write_edm_pickle(path, net, cfg, class_name_overrides={id(net): "iDDPMPrecond"})
    with pytest.raises(CheckpointError, match=r"iddpm\.pkl.*iDDPMPrecond"):
        load_network(path)


def test_unknown_init_kwargs_are_refused(tmp_path):
    class_name, cfg = CONFIGS["ve"]
    net = _perturbed(class_name, cfg)
    path = tmp_path / "k.pkl"
    write_edm_pickle(path, net, dict(cfg, mystery_option=3))
    with pytest.raises(CheckpointError, match=r"k\.pkl.*mystery_option"):
        load_network(path)


def test_mismatched_tensors_are_refused(tmp_path):
    class_name, cfg = CONFIGS["ve"]
    net = _perturbed(class_name, cfg)
    path = tmp_path / "m.pkl"
    write_edm_pickle(path, net, dict(cfg, model_channels=32))  # kwargs disagree with the stored tensors
    with pytest.raises(CheckpointError, match=r"m\.pkl.*do not match"):
        load_network(path)


def test_truncated_pickle_is_refused(tmp_path):
    class_name, cfg = CONFIGS["ve"]
    path = tmp_path / "t.pkl"
    write_edm_pickle(path, _perturbed(class_name, cfg), cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.pkl.*truncated"):
        load_network(path)


def test_pickle_without_ema_is_refused(tmp_path):
    path = tmp_path / "noema.pkl"
    with open(path, "wb") as f:
        pickle.dump(dict(G=1, loss_fn=None), f, protocol=4)
    with pytest.raises(CheckpointError, match=r"noema\.pkl.*'ema'"):
        load_network(path)


def test_not_a_network_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*neither"):
        load_network(path)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_network(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        load_network(tmp_path / "missing.pkl")


def test_url_when_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SID_FAST_CACHE_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="download failed.*local path"):
        load_network("http://127.0.0.1:9/edm-cifar10-32x32-uncond-vp.pkl")


def test_sid_fast_checkpoint_roundtrip_and_corruption(tmp_path):
    class_name, cfg = CONFIGS["adm-cond"]
    cfg = dict(cfg, use_fp16=False)
    net = _perturbed(class_name, cfg)
    path = tmp_path / "gen.pt"
    save_network(path, net, cfg, kind="generator", sigma_init=2.5)
    loaded, info = load_network_file(path)
    assert info["source"] == "sid_fast" and info["meta"] == dict(kind="generator", sigma_init=2.5)
    x, sigma, labels = _inputs(net)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"gen\.pt.*truncated or corrupt"):
        load_network(path)


def test_torch_file_with_foreign_objects_is_refused(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(dict(format="sid_fast.network", obj=_Evil(print, "x")), path)
    with pytest.raises(CheckpointError, match=r"full\.pt.*refused"):
        load_network(path)


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
