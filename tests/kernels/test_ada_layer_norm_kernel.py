"""sid_fast/kernels/ada_layer_norm.py against a float64 reference (Triton interpreter on CPU), forward and backward;
and its hold on diffusers' DiT modules (sid_fast.networks.dit): the op's reference is the modules' own expression,
bit for bit, and a tiny SD3 transformer's output and gradients through the kernel stay within the unfused path's
rounding."""

import pytest
import torch
from support.helpers import assert_kernel_within_torch

from sid_fast import ops
from sid_fast.kernels.ada_layer_norm import ada_layer_norm, ada_layer_norm_ref, block_rows, rows_per_program

# (N, L, D, why): real widths with short sequences (the interpreter runs every row), and awkward ones.
SHAPES = [
    (2, 9, 1536, "SD3-Medium's width, L = 9 (three backward chunks of 4 rows, the last one short)"),
    (1, 5, 3072, "FLUX's width, batch 1"),
    (3, 4, 2432, "SD3.5-Large's width (not a power of two: a masked row)"),
    (2, 7, 48, "tiny width, L = 7"),
    (1, 1, 1, "one token of one channel (variance 0: y = shift)"),
]


def _inputs(n, length, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, d, generator=g, dtype=torch.float64) * 2 + 0.5
    scale = 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    shift = 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), (1 + scale.to(dtype)), shift.to(dtype)  # s1 = 1 + scale in the inputs' dtype, as callers do


def _run(fn, x, s1, shift, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, s1, shift)]
    y = fn(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, dy.to(y.dtype))


@pytest.mark.parametrize("n,length,d,why", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(n, length, d, why, dtype):
    """fp32 and fp16 (the Triton interpreter stores bf16 by truncation, where GPUs round to nearest: a bf16 store is
    checked on the GPU, bench/acceptance.sh)."""
    x, s1, shift = _inputs(n, length, d, dtype)
    dy = torch.randn(n, length, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref = _run(lambda *a: ada_layer_norm_ref(*a, 1e-6), x.double(), s1.double(), shift.double(), dy)
    ker = _run(lambda *a: ada_layer_norm(*a, 1e-6), x, s1, shift, dy)
    pt = _run(lambda *a: ada_layer_norm_ref(*a, 1e-6), x, s1, shift, dy)
    assert ker[0].dtype == dtype and ker[0].shape == (n, length, d)
    assert_kernel_within_torch(ker[0], pt[0], ref[0], 1e-6 * ref[0].abs().max().item(), msg=why)
    for name, gk, gp, gr in zip(("x", "s1", "shift"), ker[1], pt[1], ref[1]):
        assert gk.dtype == dtype
        assert_kernel_within_torch(gk, gp, gr, 1e-5 * max(gr.abs().max().item(), 1e-30), msg=str((name, why)))


def test_under_autocast_the_op_writes_the_expressions_dtype():
    """Under bf16 autocast the op writes bf16, the autocast dtype (on this CPU also the expression's: layer_norm stays
    in bf16; CUDA autocast's float32 layer_norm output is cast to bf16 by every consumer) and agrees with the
    expression to bf16 rounding (the interpreter's bf16 store truncates: two ulps)."""
    x, scale, shift = (t.to(torch.bfloat16) for t in _inputs(2, 6, 64, torch.float64))
    scale = scale - 1
    with torch.autocast("cpu", torch.bfloat16):
        want = torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        with ops.kernels("ada_norm"):
            got = ops.ada_layer_norm(x, scale, shift, 1e-6)
        with ops.kernels("none"):
            same = ops.ada_layer_norm(x, scale, shift, 1e-6)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(same, want)  # the reference is the expression itself
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


def test_backward_chunks_and_tiles_cover_every_row():
    """A sequence longer than a backward program's chunk and not a multiple of it, nor of the tile: ds1 and dshift
    (per-chunk partial sums, added by torch) and dx equal the float64 reference's (a dropped or doubled chunk or tile
    moves dshift by whole rows of dy)."""
    length = 1100
    rows = rows_per_program(length)
    assert length > rows and length % rows and rows % block_rows() == 0 and length % block_rows()
    x, s1, shift = _inputs(2, length, 16, torch.float32)
    dy = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = _run(lambda *a: ada_layer_norm_ref(*a, 1e-6), x.double(), s1.double(), shift.double(), dy)
    ker = _run(lambda *a: ada_layer_norm(*a, 1e-6), x, s1, shift, dy)
    torch.testing.assert_close(ker[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    for gk, gr in zip(ker[1], ref[1]):
        torch.testing.assert_close(gk.double(), gr, rtol=1e-5, atol=1e-5 * gr.abs().max().item())


def test_on_the_meta_device_the_op_runs_its_shape_functions():
    """bench.memory counts a DiT step on the meta device: the op (forward and backward) gives tensors of the right
    shape and dtype there, inside the kernel's scope."""
    leaves = [torch.empty(s, device="meta", dtype=torch.bfloat16, requires_grad=True) for s in ((2, 5, 64), (2, 64),
                                                                                              (2, 64))]  # fmt: skip
    with ops.kernels("ada_norm"):
        y = ops.ada_layer_norm(*leaves, 1e-6)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 5, 64), torch.bfloat16)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, t.dtype) for t in leaves]


