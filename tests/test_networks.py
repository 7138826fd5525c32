"""EDM networks: official configurations (names, shapes, FLOPs), layers, attention implementations, preconditioners."""

import math

import pytest
import torch
import torch.nn.functional as F
from support.helpers import attention_reference_fp64
from torch.utils.flop_counter import FlopCounterMode

from sid_fast import ops
from sid_fast.kernels.attention import attention_edm, attention_sdpa
from sid_fast.networks import (
    Conv2d,
    EDMPrecond,
    UNetBlock,
    VEPrecond,
    VPPrecond,
    build_network,
    official_config,
)

# Forward GFLOP per image and parameter counts of EDM's own networks (FlopCounterMode on EDM training/networks.py).
OFFICIAL = {
    "edm-cifar10-32x32-uncond-vp": (42.38, 55.7),
    "edm-cifar10-32x32-cond-vp": (42.38, 55.7),
    "edm-cifar10-32x32-uncond-ve": (42.8, None),  # "about 21.4 GMAC"
    "edm-ffhq-64x64-uncond-vp": (83.73, 61.8),
    "edm-afhqv2-64x64-uncond-vp": (83.73, 61.8),
    "edm-imagenet-64x64-cond-adm": (219.3, 295.9),
}


def _meta_net(name):
    cfg = official_config(name)
    with torch.device("meta"):
        net = build_network("EDMPrecond", cfg)
    return net, cfg


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_flops_and_params(name):
    net, cfg = _meta_net(name)
    gflop_ref, mparams_ref = OFFICIAL[name]
    b = 2
    r = cfg["img_resolution"]
    x = torch.randn(b, 3, r, r, device="meta")
    labels = torch.zeros(b, cfg["label_dim"], device="meta") if cfg["label_dim"] else None
    with FlopCounterMode(display=False) as counter:
        out = net(x, torch.ones(b, device="meta"), labels)
    assert out.shape == x.shape
    gflop = counter.get_total_flops() / b / 1e9
    assert abs(gflop - gflop_ref) / gflop_ref < 0.01, (name, gflop)
    if mparams_ref is not None:
        mparams = sum(p.numel() for p in net.parameters()) / 1e6
        assert abs(mparams - mparams_ref) < 0.1, (name, mparams)


def _attention_blocks(net):
    return {name: m for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}


def test_ddpmpp_state_dict_names_and_attention_layout():
    net, _ = _meta_net("edm-cifar10-32x32-cond-vp")
    sd = net.state_dict()
    expected = {
        "model.map_label.weight": (128, 10),
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),  # resample_proj=True: a 1x1 conv
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.dec.8x8_in0.proj.weight": (256, 256, 1, 1),
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "model.map_augment.bias" not in sd
    assert "model.enc.32x32_block0.conv0.resample_filter" not in sd  # no filter without resampling
    blocks = _attention_blocks(net)
    # EDM training/networks.py, DDPM++ config: enc 16x16_block0-3, dec 8x8_in0, dec 16x16_block4, one head of 256.
    assert sorted(blocks) == sorted(
        [f"model.enc.16x16_block{i}" for i in range(4)] + ["model.dec.8x8_in0", "model.dec.16x16_block4"]
    )
    assert all(m.num_heads == 1 and m.out_channels == 256 for m in blocks.values())


def test_ncsnpp_state_dict_names():
    net, _ = _meta_net("edm-cifar10-32x32-uncond-ve")
    sd = net.state_dict()
    assert tuple(sd["model.map_noise.freqs"].shape) == (128,)  # Fourier embedding: a data buffer
    assert tuple(sd["model.enc.16x16_aux_residual.weight"].shape) == (256, 3, 3, 3)
    assert tuple(sd["model.enc.16x16_aux_residual.resample_filter"].shape) == (1, 1, 4, 4)
    assert net.model.enc["16x16_aux_residual"].fused_resample


def test_adm_state_dict_names_and_attention_layout():
    net, _ = _meta_net("edm-imagenet-64x64-cond-adm")
    sd = net.state_dict()
    assert tuple(sd["model.map_label.weight"].shape) == (768, 1000)
    assert "model.map_label.bias" not in sd
    assert "model.map_augment.weight" not in sd
    assert tuple(sd["model.enc.64x64_conv.weight"].shape) == (192, 3, 3, 3)
    assert tuple(sd["model.enc.32x32_down.affine.weight"].shape) == (384, 768)  # adaptive scale: 2 * C
    assert "model.enc.32x32_down.skip.weight" not in sd  # kernel-0 skip: a pure resampler
    assert tuple(sd["model.out_conv.weight"].shape) == (3, 192, 3, 3)
    blocks = _attention_blocks(net)
    assert len(blocks) == 22
    heads = {}
    for name, m in blocks.items():
        res = int(name.split(".")[2].split("x")[0])
        heads.setdefault(res, set()).add((m.num_heads, m.out_channels // m.num_heads))
    assert heads == {32: {(6, 64)}, 16: {(9, 64)}, 8: {(12, 64)}}


def test_conv_resampling_with_box_filter():
    x = torch.randn(2, 4, 8, 8)
    up = Conv2d(4, 4, kernel=0, up=True)
    down = Conv2d(4, 4, kernel=0, down=True)
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))


