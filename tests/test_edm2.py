"""EDM2 networks: the published configurations (parameters, FLOPs, keys), the formulas against an independent float64
implementation, forced weight normalisation outside the graph, SiDA's encoder logits, and safe loading of EDM2 and
SiD/SiDA-EDM2 pickles."""

import copy

import pytest
import torch
from support.edm2_reference import edm2_forward
from support.edm_pickle_writer import PAYLOAD_TEMPLATE, write_edm2_snapshot
from torch.utils.flop_counter import FlopCounterMode

from sid_fast import ops
from sid_fast.checkpoints import CheckpointError, load_network_file
from sid_fast.networks import build_network
from sid_fast.networks.edm2 import Block, MPConv, Precond, edm2_config, force_weight_norm_

# edm2 train_edm2.py presets edm2-img512-{size}: parameters (exact, counted on the official code) and forward GMAC per
# image at 4x64x64 (half of torch's FLOP count of the official code).
PUBLISHED = {
    "xs": (124_713_253, 45.0),
    "s": (280_212_837, 100.8),
    "m": (497_807_781, 179.0),
    "l": (777_498_085, 279.4),
    "xl": (1_119_283_749, 402.0),
    "xxl": (1_523_164_773, 546.9),
}

# A small network with every kind of block: two levels, attention at the lower one (2 heads of 16), a conv_skip in
# both flavours, labels; channels_per_head 16 so that heads exist at this width.
TINY = dict(
    img_resolution=8,
    img_channels=3,
    label_dim=4,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    channels_per_head=16,
    use_fp16=False,
    logvar_channels=8,
)


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_configs_params_flops_keys(size):
    with torch.device("meta"):
        net = Precond(**edm2_config(size))
    params, gmac = PUBLISHED[size]
    assert sum(p.numel() for p in net.parameters()) == params
    x = torch.empty(1, 4, 64, 64, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = net(x, torch.ones(1, device="meta"), torch.zeros(1, 1000, device="meta"))
    assert out.shape == x.shape
    # The figures we hold are rounded to about 0.1 GMAC (ours: 44.954, 100.822, 178.952, 279.343, 401.996,
    # 546.909); the exact parameter counts above pin the structure, this pins the compute per layer.
    assert abs(counter.get_total_flops() / 2e9 - gmac) <= 0.1
    sd = net.state_dict()
    assert len(sd) == 203
    c = edm2_config(size)["model_channels"]
    assert tuple(sd["unet.emb_noise.weight"].shape) == (4 * c, c)
    assert tuple(sd["unet.emb_label.weight"].shape) == (4 * c, 1000)
    assert tuple(sd["unet.out_conv.weight"].shape) == (4, c, 3, 3)
    assert tuple(sd["logvar_linear.weight"].shape) == (1, 128)
    assert [k for k in sd if k.startswith("logvar")] == [
        "logvar_fourier.freqs",
        "logvar_fourier.phases",
        "logvar_linear.weight",
    ]
    enc = [k.split(".")[2] for k in sd if k.startswith("unet.enc.") and k.endswith("conv_res1.weight")]
    assert enc == [
        "64x64_block0",
        "64x64_block1",
        "64x64_block2",
        "32x32_down",
        "32x32_block0",
        "32x32_block1",
        "32x32_block2",
        "16x16_down",
        "16x16_block0",
        "16x16_block1",
        "16x16_block2",
        "8x8_down",
        "8x8_block0",
        "8x8_block1",
        "8x8_block2",
    ]
    dec = [k.split(".")[2] for k in sd if k.startswith("unet.dec.") and k.endswith("conv_res1.weight")]
    assert dec[:6] == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "8x8_block2", "8x8_block3"]
    assert len(dec) == 2 + 4 + 3 * 5
    heads = {n: m.num_heads for n, m in net.named_modules() if isinstance(m, Block) and m.num_heads}
    assert heads["unet.enc.16x16_block0"] == 3 * c // 64 and heads["unet.enc.8x8_block0"] == 4 * c // 64
    assert heads["unet.dec.8x8_in0"] == 4 * c // 64 and "unet.dec.8x8_in1" not in heads


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    net = Precond(**dict(TINY, **kw))
    with torch.no_grad():  # the gains start at 0 (output = c_skip x); give every path a non-trivial weight
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.3 + 0.7 * torch.rand(()).item())
    return net


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) * 1.5
    sigma = torch.tensor([0.02, 0.7, 30.0][:n])
    labels = torch.eye(4)[torch.randint(4, [n], generator=g)]
    return x, sigma, labels