def test_bad_inputs_are_refused():
    x, s1, shift = _inputs(2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match=r"\[N, L, D\]"):
        ada_layer_norm(x[0], s1, shift)
    with pytest.raises(ValueError, match=r"must be \[2, 8\]"):
        ada_layer_norm(x, s1[:1], shift[:1])
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        ada_layer_norm(x.double(), s1, shift)


# ----------------------------------------------------------------------------------------------------------------
# The DiT modules.

pytest.importorskip("diffusers")


def test_fused_modules_equal_diffusers_and_the_kernel_stays_within_rounding(tmp_path):
    """A tiny SD3 transformer: with its adaLN modules given the op's forward, the reference path equals diffusers'
    own forward bit for bit (outputs and gradients); the kernel's output and gradients differ from it by float32
    rounding only. Planted: scale and shift swapped in the modules' forward is caught by the same comparison."""
    import copy

    from support.sd3_tiny import write_tiny_sd3

    from sid_fast.networks import dit
    from sid_fast.t2i.sd3 import load_sd3

    net = load_sd3(write_tiny_sd3(tmp_path / "sd3")).transformer.float().requires_grad_(True)
    fused = copy.deepcopy(net)
    counted = dit.fuse_adaln(fused)
    # norm1 and norm1_context of every block (the last block's context norm is an AdaLayerNormContinuous), norm_out
    assert counted == 2 * len(net.transformer_blocks) + 1
    g = torch.Generator().manual_seed(0)
    cfg = net.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([300.0, 800.0])

    def run(m, kernels):
        m.zero_grad(set_to_none=True)
        with ops.kernels(kernels):
            out = m(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)[0]
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    base, base_g = run(net, "none")
    ref, ref_g = run(fused, "none")
    assert len(ref_g) == len(base_g) == len(list(net.parameters()))
    assert torch.equal(ref, base) and all(torch.equal(a, b) for a, b in zip(ref_g, base_g))
    ker, ker_g = run(fused, "ada_norm")
    scale = base.abs().max().item()
    assert (ker - base).abs().max().item() < 1e-5 * scale
    assert max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-12) for a, b in zip(ker_g, base_g)) < 1e-4

    def swapped(self, x, conditioning_embedding):  # planted: shift and scale exchanged
        shift, scale = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return ops.ada_layer_norm(x, scale, shift, self.norm.eps)

    import types

    fused.norm_out.forward = types.MethodType(swapped, fused.norm_out)
    bad, _ = run(fused, "ada_norm")
    assert (bad - base).abs().max().item() > 1e-2 * scale
