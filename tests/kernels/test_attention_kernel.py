"""sid_fast/kernels/attention.py (flash attention in EDM's qkv layout) against float64 (Triton interpreter on CPU; bf16,
EDM shapes and speed on GPU)."""

import pytest
import torch
from support.helpers import assert_kernel_within_torch, attention_reference_fp64, max_abs_err

from sid_fast import ops
from sid_fast.kernels.attention import attention_edm, flash_attention

# (N, heads, d, H, W, why)
SHAPES = [
    (2, 1, 16, 4, 4, "L = 16, one block"),
    (2, 2, 16, 5, 7, "L = 35: not a multiple of the block; two heads"),
    (1, 1, 24, 6, 6, "d = 24: not a power of two (masked channels); batch 1"),
    (1, 1, 64, 8, 8, "d = 64 as ADM, L = 64 as at 8x8"),
    (1, 1, 256, 4, 4, "d = 256 as DDPM++'s single head"),
]


def _inputs(n, heads, d, h, w, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, heads * 3 * d, h, w, generator=g).to(dtype)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    do = torch.randn(n, heads * d, h, w, generator=g).to(dtype)
    return qkv, do


def _run(fn, qkv, do, heads):
    x = qkv.detach().clone().requires_grad_(True)
    o = fn(x, heads)
    o.backward(do.to(o.dtype))
    return o.detach(), x.grad.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[-1] for s in SHAPES])
def test_forward_backward_against_float64(shape, channels_last, dtype):
    n, heads, d, h, w, _ = shape
    if d == 256 and (channels_last or dtype == torch.float32):
        pytest.skip("one d = 256 case (fp16; fp32 at d > 64 is routed to EDM's op) keeps the interpreter time down")
    qkv, do = _inputs(n, heads, d, h, w, dtype, channels_last)
    ref_o, ref_g = _run(attention_reference_fp64, qkv.double(), do.double(), heads)
    pt_o, pt_g = _run(attention_edm, qkv, do, heads)  # PyTorch's own error in this precision
    ker_o, ker_g = _run(flash_attention, qkv, do, heads)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert ker_o.dtype == dtype and ker_g.dtype == dtype
    assert_kernel_within_torch(ker_o, pt_o, ref_o, atol)
    assert_kernel_within_torch(ker_g, pt_g, ref_g, atol)
    # Output and gradient keep the input's memory format.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ker_o.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True])
def test_blocked_channel_order_matches_interleaved(channels_last):
    """The blocked order (head*3d + j*d + c; what UNetBlock feeds the kernel) gives the interleaved layout's output,
    and its gradient is the interleaved gradient in the blocked order; the reference fallback takes it too."""
    from sid_fast.kernels.attention import blocked_order, blocked_to_interleaved

    n, heads, d, h, w = 2, 2, 16, 5, 7
    qkv, do = _inputs(n, heads, d, h, w, torch.float32, channels_last)
    order = blocked_order(heads, d, "cpu")
    blocked = qkv[:, order]
    if channels_last:
        blocked = blocked.contiguous(memory_format=torch.channels_last)
    assert torch.equal(blocked_to_interleaved(blocked, heads), qkv)
    ref_o, ref_g = _run(attention_reference_fp64, qkv.double(), do.double(), heads)
    ker_o, ker_g = _run(lambda x, k: flash_attention(x, k, blocked=True), blocked, do, heads)
    pt_o, pt_g = _run(attention_edm, qkv, do, heads)
    assert_kernel_within_torch(ker_o, pt_o, ref_o, 1e-6)
    assert max_abs_err(ker_g, ref_g[:, order]) <= 2 * max_abs_err(pt_g, ref_g) + 1e-6
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ker_o.is_contiguous(memory_format=fmt)


def test_fp32_without_tf32_above_d64_is_routed_to_edm_op():
    """fp32 IEEE attention at d > 64 runs EDM's op (same numbers, with a warning naming why); d = 64 keeps the kernel,
    as do 16-bit inputs and TF32 at any d."""
    from sid_fast.kernels import attention as ka

    assert ka.routed_to_reference(256, 4, "ieee") and ka.routed_to_reference(128, 4, "ieee")
    assert not ka.routed_to_reference(64, 4, "ieee") and not ka.routed_to_reference(256, 4, "tf32")
    assert not ka.routed_to_reference(256, 2, "ieee")
    qkv, _ = _inputs(1, 1, 128, 4, 4, torch.float32, False)
    ka._ROUTED_WARNED.discard(128)
    with pytest.warns(UserWarning, match="head dim 128 runs EDM's attention op"):
        out = flash_attention(qkv, 1)
    assert torch.equal(out, attention_edm(qkv, 1))


def test_non_contiguous_input_and_bad_input():
    qkv, do = _inputs(2, 1, 16, 4, 4, torch.float32, False)
    wide = torch.cat([qkv, qkv], dim=1)[:, ::2]  # strided channels: copied to a supported layout first
    assert not wide.is_contiguous()
    ref_o, ref_g = _run(attention_reference_fp64, wide.double(), do.double(), 1)
    ker_o, ker_g = _run(flash_attention, wide, do, 1)
    assert max_abs_err(ker_o, ref_o) < 1e-5 and max_abs_err(ker_g, ref_g) < 1e-5
    with pytest.raises(ValueError, match="not divisible by 3 \\* num_heads"):
        flash_attention(qkv, 5)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        flash_attention(qkv.double(), 1)
    with pytest.raises(ValueError, match="\\[N, heads\\*3\\*d, H, W\\]"):
        flash_attention(qkv[0], 1)