def _assert_close64(out, ref):
    # fp32 against float64: 10-30 layers each rounding at 2^-24 relative, norms over <= 288 terms; 1e-5 of the
    # output's scale is 100x that and 10^4x below what a wrong coefficient or layout gives (O(1e-1) relative).
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err


def test_forward_matches_float64_reference():
    net = _tiny().eval()
    x, sigma, labels = _inputs()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    D, u = net(x, sigma, labels, return_logvar=True)
    D_ref, u_ref = edm2_forward(sd, TINY, x, sigma, labels)
    _assert_close64(D, D_ref)
    _assert_close64(u, u_ref)
    assert (D - x * 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)).abs().max() > 1e-2  # F(x) contributes
    # Without labels: EDM2's "no class" (zeros broadcast over the batch).
    _assert_close64(net(x, sigma), edm2_forward(sd, TINY, x, sigma, None)[0])


def test_encoder_logits_and_encoder_only_runs_no_decoder():
    net = _tiny().eval()
    x, sigma, labels = _inputs()
    ran = []
    for name, m in net.unet.dec.items():
        m.register_forward_hook(lambda *a, name=name: ran.append(name))
    logits = net(x, sigma, labels, return_flag="encoder")
    assert ran == [] and logits.shape == (3, 1, 4, 4)
    D, logits2, u = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert len(ran) == len(net.unet.dec)
    _, u_ref, logits_ref = edm2_forward(dict(net.state_dict()), TINY, x, sigma, labels, return_logits=True)
    _assert_close64(logits, logits_ref)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    _assert_close64(D, edm2_forward(dict(net.state_dict()), TINY, x, sigma, labels)[0])


