"""sid_fast/kernels/sid_loss.py against a float64 reference (Triton interpreter on CPU; bf16 and compile on GPU)."""

import pytest
import torch
from support.helpers import assert_kernel_within_torch

from sid_fast.kernels.sid_loss import sid_loss_rows, sid_loss_rows_ref

ALPHA, SCALE = 1.2, 100.0 / 8

# (shape, why)
SHAPES = [
    ((2, 3, 8, 8), "small EDM-like image"),
    ((1, 1, 5, 7), "batch 1; D = 35, not a power of two, below one block"),
    ((3, 3, 16, 16), "D = 768: the row loop runs over several blocks"),
    ((5, 1, 16, 16), "the digits shape"),
]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    r = x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    f = r + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (x, r, f)]


def _total_and_grads(fn, x, r, f):
    row, w, ok = fn(x, r, f)
    total = row.sum() * SCALE
    grads = torch.autograd.grad(total, (x, r, f))
    return total.detach(), row.detach(), ok, grads


@pytest.mark.parametrize("shape,why", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(shape, why, dtype):
    x, r, f = _inputs(shape, dtype)
    x64, r64, f64 = (t.detach().double().requires_grad_(True) for t in (x, r, f))  # the same (rounded) values
    ref = _total_and_grads(lambda *a: sid_loss_rows_ref(*a, ALPHA), x64, r64, f64)
    ker = _total_and_grads(lambda *a: sid_loss_rows(*a, ALPHA), x, r, f)
    pt = _total_and_grads(lambda *a: sid_loss_rows_ref(*a, ALPHA, upcast=False), x, r, f)  # PyTorch at `dtype`
    assert ker[2].all()
    for i, name in ((0, "total"), (1, "rows")):
        atol = 1e-6 * ref[i].abs().max().item()
        assert_kernel_within_torch(ker[i], pt[i], ref[i], atol, msg=str((name, why)))
    for gk, gp, gr, name in zip(ker[3], pt[3], ref[3], ("x_g", "y_real", "y_fake")):
        assert gk.dtype == dtype and gk.shape == shape
        atol = 1e-6 * gr.abs().max().item()
        assert_kernel_within_torch(gk, gp, gr, atol, msg=str((name, why)))


@pytest.mark.parametrize("nan_rows", [[0], [1, 3], [0, 1, 2, 3, 4]])
def test_nan_rows_are_masked(nan_rows):
    x, r, f = _inputs((5, 1, 16, 16), torch.float32, seed=1)
    with torch.no_grad():
        for i, row in enumerate(nan_rows):
            (x, r, f)[i % 3][row, 0, 3, 4] = float("nan")
    tk, rk, okk, gk = _total_and_grads(lambda *a: sid_loss_rows(*a, ALPHA), x, r, f)
    tr, rr, okr, gr = _total_and_grads(lambda *a: sid_loss_rows_ref(*a, ALPHA), x, r, f)
    assert torch.equal(okk, okr) and okk.sum().item() == 5 - len(nan_rows)
    torch.testing.assert_close(rk, rr, rtol=1e-5, atol=1e-4)
    for a, b in zip(gk, gr):
        assert torch.isfinite(a).all()
        assert torch.all(a[nan_rows] == 0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_weight_is_clipped_and_returned():
    x = torch.randn(2, 1, 4, 4)
    _, w, _ = sid_loss_rows(x, x.clone(), x + 1, ALPHA)
    torch.testing.assert_close(w, torch.full((2,), 1e-5))
    _, w, _ = sid_loss_rows(x, x + 0.5, x, ALPHA)
    torch.testing.assert_close(w, torch.full((2,), 0.5))


def test_non_contiguous_inputs():
    x, r, f = (t.detach() for t in _inputs((2, 8, 8, 3), torch.float32))
    views = [t.permute(0, 3, 1, 2) for t in (x, r, f)]  # channels_last-like strides
    assert not views[0].is_contiguous()
    a, _, _ = sid_loss_rows(*views, ALPHA)
    b, _, _ = sid_loss_rows(*(v.contiguous() for v in views), ALPHA)
    torch.testing.assert_close(a, b)


def test_bad_inputs_are_refused():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="one shape"):
        sid_loss_rows(x, x, x[:1], ALPHA)
    with pytest.raises(ValueError, match="one dtype"):
        sid_loss_rows(x, x.half(), x, ALPHA)
    with pytest.raises(ValueError, match="one dtype"):
        sid_loss_rows(x.long(), x.long(), x.long(), ALPHA)
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\]"):
        sid_loss_rows(x[0, 0, 0], x[0, 0, 0], x[0, 0, 0], ALPHA)


def test_reference_fallback_without_triton(monkeypatch):
    x, r, f = (t.detach() for t in _inputs((2, 3, 8, 8), torch.float32))
    a = sid_loss_rows(x, r, f, ALPHA)[0]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernel runs on GPU tensors; the fallback is for CPU tensors without the interpreter")
    b = sid_loss_rows(x, r, f, ALPHA)[0]  # CPU tensors, no interpreter: the torch reference
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference_and_compiles(dtype):
    x, r, f = (t.detach().cuda().requires_grad_(True) for t in _inputs((16, 3, 32, 32), dtype))
    ref = _total_and_grads(
        lambda *a: sid_loss_rows_ref(*a, ALPHA), *(t.detach().double().requires_grad_(True) for t in (x, r, f))
    )
    pt = _total_and_grads(lambda *a: sid_loss_rows_ref(*a, ALPHA, upcast=False), x, r, f)
    ker = _total_and_grads(lambda *a: sid_loss_rows(*a, ALPHA), x, r, f)
    assert_kernel_within_torch(ker[0], pt[0], ref[0], 1e-6 * ref[0].abs().item())
    for gk, gp, gr in zip(ker[3], pt[3], ref[3]):
        assert_kernel_within_torch(gk, gp, gr, 1e-6 * gr.abs().max().item())

    @torch.compile(fullgraph=True)
    def step(x, r, f):
        return sid_loss_rows(x, r, f, ALPHA)[0].sum() * SCALE

    comp = step(x, r, f)
    torch.testing.assert_close(comp, ker[0].to(comp.dtype), rtol=1e-5, atol=1e-5)
