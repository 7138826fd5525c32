"""FID/IS, the detector loaders, EDM datasets and the dataset tool, the fid CLI, optional DALI, and FID in training."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from support.fid_helpers import save_torchscript_detector, write_png_folder

from sid_fast.data import dataset_tool
from sid_fast.data.dataset import DatasetError, ImageDataset
from sid_fast.metrics import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    load_ref_stats,
    save_ref_stats,
)
from sid_fast.metrics.inception import DetectorError, FIDInceptionV3, load_detector

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def _features(detector_path, images):
    """The test detector's features, called directly (not through sid_fast's loader)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = torch.jit.load(str(detector_path))
    return det(images, return_features=True).double().numpy()


def _fd_eigh(mu1, s1, mu2, s2):
    """Independent float64 Frechet distance: tr(sqrt(S1^1/2 S2 S1^1/2)) through symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    wm = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(wm, 0, None))))


# ----------------------------------------------------------------------------------------------------------------
# The distance and the statistics.


def test_fid_of_a_feature_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(400, 32)) @ np.random.default_rng(1).normal(size=(32, 32))
    mu, s = feature_stats(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


def test_fid_matches_closed_form_for_two_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    exact = _fd_eigh(mu1, s1, mu2, s2)
    # 1-d check of the closed form itself: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)
    # Features drawn from the two Gaussians: the estimated FID approaches the exact one.
    n = 200_000
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    st1, st2 = FeatureStats(d), FeatureStats(d)
    for chunk in np.array_split(f1, 7):
        st1.add(torch.from_numpy(chunk))
    st2.add(torch.from_numpy(f2))
    est = frechet_distance(*st1.mean_cov(), *st2.mean_cov())
    assert est == pytest.approx(exact, rel=0.02)


def test_fid_on_random_features_matches_independent_float64():
    rng = np.random.default_rng(3)
    f1 = rng.normal(size=(300, 64)) * rng.uniform(0.5, 2, 64)
    f2 = rng.normal(size=(250, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    st = FeatureStats(64)
    st.add(torch.from_numpy(f1[:100]))
    st.add(torch.from_numpy(f1[100:]))
    mu1, s1 = st.mean_cov()
    # Unbiased covariance exactly as numpy computes it.
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-12)
    mu2, s2 = feature_stats(f2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_eigh(mu1, s1, mu2, s2), rel=1e-7)


def test_inception_score_limits():
    k = 10
    one_hot = np.eye(k)[np.arange(1000) % k] * (1 - 1e-9) + 1e-10
    mean, std = inception_score(one_hot)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (1000, 1))
    assert inception_score(same)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(one_hot[:5])


def test_reference_statistics_round_trip_and_bad_files(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    p = tmp_path / "ref.npz"
    save_ref_stats(p, mu, sigma)
    m2, s2 = load_ref_stats(p)
    assert m2.dtype == np.float64 and np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    with pytest.raises(ValueError, match="no such reference"):
        load_ref_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match=r"keys.npz: .*'mu' and 'sigma'"):
        load_ref_stats(tmp_path / "keys.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"shape.npz: 'mu' must be \[D\]"):
        load_ref_stats(tmp_path / "shape.npz")
    with pytest.raises(ValueError, match="2048-d features"):
        load_ref_stats(p, dim=2048)
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="text.npz: not a readable .npz"):
        load_ref_stats(tmp_path / "text.npz")


# ----------------------------------------------------------------------------------------------------------------
# Detectors.


def test_pytorch_fid_weights_load_and_give_2048_features(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision Inception-v3 without aux, 1008 classes
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    det = load_detector(path)
    assert det.kind == "pytorch-fid"
    img = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)  # grey: repeated to RGB
    f = det.features(img)
    assert f.shape == (2, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    p = det.probabilities(img)
    assert p.shape == (2, 1008) and torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DetectorError, match="other.pth: .*not pytorch-fid"):
        load_detector(tmp_path / "other.pth")


def test_detector_files_of_the_wrong_kind(tmp_path):
    import pickle

    with open(tmp_path / "inception-2015-12-05.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(DetectorError, match=r"inception-2015-12-05.pkl: a Python pickle.*TorchScript"):
        load_detector(tmp_path / "inception-2015-12-05.pkl")
    (tmp_path / "junk.pt").write_bytes(b"hello world")
    with pytest.raises(DetectorError, match="junk.pt: not an Inception detector"):
        load_detector(tmp_path / "junk.pt")
    with pytest.raises(DetectorError, match="nothere.pt: no such file"):
        load_detector(tmp_path / "nothere.pt")
    os.environ["SID_FAST_DETECTOR"] = str(tmp_path / "absent.pt")
    try:
        with pytest.raises(DetectorError, match=r"No Inception detector at .*absent.pt. Download https://"):
            load_detector(None)
    finally:
        del os.environ["SID_FAST_DETECTOR"]
    # A detector that returns the wrong feature size is caught when called.
    det = load_detector(save_torchscript_detector(tmp_path / "det.pt"))
    assert det.kind == "torchscript" and det.feature_dim == 2048
    assert det.features(torch.zeros(3, 1, 8, 8, dtype=torch.uint8)).shape == (3, 2048)
    with pytest.raises(ValueError, match="uint8 images"):
        det.features(torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Datasets and the dataset tool.


def test_dataset_tool_writes_edm_format_and_reader_reads_it(tmp_path):
    src = tmp_path / "src"
    for c, cls in enumerate(["cat", "dog"]):
        write_png_folder(src / cls, 3, size=12, seed=c)
    dest = tmp_path / "out.zip"
    r = CliRunner().invoke(
        dataset_tool.main, ["--source", str(src), "--dest", str(dest), "--resolution", "8", "--labels-from-subdirs"]
    )
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(dest) as z:
        names = sorted(z.namelist())
        assert names[:2] == ["00000/img00000000.png", "00000/img00000001.png"] and "dataset.json" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        labels = json.loads(z.read("dataset.json"))["labels"]
    assert [c for _, c in labels] == [0, 0, 0, 1, 1, 1]
    ds = ImageDataset(dest)
    assert len(ds) == 6 and ds.image_shape == [3, 8, 8] and ds.label_dim == 2
    img, lab = ds[4]
    assert img.dtype == np.uint8 and img.shape == (3, 8, 8) and lab.tolist() == [0.0, 1.0]
    # The same pixels as PIL's LANCZOS resize of the source.
    first = np.asarray(PIL.Image.open(src / "cat" / "im000.png").convert("RGB").resize((8, 8), PIL.Image.LANCZOS))
    assert np.array_equal(ds[0][0], first.transpose(2, 0, 1))
    # A random subset as EDM's calc takes it: RandomState(seed) shuffle, first n, sorted.
    sub = ImageDataset(dest, max_size=3, random_seed=5)
    idx = np.arange(6)
    np.random.RandomState(5).shuffle(idx)
    assert sub.names == [ds.names[i] for i in sorted(idx[:3])]


def test_dataset_bad_input(tmp_path):
    write_png_folder(tmp_path / "rect", 2, size=8)
    PIL.Image.new("RGB", (8, 6)).save(tmp_path / "rect" / "a.png")  # sorted first
    with pytest.raises(DatasetError, match=r"rect: a.png is 8x6; images must be square"):
        ImageDataset(tmp_path / "rect")
    d = tmp_path / "npot"
    d.mkdir()
    PIL.Image.new("RGB", (12, 12)).save(d / "a.png")
    with pytest.raises(DatasetError, match="power of two"):
        ImageDataset(d)
    write_png_folder(tmp_path / "lab", 3, labels=[0, 1, 2])
    meta = json.loads((tmp_path / "lab" / "dataset.json").read_text())
    meta["labels"] = meta["labels"][:2]
    (tmp_path / "lab" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"lab/dataset.json: no label for 1 image.*disagrees"):
        ImageDataset(tmp_path / "lab")
    meta["labels"].append(["ghost.png", 1])
    meta["labels"].append(["im002.png", 1])
    (tmp_path / "lab" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="ghost.png"):
        ImageDataset(tmp_path / "lab")
    with pytest.raises(DatasetError, match="no such dataset"):
        ImageDataset(tmp_path / "nope.zip")
    write_png_folder(tmp_path / "mixed", 2, size=8)
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "mixed" / "z.png")
    ds = ImageDataset(tmp_path / "mixed")
    with pytest.raises(DatasetError, match=r"z.png has shape \[3, 16, 16\]"):
        ds[2]
    r = CliRunner().invoke(dataset_tool.main, ["--source", str(d), "--dest", str(tmp_path / "o.zip")])
    assert r.exit_code != 0 and "power-of-two" in r.output
    r = CliRunner().invoke(
        dataset_tool.main, ["--source", str(d), "--dest", str(tmp_path / "o.zip"), "--resolution", "12"]
    )
    assert r.exit_code != 0 and "--resolution" in r.output and "power of two" in r.output
    assert not (tmp_path / "o.zip").exists() and not (tmp_path / "o.zip.part").exists()


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline through the CLI, with a test-made TorchScript detector.


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from sid_fast.checkpoints import save_network
    from sid_fast.networks import build_network

    root = tmp_path_factory.mktemp("fid")
    det = save_torchscript_detector(root / "inception-2015-12-05.pt", dim=64)
    write_png_folder(root / "data", 40, size=8)
    kw = dict(
        model_type="SongUNet",
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    torch.manual_seed(0)
    net = build_network("EDMPrecond", kw)
    save_network(root / "gen.pt", net, kw, kind="generator", sigma_init=2.5)
    return dict(root=root, det=str(det), data=str(root / "data"), gen=str(root / "gen.pt"))


def _run_fid(*args):
    from sid_fast import fid

    r = CliRunner().invoke(fid.main, list(args))
    return r


def test_fid_cli_ref_and_calc_on_images_and_network(pipeline):
    from sid_fast.checkpoints import load_network_file
    from sid_fast.sampling import generate, to_uint8

    p, ref = pipeline, str(pipeline["root"] / "ref.npz")
    r = _run_fid("ref", "--data", p["data"], "--dest", ref, "--detector", p["det"], "--workers", "0", "--batch", "7")
    assert r.exit_code == 0, r.output
    mu, sigma = load_ref_stats(ref, dim=64)
    # Independently: the detector's features of every image, numpy's mean and unbiased covariance.
    imgs = torch.stack(
        [
            torch.from_numpy(np.asarray(PIL.Image.open(Path(p["data"]) / f"im{i:03d}.png")).transpose(2, 0, 1).copy())
            for i in range(40)
        ]
    )
    feats = _features(p["det"], imgs)
    # (fp32 features differ by ~1e-8 between batch sizes; the statistics themselves are float64)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-7)

    r = _run_fid("calc", "--images", p["data"], "--ref", ref, "--num", "40", "--detector", p["det"], "--is")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # Zero up to scipy sqrtm's accuracy on this rank-39 covariance.
    assert abs(res["fid"]) < 1e-5 * np.trace(sigma) and res["num"] == 40 and res["is_mean"] >= 1.0

    r = _run_fid(
        "calc",
        "--network",
        p["gen"],
        "--ref",
        ref,
        "--num",
        "24",
        "--batch",
        "5",
        "--seeds",
        "3",
        "--detector",
        p["det"],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    net, info = load_network_file(p["gen"])
    images = to_uint8(generate(net, info, list(range(3, 27)), torch.device("cpu")))
    f = _features(p["det"], images)
    expected = _fd_eigh(f.mean(0), np.cov(f, rowvar=False), mu, sigma)
    assert res["fid"] == pytest.approx(expected, rel=1e-4) and res["fid"] > 0.1


def test_fid_cli_bad_input(pipeline, tmp_path):
    p = pipeline
    ref = tmp_path / "ref.npz"
    save_ref_stats(ref, np.zeros(64), np.eye(64))
    r = _run_fid("calc", "--images", p["data"], "--ref", str(ref), "--num", "50", "--detector", p["det"])
    assert r.exit_code != 0 and "40 images, fewer than the 50 requested" in r.output
    save_ref_stats(tmp_path / "r2048.npz", np.zeros(2048), np.eye(2048))
    r = _run_fid("calc", "--images", p["data"], "--ref", str(tmp_path / "r2048.npz"), "--detector", p["det"])
    assert r.exit_code != 0 and "r2048.npz: statistics of 2048-d features, but the detector gives 64-d" in r.output
    r = _run_fid("calc", "--images", p["data"], "--ref", str(ref), "--num", "50", "--detector", p["det"])
    assert r.exit_code != 0 and "40 images, fewer than the 50 requested" in r.output
    np.savez(tmp_path / "bad.npz", mu=np.zeros(5))
    r = _run_fid(
        "calc", "--network", p["gen"], "--ref", str(tmp_path / "bad.npz"), "--num", "4", "--detector", p["det"]
    )
    assert r.exit_code != 0 and "bad.npz" in r.output and "'mu' and 'sigma'" in r.output
    r = _run_fid(
        "calc", "--network", p["gen"], "--ref", str(ref), "--num", "4", "--detector", str(tmp_path / "none.pt")
    )
    assert r.exit_code != 0 and "none.pt: no such file" in r.output
    r = _run_fid("calc", "--ref", str(ref))
    assert r.exit_code != 0 and "exactly one of --network and --images" in r.output


@pytest.mark.slow
def test_fid_generation_is_the_same_on_two_processes(pipeline, tmp_path):
    p = pipeline
    ref = str(pipeline["root"] / "ref2.npz")
    assert _run_fid("ref", "--data", p["data"], "--dest", ref, "--detector", p["det"], "--workers", "0").exit_code == 0
    outs = []
    for nproc in (1, 2):
        js = tmp_path / f"r{nproc}.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "sid_fast.fid",
            "calc",
            "--network",
            p["gen"],
            "--ref",
            ref,
            "--num-images",
            "10",
            "--batch",
            "3",
            "--detector",
            p["det"],
            "--json",
            str(js),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(js.read_text().splitlines()[-1]))
    assert outs[0]["num"] == outs[1]["num"] == 10
    assert outs[1]["fid"] == pytest.approx(outs[0]["fid"], rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# DALI.


def _write_jpegs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(80, 64), (64, 96), (50, 50), (130, 100)]):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack(
            [128 + 100 * np.sin(xx / 7.0 + i), 128 + 100 * np.cos(yy / 9.0), 128 + 60 * np.sin((xx + yy) / 11.0)], -1
        )
        PIL.Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=92)


def test_pil_lanczos_matrix_reproduces_pil():
    from sid_fast.data.dali import pil_resize

    rng = np.random.default_rng(0)
    for side, out in ((77, 16), (64, 32), (33, 8), (16, 16)):
        a = rng.integers(0, 256, (3, side, side), dtype=np.uint8)
        ref = np.asarray(PIL.Image.fromarray(a.transpose(1, 2, 0)).resize((out, out), PIL.Image.LANCZOS)).transpose(
            2, 0, 1
        )
        got = pil_resize(torch.from_numpy(a), out).numpy()
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_dali_cpu_pipeline_matches_pil_within_one_level(tmp_path):
    pytest.importorskip("nvidia.dali")
    from sid_fast.data.dali import dali_batches

    _write_jpegs(tmp_path / "jpg")
    ds = ImageDataset(tmp_path / "jpg", resolution=32)
    ref = torch.stack([torch.from_numpy(ds[i][0]) for i in range(len(ds))])
    got = torch.cat(list(dali_batches(tmp_path / "jpg", 32, batch=3)))
    assert got.shape == ref.shape == (4, 3, 32, 32)
    assert (got.int() - ref.int()).abs().max() <= 1


def test_dali_missing_says_how_to_install(monkeypatch, tmp_path):
    from sid_fast.data import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
    with pytest.raises(DatasetError, match="pip install nvidia-dali-cuda120"):
        list(dali.dali_batches(tmp_path, 32))


# ----------------------------------------------------------------------------------------------------------------
# FID during training.


def test_trainer_computes_fid_at_snapshots(pipeline, tmp_path):
    from sid_fast.checkpoints import load_network_file, save_network
    from sid_fast.networks import build_network
    from sid_fast.sampling import latents_and_labels, onestep_sample, to_uint8
    from sid_fast.training.config import ConfigError, resolve_config
    from sid_fast.training.run import build_trainer

    kw = dict(
        model_type="SongUNet",
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    torch.manual_seed(1)
    save_network(tmp_path / "teacher.pt", build_network("EDMPrecond", kw), kw, kind="teacher")
    ref = str(pipeline["root"] / "ref3.npz")
    assert (
        _run_fid(
            "ref", "--data", pipeline["data"], "--dest", ref, "--detector", pipeline["det"], "--workers", "0"
        ).exit_code
        == 0
    )
    flags = dict(
        teacher=str(tmp_path / "teacher.pt"),
        resolution=8,
        channels=3,
        label_dim=0,
        cond=False,
        metrics="fid",
        metric_num=12,
        data_stat=ref,
        detector=pipeline["det"],
        batch=4,
        batch_gpu=4,
    )
    cfg = resolve_config("digits", flags)
    (tmp_path / "run").mkdir()
    tr = build_trainer(cfg, torch.device("cpu"), run_dir=tmp_path / "run", log=lambda *a: None)
    tr.step()
    value = tr.snapshot()["fid"]
    rec = json.loads((tmp_path / "run" / "metric-fid.jsonl").read_text().splitlines()[-1])
    assert rec["fid"] == value and rec["num"] == 12 and (tmp_path / "run" / "fid.png").is_file()
    # The same number from the saved snapshot, computed independently.
    net, _ = load_network_file(tmp_path / "run" / rec["snapshot"])
    z, labels, _ = latents_and_labels(net, list(range(12)))
    with torch.no_grad():
        f = _features(pipeline["det"], to_uint8(onestep_sample(net, z, cfg.init_sigma, labels)))
    mu, sigma = load_ref_stats(ref)
    assert value == pytest.approx(_fd_eigh(f.mean(0), np.cov(f, rowvar=False), mu, sigma), rel=1e-4)
    # Missing statistics or detector: refused when the trainer is built.
    with pytest.raises(ConfigError, match="--data-stat"):
        resolve_config("digits", dict(flags, data_stat=None))
    with pytest.raises(ConfigError, match="gone.npz: no such file"):
        build_trainer(resolve_config("digits", dict(flags, data_stat=str(tmp_path / "gone.npz"))), torch.device("cpu"))

    # FID and FD-DINOv2 from one set of images (EDM2's metrics), against an EDM2-format reference holding both.
    from test_dinov2 import tiny_dinov2

    from sid_fast.metrics.dinov2 import load_dinov2

    dino = str(tiny_dinov2(tmp_path / "dinov2.pth"))
    both = str(tmp_path / "ref.pkl")
    r = _run_fid("ref", "--data", pipeline["data"], "--dest", both, "--metrics", "fid,fd_dinov2", "--detector",
                 pipeline["det"], "--dinov2", dino, "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.output
    (tmp_path / "run2").mkdir()
    flags2 = dict(flags, metrics="fid,fd-dinov2", data_stat=both, dinov2=dino)
    tr = build_trainer(resolve_config("digits", flags2), torch.device("cpu"), run_dir=tmp_path / "run2", log=print)
    tr.step()
    values = tr.snapshot()
    assert set(values) == {"fid", "fd_dinov2"}
    rec = json.loads((tmp_path / "run2" / "metric-fd_dinov2.jsonl").read_text().splitlines()[-1])
    assert rec["fd_dinov2"] == values["fd_dinov2"] and (tmp_path / "run2" / "fd_dinov2.png").is_file()
    net, info = load_network_file(tmp_path / "run2" / rec["snapshot"])
    assert info["meta"]["metrics"] == values  # the generator folder's config.json carries both
    z, labels, _ = latents_and_labels(net, list(range(12)))
    with torch.no_grad():
        f = load_dinov2(dino).features(to_uint8(onestep_sample(net, z, cfg.init_sigma, labels))).numpy()
    mu, sigma = load_ref_stats(both, metric="fd_dinov2")
    assert values["fd_dinov2"] == pytest.approx(_fd_eigh(f.mean(0), np.cov(f, rowvar=False), mu, sigma), rel=1e-4)
    with pytest.raises(ConfigError, match=r"ref3.npz: an .npz holds one metric's statistics; both need EDM2's .pkl"):
        build_trainer(resolve_config("digits", dict(flags2, data_stat=ref)), torch.device("cpu"))


def _write_cifar_tarball(path, batches, evil=False):
    import io as _io
    import pickle
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for i, (data, labels) in enumerate(batches, start=1):
            obj = {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data}
            raw = pickle.dumps(obj, protocol=2)
            if evil and i == 1:
                raw = pickle.dumps(os.system, protocol=2)  # a global the reader must refuse
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(raw)
            tar.addfile(info, _io.BytesIO(raw))


def test_dataset_tool_reads_the_cifar10_tarball(tmp_path):
    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(0, 256, (2, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 2)]) for _ in range(5)
    ]
    tgz = tmp_path / "cifar-10-python.tar.gz"
    _write_cifar_tarball(tgz, batches)
    r = CliRunner().invoke(dataset_tool.main, ["--source", str(tgz), "--dest", str(tmp_path / "cifar10-32x32.zip")])
    assert r.exit_code == 0, r.output
    ds = ImageDataset(tmp_path / "cifar10-32x32.zip")
    assert len(ds) == 10 and ds.image_shape == [3, 32, 32]
    want = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)
    labels = [c for _, cs in batches for c in cs]
    for i in (0, 3, 9):  # batch order, CHW pixels and labels as EDM's tool stores them
        img, onehot = ds[i]
        assert np.array_equal(img, want[i]) and int(np.argmax(onehot)) == labels[i]
    _write_cifar_tarball(tmp_path / "evil.tar.gz", batches, evil=True)
    r = CliRunner().invoke(
        dataset_tool.main, ["--source", str(tmp_path / "evil.tar.gz"), "--dest", str(tmp_path / "e.zip")]
    )
    assert (
        r.exit_code != 0
        and "evil.tar.gz: not a readable CIFAR-10 python tarball" in r.output
        and "not allowed" in r.output
    )
