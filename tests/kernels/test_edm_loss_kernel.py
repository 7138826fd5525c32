"""sid_fast/kernels/edm_loss.py (SiD's fake-score loss) against a float64 reference under the Triton interpreter."""

import pytest
import torch
from support.helpers import assert_kernel_within_torch

from sid_fast.kernels.edm_loss import edm_loss_rows, edm_loss_rows_ref

SHAPES = [((2, 3, 8, 8), "small image"), ((1, 1, 5, 7), "batch 1, D = 35"), ((3, 3, 16, 16), "several blocks per row")]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    D = y + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = (torch.randn(shape[0], generator=g, dtype=torch.float64) * 1.2 - 1.2).exp()
    lam = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    return D.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True), lam.float()


def _run(fn, D, y, lam):
    row, ok = fn(D, y, lam)
    total = row.sum()
    return total.detach(), ok, torch.autograd.grad(total, (D, y))


@pytest.mark.parametrize("shape,why", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(shape, why, dtype):
    D, y, lam = _inputs(shape, dtype)
    D64, y64 = (t.detach().double().requires_grad_(True) for t in (D, y))
    ref = _run(edm_loss_rows_ref, D64, y64, lam.double())
    ker = _run(edm_loss_rows, D, y, lam)
    pt = _run(lambda *a: edm_loss_rows_ref(*a, upcast=False), D, y, lam.to(dtype))
    assert ker[1].all()
    assert_kernel_within_torch(ker[0], pt[0], ref[0], 1e-6 * ref[0].abs().item(), msg=why)
    for gk, gp, gr in zip(ker[2], pt[2], ref[2]):
        assert gk.dtype == dtype
        assert_kernel_within_torch(gk, gp, gr, 1e-6 * gr.abs().max().item(), msg=why)


def test_nan_rows_masked_and_bad_input():
    D, y, lam = _inputs((4, 1, 8, 8), torch.float32, seed=2)
    with torch.no_grad():
        D[1, 0, 2, 2] = float("nan")
        y[3, 0, 0, 0] = float("nan")
    tk, okk, gk = _run(edm_loss_rows, D, y, lam)
    tr, okr, gr = _run(edm_loss_rows_ref, D, y, lam)
    assert okk.tolist() == [True, False, True, False] and torch.equal(okk, okr)
    torch.testing.assert_close(tk, tr, rtol=1e-5, atol=1e-4)
    for a, b in zip(gk, gr):
        assert torch.all(a[[1, 3]] == 0) and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with pytest.raises(ValueError, match="lam has 3 values for 4 rows"):
        edm_loss_rows(D, y, lam[:3])
    with pytest.raises(ValueError, match="one dtype"):
        edm_loss_rows(D, y.half(), lam)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference_and_compiles(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    D = torch.randn(16, 3, 32, 32, device="cuda", generator=g).to(dtype).requires_grad_(True)
    y = torch.randn(16, 3, 32, 32, device="cuda", generator=g).to(dtype)
    lam = torch.rand(16, device="cuda", generator=g) + 0.5
    ref = edm_loss_rows_ref(D.double(), y.double(), lam.double())[0].sum()
    pt = edm_loss_rows_ref(D, y, lam, upcast=False)[0].float().sum()  # PyTorch's own error in this dtype
    ker = edm_loss_rows(D, y, lam)[0].sum()
    assert (ker.double() - ref).abs().item() <= 2 * (pt.double() - ref).abs().item() + 1e-5 * ref.abs().item()
    (gk,) = torch.autograd.grad(ker, D)
    (gr,) = torch.autograd.grad(edm_loss_rows_ref(D.double(), y.double(), lam.double())[0].sum(), D)
    assert (gk.double() - gr.double()).abs().max().item() <= 1e-2 * gr.abs().max().item()

    @torch.compile(fullgraph=True)
    def f(D, y, lam):
        return edm_loss_rows(D, y, lam)[0].sum()

    torch.testing.assert_close(f(D, y, lam), ker, rtol=1e-5, atol=1e-5)
