"""sid_fast/kernels/group_norm_silu.py against a float64 reference (Triton interpreter on CPU), forward and backward."""

import pytest
import torch
from support.helpers import assert_kernel_within_torch

from sid_fast.kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref

# (N, C, H, W, groups, why) -- groups follow EDM's rule min(32, C // 4) unless noted.
SHAPES = [
    (2, 64, 8, 8, 16, "EDM rule at C=64"),
    (1, 12, 5, 7, 3, "batch 1, HW = 35 (not a power of two), 4 channels per group"),
    (2, 32, 16, 16, 8, "HW = 256: several blocks per channel"),
    (3, 8, 4, 4, 2, "small C"),
    (2, 24, 9, 9, 4, "6 channels per group (ADM's 192 / 32): a masked channel tile, HW = 81"),
]


def _inputs(n, c, h, w, dtype, modulate, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
    gamma = 1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
    beta = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
    scale = 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64) if modulate else None
    shift = 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64) if modulate else None
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [t.to(dtype) if t is not None else None for t in (gamma, beta, scale, shift)]
    return [x] + params


def _run(fn, x, gamma, beta, scale, shift, groups, silu, dy):
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, gamma, beta, scale, shift)
    ]
    y = fn(leaves[0], leaves[1], leaves[2], groups, 1e-5, leaves[3], leaves[4], silu)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    return y.detach(), grads


@pytest.mark.parametrize("n,c,h,w,groups,why", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("modulate", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_float64_reference(n, c, h, w, groups, why, dtype, modulate, channels_last):
    silu = True
    ins = _inputs(n, c, h, w, dtype, modulate, channels_last)
    dy = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref = _run(
        lambda *a: group_norm_silu_ref(*a), *[t.double() if t is not None else None for t in ins], groups, silu, dy
    )
    ker = _run(group_norm_silu, *ins, groups, silu, dy)
    pt = _run(lambda *a: group_norm_silu_ref(*a, upcast=False), *ins, groups, silu, dy)
    assert ker[0].dtype == dtype and ker[0].shape == (n, c, h, w)
    if channels_last:
        assert ker[0].is_contiguous(memory_format=torch.channels_last)
    assert_kernel_within_torch(ker[0], pt[0], ref[0], 1e-6 * ref[0].abs().max().item(), msg=why)
    names = ["x", "gamma", "beta", "scale", "shift"][: len(ref[1])]
    for name, gk, gp, gr in zip(names, ker[1], pt[1], ref[1]):
        assert_kernel_within_torch(gk, gp, gr, 1e-5 * gr.abs().max().item(), msg=str((name, why)))


@pytest.mark.parametrize("silu", [False, True])
def test_without_silu_is_plain_group_norm(silu):
    x, gamma, beta, _, _ = _inputs(2, 16, 4, 4, torch.float32, False, False)
    y = group_norm_silu(x, gamma, beta, 4, 1e-6, silu=silu)
    expect = torch.nn.functional.group_norm(x, 4, gamma, beta, 1e-6)
    torch.testing.assert_close(y, torch.nn.functional.silu(expect) if silu else expect, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    x, gamma, beta, scale, shift = _inputs(2, 12, 4, 4, torch.float32, True, False)
    with pytest.raises(ValueError, match="not divisible by 5 groups"):
        group_norm_silu(x, gamma, beta, 5)
    with pytest.raises(ValueError, match="both scale and shift"):
        group_norm_silu(x, gamma, beta, 3, scale=scale)
    with pytest.raises(ValueError, match=r"must be \[2, 12\]"):
        group_norm_silu(x, gamma, beta, 3, scale=scale[:1], shift=shift[:1])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        group_norm_silu(x[0], gamma, beta, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("modulate", [False, True])
def test_gpu_matches_reference_and_compiles(dtype, modulate):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 128, 16, 16, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (
        torch.randn(128, device="cuda", generator=g).to(dtype),
        torch.randn(128, device="cuda", generator=g).to(dtype),
    )
    s, t = (
        ((0.1 * torch.randn(8, 128, device="cuda", generator=g)).to(dtype) for _ in range(2))
        if modulate
        else (None, None)
    )
    ref = group_norm_silu_ref(
        x.double(),
        w.double(),
        b.double(),
        32,
        1e-5,
        None if s is None else s.double(),
        None if t is None else t.double(),
    )
    pt = group_norm_silu_ref(x, w, b, 32, 1e-5, s, t, upcast=False)
    ker = group_norm_silu(x, w, b, 32, 1e-5, s, t)
    assert (ker.double() - ref).abs().max() <= 2 * (pt.double() - ref).abs().max() + 1e-5

    @torch.compile(fullgraph=True)
    def f(x):
        return group_norm_silu(x, w, b, 32, 1e-5, s, t)

    torch.testing.assert_close(f(x), ker)
