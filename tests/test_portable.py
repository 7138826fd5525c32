"""A portable install: sampling and the reference path without Triton, the digits without scikit-learn, no GPU wheels
pulled on a CPU machine. (The digits default trains without either in tests/test_train_cli.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Importing triton fails as on macOS/Windows (no wheels): a None entry in sys.modules makes `import triton` raise.
_NO_TRITON = "import sys; sys.modules['triton'] = None\n"


def _run(code, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", _NO_TRITON + code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_sampling_and_a_reference_step_run_without_triton(tmp_path):
    out = _run(
        """
import torch, sid_fast.sampling, sid_fast.sample, sid_fast.fid, sid_fast.hub, sid_fast.training.run
from sid_fast import ops
from sid_fast.checkpoints import load_network_file
net, info = load_network_file('%s')
x = sid_fast.sampling.generate(net, info, [0, 1], 'cpu', sampler='heun', steps=2)
assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
with ops.kernels('sdpa'):  # SDPA is torch's own: no Triton needed
    net(x, torch.ones(2))
try:
    ops.parse('all')
except ValueError as e:
    print('REFUSED', e)
print('TRITON', [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] == 'triton'])
"""
        % (ROOT / "sid_fast" / "assets" / "digits_teacher.pt"),
        tmp_path,
    )
    assert "TRITON []" in out
    assert "REFUSED --kernels ada_norm,attention,edm_loss,group_norm_silu,sid_loss needs the triton package" in out


def test_bundled_digits_are_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    from sid_fast.data.digits import ASSET, digits_uint8

    d = datasets.load_digits()
    with np.load(ASSET) as f:
        assert np.array_equal(f["images"], d.images) and np.array_equal(f["labels"], d.target)
    imgs, labels = digits_uint8()
    assert imgs.shape == (1797, 1, 8, 8) and imgs.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(imgs[:, 0], np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8))


@pytest.mark.slow
def test_installing_sid_fast_with_every_extra_pulls_no_gpu_wheels_and_keeps_torch(tmp_path):
    """pip's resolution (a dry run against the package index) of sid_fast with all its extras, on this machine's
    torch: nothing CUDA (nvidia-*, cuda-*), no second torch, no other triton."""
    extras = "test,tensorboard,wandb,hub,edm2,sd"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(tmp_path / "r.json")]
        + ["-e", f"{ROOT}[{extras}]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0 and ("Could not find" in r.stderr or "connection" in r.stderr.lower()):
        pytest.skip(f"no package index reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    names = [i["metadata"]["name"].lower() for i in json.loads((tmp_path / "r.json").read_text())["install"]]
    gpu = [n for n in names if n.startswith(("nvidia-", "cuda-")) or n in ("torch", "triton", "xformers")]
    assert not gpu, gpu