def _tiny_unet(model_type):
    from sid_fast.networks import build_network

    if model_type == "SongUNet":
        kw = dict(
            model_type="SongUNet",
            img_resolution=8,
            img_channels=3,
            label_dim=0,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4, 8],
            dropout=0.0,
        )
    else:
        # ADM uses 64 channels per head: 64 model channels give 1 head at 8x8 and 2 heads at 4x4.
        kw = dict(
            model_type="DhariwalUNet",
            img_resolution=8,
            img_channels=3,
            label_dim=4,
            model_channels=64,
            channel_mult=[1, 2],
            num_blocks=1,
            attn_resolutions=[4, 8],
            dropout=0.0,
        )
    torch.manual_seed(0)
    net = build_network("EDMPrecond", kw)
    with torch.no_grad():  # non-zero output layers so that gradients reach every attention block
        for name, p in net.named_parameters():
            if "conv1" in name or "proj" in name or "out_conv" in name or "aux" in name:
                p.normal_(0, 0.05)
    return net, kw


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_whole_unet_with_kernel_matches_reference_attention(model_type):
    net, kw = _tiny_unet(model_type)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 3.0]).reshape(-1, 1, 1, 1)
    labels = torch.eye(4)[[1, 3]] if kw["label_dim"] else None

    def run(impl):
        net.zero_grad()
        with ops.kernels(impl):
            y = net(x, sigma, labels)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    y_ref, g_ref = run("none")
    y_ker, g_ker = run("attention")
    assert max_abs_err(y_ker, y_ref) < 1e-5
    qkv_grads = [k for k in g_ref if "qkv" in k]
    assert qkv_grads and all(g_ref[k].abs().max() > 0 for k in qkv_grads)
    for k in g_ref:
        assert max_abs_err(g_ker[k], g_ref[k]) <= 1e-5 * (1 + g_ref[k].abs().max().item()), k


def test_selected_by_the_kernel_switch(monkeypatch):
    import sid_fast.kernels.attention as ka

    calls = []
    monkeypatch.setattr(ka, "flash_attention", lambda qkv, h: calls.append(1) or ka.attention_edm(qkv, h))
    qkv, _ = _inputs(1, 1, 16, 4, 4, torch.float32, False)
    ops.attention(qkv, 1)
    assert not calls
    with ops.kernels("attention"):
        ops.attention(qkv, 1)
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------------------
# GPU: EDM's shapes, bf16, compile with Inductor, no L x L allocation.

GPU_SHAPES = [(8, 1, 256, 16, 16), (8, 1, 256, 8, 8), (4, 6, 64, 32, 32), (4, 9, 64, 16, 16), (4, 12, 64, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_matches_float64(shape, dtype):
    n, heads, d, h, w = shape
    qkv, do = (t.cuda() for t in _inputs(n, heads, d, h, w, dtype, False))
    ref_o, ref_g = _run(attention_reference_fp64, qkv.double(), do.double(), heads)
    pt_o, pt_g = _run(attention_edm, qkv, do, heads)
    ker_o, ker_g = _run(flash_attention, qkv, do, heads)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_kernel_within_torch(ker_o, pt_o, ref_o, atol)
    assert_kernel_within_torch(ker_g, pt_g, ref_g, atol)


@pytest.mark.gpu
def test_gpu_memory_does_not_grow_with_l_squared_and_compiles():
    n, heads, d, h, w = 4, 1, 64, 64, 64  # L = 4096: an L x L fp32 matrix per head would be 256 MiB
    qkv, do = (t.cuda() for t in _inputs(n, heads, d, h, w, torch.bfloat16, False))
    x = qkv.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flash_attention(x, heads).backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 8 * qkv.numel() * qkv.element_size()  # O(L d) buffers only; L x L would be 64x larger

    @torch.compile(fullgraph=True)
    def f(t):
        return flash_attention(t, heads).float().square().mean()

    torch.testing.assert_close(f(qkv), flash_attention(qkv, heads).float().square().mean(), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_forward_backward_matches_eager():
    """torch.compile(fullgraph=True) traces the registered op (under the CPU interpreter it cannot: the interpreted
    kernels are not traceable with fake tensors, so this runs on CUDA only)."""
    qkv, do = (t.cuda() for t in _inputs(4, 2, 64, 16, 16, torch.float32, True))

    @torch.compile(fullgraph=True)
    def f(x):
        return flash_attention(x, 2) * 2

    x = qkv.clone().requires_grad_(True)
    y = f(x)
    y.backward(do)
    ker_o, ker_g = _run(flash_attention, qkv, do, 2)
    torch.testing.assert_close(y, ker_o * 2)
    torch.testing.assert_close(x.grad, ker_g * 2)