def test_fused_down_ncsnpp_filter():
    # NCSN++ residual encoder: conv at full resolution, then the normalised [1,3,3,1] binomial filter with stride 2.
    conv = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True).double()
    f = conv.resample_filter
    torch.testing.assert_close(f.sum().item(), 1.0)
    torch.testing.assert_close(f[0, 0], torch.outer(*(torch.tensor([1.0, 3, 3, 1], dtype=f.dtype) / 8,) * 2))
    x = torch.full((1, 3, 16, 16), 2.0, dtype=torch.float64)
    y = conv(x)
    assert y.shape == (1, 5, 8, 8)
    # Away from the zero-padded border a constant input gives 2 * sum(w) + b per output channel.
    expect = 2.0 * conv.weight.sum(dim=(1, 2, 3)) + conv.bias
    torch.testing.assert_close(y[0, :, 2:-2, 2:-2], expect[:, None, None].expand(5, 4, 4))


# Official attention shapes (EDM's DDPM++ and ADM configs) at batch 1: (heads, d, H).
ATTN_SHAPES = [(1, 256, 16), (1, 256, 8), (6, 64, 32), (9, 64, 16), (12, 64, 8), (2, 8, 3)]


@pytest.mark.parametrize("heads,d,res", ATTN_SHAPES)
def test_attention_impls_agree_with_fp64(heads, d, res):
    qkv = torch.randn(1, heads * 3 * d, res, res, requires_grad=True)
    ref = attention_reference_fp64(qkv, heads)
    g = torch.randn_like(ref)
    (dref,) = torch.autograd.grad(ref, qkv, g)
    for fn in (attention_edm, attention_sdpa):
        out = fn(qkv, heads)
        (dq,) = torch.autograd.grad(out, qkv, g.float())
        assert out.shape == (1, heads * d, res, res)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(dq.double(), dref.double(), rtol=1e-4, atol=2e-5)


def test_attention_interleaved_layout():
    # One head, d=1, L=2: channel order is (q, k, v) per feature channel.
    qkv = torch.tensor([[1.0, 0.0, 5.0], [1.0, 0.0, 7.0]]).t().reshape(1, 3, 1, 2)  # q=[1,1], k=[0,0], v=[5,7]
    out = attention_edm(qkv, 1)
    torch.testing.assert_close(out, torch.full((1, 1, 1, 2), 6.0))  # uniform weights: mean of v


def _tiny_cfg(**kw):
    cfg = dict(
        model_type="SongUNet",
        img_resolution=16,
        img_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
    )
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_whole_network_attention_impls_agree(model_type):
    extra = {} if model_type == "SongUNet" else dict(model_channels=64, attn_resolutions=[16, 8])
    net = build_network("EDMPrecond", _tiny_cfg(model_type=model_type, label_dim=3, **extra)).eval()
    # Random (not zero-initialised) output layers so that the attention path shows in the output.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    sigma = torch.tensor([0.3, 4.0])
    labels = torch.eye(3)[[0, 2]]
    outs = {}
    for impl in ("none", "sdpa"):  # EDM's op (the reference) and PyTorch's SDPA
        with ops.kernels(impl):
            y = net(x, sigma, labels)
            (g,) = torch.autograd.grad(y.square().sum(), x)
        outs[impl] = (y.detach(), g)
    torch.testing.assert_close(outs["none"][0], outs["sdpa"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["none"][1], outs["sdpa"][1], rtol=1e-4, atol=1e-4)


def test_ddpmpp_cifar_full_network_attention_impls_agree():
    torch.manual_seed(0)
    net = build_network("EDMPrecond", official_config("edm-cifar10-32x32-uncond-vp")).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("proj.weight") or name.endswith("conv1.weight") or "aux_conv" in name:
                p.normal_(0, 0.02)  # undo the 1e-5 init of output layers so attention matters
    x = torch.randn(1, 3, 32, 32)
    sigma = torch.tensor([1.5])
    with torch.no_grad(), ops.kernels("none"):
        a = net(x, sigma)
    with torch.no_grad(), ops.kernels("sdpa"):
        b = net(x, sigma)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_edm_precond_formulas():
    net = build_network("EDMPrecond", _tiny_cfg()).eval()
    with torch.no_grad():
        net.model.dec["16x16_aux_conv"].weight.zero_()
        net.model.dec["16x16_aux_conv"].bias.fill_(1.0)  # F(x) == 1 everywhere
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    s = sigma.reshape(-1, 1, 1, 1)
    expect = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(net(x, sigma), expect)


def test_vp_and_ve_precond():
    vp = build_network("VPPrecond", _tiny_cfg())
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    assert math.isclose(vp.sigma_max, 152.17, rel_tol=1e-3)
    ve = build_network("VEPrecond", _tiny_cfg())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    x = torch.randn(2, 3, 16, 16)
    for net in (vp.eval(), ve.eval()):
        assert net(x, torch.tensor([0.5, 2.0])).shape == x.shape
    assert isinstance(vp, VPPrecond) and isinstance(ve, VEPrecond) and not isinstance(vp, EDMPrecond)


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="bogus"):
        build_network("EDMPrecond", _tiny_cfg(bogus=1))
    with pytest.raises(ValueError, match="iDDPMPrecond"):
        build_network("iDDPMPrecond", _tiny_cfg())
    with pytest.raises(ValueError, match="model_type"):
        build_network("EDMPrecond", _tiny_cfg(model_type="Transformer"))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_whole_network_with_kernels_matches_reference(model_type):
    """Fused GroupNorm+SiLU (Triton interpreter on CPU) in every block vs EDM's ops, forward and input gradient."""
    extra = {} if model_type == "SongUNet" else dict(model_channels=64, attn_resolutions=[8])
    net = build_network(
        "EDMPrecond", _tiny_cfg(model_type=model_type, img_resolution=8, channel_mult=[1, 1], **extra)
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.3, 4.0])
    outs = []
    for spec in ("none", "all"):
        with ops.kernels(spec):
            y = net(x, sigma)
            (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append((y.detach(), g))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-4)