def test_forced_weight_norm_matches_upstream_train_forward_and_allows_two_calls():
    net = _tiny().train()
    with torch.no_grad():  # weights away from unit RMS, as after an optimizer step
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(1.7)
    x, sigma, labels = _inputs()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    D_ref, _ = edm2_forward(sd, TINY, x, sigma, labels, upstream_train=True)  # rewrites sd's weights as upstream
    force_weight_norm_(net)
    for k, v in net.state_dict().items():
        if k.endswith(".weight"):
            _assert_close64(v, sd[k])
    D = net(x, sigma, labels)  # TINY has no dropout: train mode is deterministic
    _assert_close64(D, D_ref)
    # SiDA's double call in one graph: fake (encoder_decoder) and real (encoder), one backward.
    D1, logits_fake, u = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    logits_real = net(x * 0.5, sigma, labels, return_flag="encoder")
    (D1.square().mean() + logits_fake.mean() - logits_real.mean() + u.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_generator_without_logvar_head():
    net = Precond(**dict(TINY, logvar_channels=0))
    assert not any(k.startswith("logvar") for k in net.state_dict())
    with pytest.raises(ValueError, match="log-variance head"):
        net(*_inputs()[:2], return_logvar=True)


@pytest.mark.parametrize("impl", ["sdpa", "attention"])
def test_fast_attention_matches_reference(impl):
    """EDM2's attention through sid_fast.ops: q, k, v pixel-normalised first, then PyTorch's SDPA or the Triton flash
    kernel (under the interpreter here) over the same interleaved layout."""
    net = _tiny().eval()
    x, sigma, labels = _inputs()
    ref = net(x, sigma, labels)
    with ops.kernels(impl):
        out = net(x, sigma, labels)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_built_by_name_and_official_sida_class_names():
    kw = dict(TINY)
    assert isinstance(build_network("Precond", kw), Precond)
    g = build_network("EDM_2_Precond_Generator", dict(kw, force_normalization=True, use_gan=True))
    assert g.logvar_linear is None
    f = build_network("EDM_2_Precond_EncoderDecoder", dict(kw, force_normalization=True, use_gan=True))
    assert f.logvar_linear is not None


def test_edm2_snapshot_pickle_loads_without_running_code(tmp_path):
    net = _tiny()
    marker = tmp_path / "executed"
    path = tmp_path / "network-snapshot-0000100-0.100.pkl"
    write_edm2_snapshot(path, net, TINY, module_src=PAYLOAD_TEMPLATE.format(path=str(marker)))
    loaded, info = load_network_file(path)
    assert not marker.exists()
    assert isinstance(loaded, Precond) and info["class_name"] == "Precond"
    assert sorted(info["meta"]["keys"]) == ["dataset_kwargs", "ema", "encoder", "loss_fn"]
    # The file holds float16 weights and buffers; they come back as float32 values of the float16 numbers.
    half = copy.deepcopy(net).half().float()
    for (k, a), b in zip(loaded.state_dict().items(), half.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), k
    x, sigma, labels = _inputs()
    torch.testing.assert_close(loaded(x, sigma, labels), half.eval()(x, sigma, labels), rtol=0, atol=0)


class _HookedMPConv(MPConv):
    """An MPConv carrying a forward pre-hook that is one of its own bound methods, as the official SiDA-EDM2 modules
    do (their pickles then contain builtins.getattr)."""

    def force_norm_hook(self, module, args):
        raise AssertionError("never called by the loader")


def test_hooked_sida_edm2_generator_pickle_loads(tmp_path):
    net = _tiny(logvar_channels=0)
    for m in net.modules():
        if type(m) is MPConv:
            m.__class__ = _HookedMPConv
            m.register_forward_pre_hook(m.force_norm_hook)
    path = tmp_path / "network-snapshot-1.000000-000100.pkl"
    names = {"": "EDM_2_Precond_Generator", "unet": "UNet_EncoderDecoder"}
    names.update({n: "MPConv" for n, m in net.named_modules() if isinstance(m, _HookedMPConv)})
    kwargs = dict(TINY, force_normalization=True, use_gan=True)
    write_edm2_snapshot(path, net, kwargs, class_names=names)
    assert b"getattr" in path.read_bytes()
    loaded, info = load_network_file(path)
    assert isinstance(loaded, Precond) and loaded.logvar_linear is None
    x, sigma, labels = _inputs()
    ref = copy.deepcopy(net).half().float().eval()
    ref._forward_pre_hooks.clear()
    for m in ref.modules():
        m._forward_pre_hooks.clear()
    torch.testing.assert_close(loaded(x, sigma, labels), ref(x, sigma, labels), rtol=0, atol=0)


def test_edm2_pickle_with_wrong_kwargs_is_refused(tmp_path):
    path = tmp_path / "bad.pkl"
    write_edm2_snapshot(path, _tiny(), dict(TINY, model_channels=32))
    with pytest.raises(CheckpointError, match="bad.pkl: tensors do not match Precond"):
        load_network_file(path)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_block_checkpointing_gives_the_same_gradients(mode):
    net = _tiny().train()
    x, sigma, labels = _inputs()

    def grads():
        net.zero_grad(set_to_none=True)
        D, u = net(x, sigma, labels, return_logvar=True)
        (D.square().mean() + u.mean()).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    ref = grads()
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    for b in blocks:
        b.checkpoint_activations = mode
    try:
        got = grads()
    finally:
        for b in blocks:
            b.checkpoint_activations = None
    for k in ref:  # the same ops recomputed on the same inputs: equal up to the order of a few fp32 sums
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)
