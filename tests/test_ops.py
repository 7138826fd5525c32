"""sid_fast.ops: one scoped switch for all four ops, nothing leaking; sid_fast.kernels imports nothing else of
sid_fast."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sid_fast import ops
from sid_fast.training.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parent.parent


def _spy(monkeypatch):
    """Record which implementation each op dispatches to (the real ones still run)."""
    # By module path: sid_fast/kernels/__init__ re-exports functions named like their modules (group_norm_silu).
    ka, ke, kg, ks = (
        importlib.import_module(f"sid_fast.kernels.{m}")
        for m in ("attention", "edm_loss", "group_norm_silu", "sid_loss")
    )

    calls = []
    for mod, name in ((ks, "sid_loss_rows"), (ke, "edm_loss_rows"), (kg, "group_norm_silu"), (ka, "flash_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    real_sdpa = ops.attention_sdpa  # imported by name into ops
    monkeypatch.setattr(ops, "attention_sdpa", lambda *a, **k: calls.append("attention_sdpa") or real_sdpa(*a, **k))
    return calls


def _call_all():
    x = torch.randn(2, 8, 4, 4)
    ops.sid_generator_loss_sum(x, x + 0.1, x + 0.2, 1.2)
    ops.fake_score_loss_sum(x, x + 0.1, torch.ones(2, 1, 1, 1))
    ops.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5)
    ops.attention(torch.randn(2, 24, 4, 4), 1)


def test_scope_selects_and_restores(monkeypatch):
    calls = _spy(monkeypatch)
    _call_all()
    assert calls == []  # outside every scope: the references
    with ops.kernels("all"):
        _call_all()
    assert calls == ["sid_loss_rows", "edm_loss_rows", "group_norm_silu", "flash_attention"]
    calls.clear()
    _call_all()
    assert calls == [] and ops.current() == ops.Selection()
    with ops.kernels("sdpa,sid_loss"):
        _call_all()
        with ops.kernels("none"):  # an inner scope can turn everything off
            _call_all()
    assert calls == ["sid_loss_rows", "attention_sdpa"]


def test_scope_restores_when_it_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with ops.kernels("all"):
            assert ops.current().kernels == ops.KERNELS
            raise RuntimeError("boom")
    assert ops.current() == ops.Selection()


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown kernels"):
        ops.parse("flash")
    with pytest.raises(ValueError, match="pick one"):
        ops.parse("attention,sdpa")
    with pytest.raises(ConfigError, match="--kernels 'flash'"):
        resolve_config("digits", dict(kernels="flash"))


@pytest.mark.parametrize(
    "module",
    [
        "sid_fast.kernels",
        "sid_fast.kernels._common",
        "sid_fast.kernels.sid_loss",
        "sid_fast.kernels.edm_loss",
        "sid_fast.kernels.group_norm_silu",
        "sid_fast.kernels.attention",
    ],
)
def test_kernel_modules_import_nothing_from_sid_fast(module):
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('sid_fast.')"
        " and not m.startswith('sid_fast.kernels')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "[]"
