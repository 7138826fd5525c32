"""The studies' own tests (pytest collects them with tests/): one thread per pytest-xdist worker, fixed seeds."""

import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _determinism():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // workers))
    yield
