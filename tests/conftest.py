"""Test harness: Triton interpreter without CUDA, deterministic seeds, TF32 off (EDM/SiD parity)."""

import os
import sys

import torch

# The suite starts about a hundred Python processes (train.py runs, the CLIs, gloo ranks): they reuse compiled bytecode
# (__pycache__, git-ignored) even where the environment turns writing it off, about 0.4 s of start-up each.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Must be set before any @triton.jit kernel is defined (i.e. before sid_fast/kernels/ is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _determinism():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # SID_FAST_TEST_THREADS pins the thread count (the portability run checks 1 and 2); default: up to 2, as CI has,
    # shared among pytest-xdist's workers when the suite runs with -n (one thread each on CI's two cores).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    default = max(1, min(2, os.cpu_count() or 1) // workers)
    torch.set_num_threads(int(os.environ.get("SID_FAST_TEST_THREADS", 0)) or default)
    yield


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """helpers.NET with non-trivial output layers (so that every path carries gradient), saved as a sid_fast file."""
    from support.helpers import NET

    from sid_fast.checkpoints import save_network
    from sid_fast.networks import build_network

    torch.manual_seed(0)
    net = build_network("EDMPrecond", NET)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "conv1" in name or "proj" in name or "aux_conv" in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_network(path, net, NET, kind="teacher")
    return str(path)
