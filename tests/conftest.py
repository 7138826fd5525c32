"""Test harness: Triton interpreter without CUDA, deterministic seeds, TF32 off (EDM/SiD parity)."""

import os

import torch

# Must be set before any @triton.jit kernel is defined (i.e. before kernels/ is imported).
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
    # SID_FAST_TEST_THREADS pins the thread count (the portability run checks 1 and 2); default: up to 2, as CI has.
    torch.set_num_threads(int(os.environ.get("SID_FAST_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))
    yield
