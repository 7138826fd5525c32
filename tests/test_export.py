"""Deployment: the AOTInductor export and the native sampler built with CMake (ctest smoke test), and bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sid_fast import export
from sid_fast.checkpoints import save_network
from sid_fast.networks import build_network

ROOT = Path(__file__).resolve().parent.parent
NET = dict(
    model_type="SongUNet",
    img_resolution=8,
    img_channels=1,
    label_dim=0,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


@pytest.mark.slow
def test_native_sampler_builds_and_matches_python(tmp_path):
    """cmake configure + build of sid_sample, then ctest's native_smoke: images <= 1 grey level, raw <= 1e-5."""
    build = tmp_path / "build"
    env_py = f"-DSID_FAST_PYTHON={sys.executable}"
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), env_py], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(
        ["ctest", "--test-dir", str(build), "-R", "native_smoke", "--output-on-failure"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "native smoke test passed" in r.stdout or "100% tests passed" in r.stdout


def test_export_refuses_bad_input(tmp_path):
    torch.manual_seed(0)
    net = build_network("EDMPrecond", NET)
    save_network(tmp_path / "teacher.pt", net, NET, kind="teacher")
    save_network(tmp_path / "gen.pt", net, NET, kind="generator", sigma_init=2.5)
    run = lambda *a: CliRunner().invoke(export.main, list(map(str, a)))  # noqa: E731
    r = run("--network", tmp_path / "teacher.pt", "--out", tmp_path / "g.pt2")
    assert (
        r.exit_code != 0 and "teacher.pt: not a sid_fast generator snapshot" in r.output and "--init-sigma" in r.output
    )
    r = run("--network", tmp_path / "missing.pt", "--out", tmp_path / "g.pt2")
    assert r.exit_code != 0 and "missing.pt: no such file" in r.output
    r = run("--network", tmp_path / "gen.pt", "--out", tmp_path / "g.bin")
    assert r.exit_code != 0 and "must end in .pt2" in r.output
    r = run("--network", tmp_path / "gen.pt", "--out", tmp_path / "g.pt2", "--max-batch", "0")
    assert r.exit_code != 0 and "--max-batch" in r.output
    if not torch.cuda.is_available():
        r = run("--network", tmp_path / "gen.pt", "--out", tmp_path / "g.pt2", "--device", "cuda")
        assert r.exit_code != 0 and "no CUDA device" in r.output
    assert not list(tmp_path.glob("*.pt2"))


def test_exported_module_is_the_python_sampler():
    """The module that gets exported computes exactly onestep_sample on latents_and_labels (eager, no compile)."""
    from sid_fast.sampling import latents_and_labels, onestep_sample

    kw = dict(NET, img_channels=3, label_dim=4)
    torch.manual_seed(1)
    net = build_network("EDMPrecond", kw).eval()
    gen = export.OneStepGenerator(net, 2.5)
    seeds = [3, 1, 4, 1, 5]
    z, labels_idx = export.example_inputs(gen, len(seeds), "cpu", seeds)
    z_ref, onehot, _ = latents_and_labels(net, seeds)
    assert torch.equal(z, z_ref) and torch.equal(torch.nn.functional.one_hot(labels_idx, 4).float(), onehot)
    with torch.no_grad():
        assert torch.equal(gen(z, labels_idx), onestep_sample(net, z_ref, 2.5, onehot))


@pytest.mark.gpu
def test_cuda_package_matches_eager(tmp_path):
    torch.manual_seed(0)
    kw = dict(NET, label_dim=3, attn_resolutions=[4])
    save_network(tmp_path / "gen.pt", build_network("EDMPrecond", kw), kw, kind="generator", sigma_init=2.5)
    pkg = export.export_generator(tmp_path / "gen.pt", tmp_path / "gen.pt2", device="cuda", max_batch=8)
    runner = torch._inductor.aoti_load_package(str(pkg))
    gen, _ = export.generator_from_file(tmp_path / "gen.pt")
    gen = gen.cuda()
    x = export.example_inputs(gen, 8, "cuda", range(8))
    with torch.no_grad():
        assert (runner(*x) - gen(*x)).abs().max().item() <= 1e-4
    binary = shutil.which("sid_sample")
    if binary:  # a sid_sample built on this machine: CUDA latents drawn as in Python
        r = subprocess.run(
            [
                binary,
                "--package",
                str(pkg),
                "--seeds",
                "0-7",
                "--outdir",
                str(tmp_path / "o"),
                "--raw",
                str(tmp_path / "raw.npy"),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        import numpy as np

        with torch.no_grad():
            ref = gen(*x).cpu().numpy()
        assert np.abs(np.load(tmp_path / "raw.npy") - ref).max() <= 1e-4
