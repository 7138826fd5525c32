"""bench.memory: the accounting against hand counts, checkpointing's measured cut, and one meta-device SiD step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench import memory

F32 = 4


def _account(fn, *params):
    """(held, saved) bytes of fn()'s graph: allocated under the ledger and alive when backward starts."""
    ledger = memory.Ledger()
    saved = memory.SavedTensors(ledger, {p.untyped_storage()._cdata for p in params})
    with ledger, saved.hooks():
        out = fn()
        held = ledger.cur
        out.sum().backward()
    return held, sum(saved.by.values()), ledger


def test_hand_count_of_a_known_layer():
    """y = relu(x W^T), z = y * y: mm saves x only when W needs a gradient (W is a parameter: excluded), relu saves its
    output y, the square saves y too (one storage), and the graph holds z. Every number is a product of shapes."""
    n, i, o = 3, 5, 7
    for w_grad in (False, True):
        x = torch.randn(n, i, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(o, i), requires_grad=w_grad)
        held, saved, ledger = _account(lambda: (lambda y: y * y)(torch.relu(F.linear(x, w))), w)
        # saved: relu's output y (shared by the product); x itself when the weight needs a gradient.
        assert saved == n * o * F32 + (n * i * F32 if w_grad else 0), (w_grad, saved)
        # held: y and z (the mm output x W^T is relu's input, saved by nothing: freed at once).
        assert held == 2 * n * o * F32, (w_grad, held)
        # when backward starts: also the scalar sum and the seed gradient (ones) that backward() makes
        assert ledger.bwd_start == held + 2 * F32 and ledger.peak >= ledger.bwd_start


def test_convolution_saves_its_input_even_for_a_frozen_weight():
    """Autograd's convolution saves its input whatever needs a gradient (linear does not): the measurement behind the
    frozen teacher's and fake score's bytes in the generator phase."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3), requires_grad=False)
    _, saved, _ = _account(lambda: F.conv2d(x, w, padding=1), w)
    assert saved == x.numel() * F32


def test_checkpointing_cuts_the_counted_bytes_by_the_activations_it_drops():
    n, c = 4, 16
    x = torch.randn(n, c, requires_grad=True)

    def block(t):
        a = torch.tanh(t)  # saves its output a
        b = torch.sigmoid(a * 2)  # a * 2 saves nothing (scalar); sigmoid saves its output b
        return b * a  # saves a and b (already counted)

    plain, _, _ = _account(lambda: block(x) + 0)
    ckpt, _, _ = _account(lambda: checkpoint(block, x, use_reentrant=False) + 0)
    act = n * c * F32
    # plain: a, b and the final + 0 (a * 2 and b * a are inputs of ops that save nothing: freed at once)
    assert plain == 3 * act, plain
    # checkpointed: the final + 0 only; a and b are recomputed in backward
    assert ckpt == act, ckpt
    assert plain - ckpt == 2 * act


@pytest.mark.slow
def test_meta_step_of_the_digits_network_counts_what_the_phases_hold(tmp_path):
    """One SiD step of a small DDPM++ on the meta device: generator phase held bytes grow linearly with the batch, bf16
    halves the activations, checkpointing nets leaves only G's activations, and the Adam states are twice G's and the
    fake score's parameters."""
    cfg = dict(
        model_type="SongUNet",
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        augment_dim=0,
        dropout=0.0,
        use_fp16=False,
        img_resolution=8,
        img_channels=1,
        label_dim=0,
    )
    memory.CONFIGS["_tiny"] = ("_tiny", "digits")
    real = memory.official_config
    memory.official_config = lambda stem: dict(cfg) if stem == "_tiny" else real(stem)
    try:
        recs = {
            rung: memory.measure("_tiny", rung, opts, (2, 4))
            for rung, opts in [
                ("reference", dict(precision="fp32")),
                ("bf16", dict(precision="bf16")),
                ("nets", dict(precision="fp32", checkpointing="nets")),
            ]
        }
    finally:
        memory.official_config = real
        del memory.CONFIGS["_tiny"]
    ref, bf, nets = (recs[k]["generator"] for k in ("reference", "bf16", "nets"))
    # linear in the batch: the slope measured between 2 and 4 predicts batch 2 from the intercept
    assert ref["held"]["intercept"] + 2 * ref["held"]["per_image"] == ref["held"]["at"][0]
    assert ref["held"]["per_image"] > 0
    # bf16 bodies: the saved activations are half (the fp32 parts at the edges: within 5%)
    assert abs(bf["held"]["per_image"] / ref["held"]["per_image"] - 0.5) < 0.05
    # nets: the teacher holds only its output (1 x 8 x 8 fp32 per image, y_real, which the generator phase keeps
    # until backward); the fake score holds nothing (its output is consumed inside the phase's loss hook); G's share
    # is unchanged
    by_nets, by_ref = nets["held_by_per_image"], ref["held_by_per_image"]
    assert by_nets["teacher"] == 8 * 8 * F32 and by_nets.get("fake_score", 0) == 0
    assert by_ref["teacher"] > 10 * by_nets["teacher"]
    assert by_nets["G"] == by_ref["G"]
    assert nets["flops_per_image"] > ref["flops_per_image"]  # the recomputed forwards
    st = recs["reference"]["static"]
    with torch.device("meta"):
        params = list(memory.build_network("EDMPrecond", dict(cfg)).parameters())
    n_params = sum(p.numel() for p in params)
    # exp_avg and exp_avg_sq of G and of the fake score, and one fp32 step count per parameter tensor
    assert st["adam"] == 2 * (2 * n_params + len(params)) * F32
    assert st["grads"] == 0  # freed after each optimizer step


def test_sd_accounting_on_meta_holds_what_a_cpu_run_holds():
    """SiD-LSG's generator phase on a small SD UNet (attention over 256 tokens): on the meta device with attention as
    CUDA runs it (memory-efficient kernel in fp32: output and log-sum-exp kept) the ledger counts what the same phase
    holds on the CPU with real arithmetic (PyTorch's CPU flash attention keeps the same two), and less than with the
    L x L weights of the math path."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from support.sd_tiny import TINY_UNET

    unet = dict(TINY_UNET, sample_size=16, cross_attention_dim=768)
    held = {}
    for device, fused in (("meta", True), ("cpu", True), ("meta", False)):
        with memory.cuda_attention_on_meta() if fused else contextlib.nullcontext():
            small_text = dict(num_hidden_layers=1, intermediate_size=64, vocab_size=1000)
            tr = memory.make_sd_trainer(
                "sd15", 2, dict(precision="fp32"), device, unet_config=unet, text_config=small_text
            )
            tr.step()
            held[device, fused] = memory.measure_phase(tr, "generator")["held"]
    # Exactly, but for the memory-efficient kernel's dropout RNG state (two 8-byte tensors per call, which CUDA keeps
    # too): three UNet calls per micro-batch (G, the fake score and the teacher; guidance doubles their batch).
    from diffusers.models.attention_processor import Attention

    calls = 3 * sum(isinstance(m, Attention) for m in tr.G.modules())
    assert held["meta", True] - held["cpu", True] == 16 * calls
    # The math path keeps each attention's 4 heads x 256 x 256 fp32 weights (and more): at least 1 MiB per call.
    assert held["meta", False] - held["meta", True] >= 2**20


def test_fsdp_fit_divides_the_sharded_networks_and_the_gradient_by_the_gpu_count():
    """fit_batch_fsdp from a record written by hand: the teacher, G, the fake score and the Adam states are 1/world per
    GPU, G_ema and the text encoder whole, each phase's peak keeps its batch-independent part except the trained
    network's gradient, which is 1/world too."""
    GiB = memory.GiB
    st = dict(weights_teacher=4 * GiB, weights_G=8 * GiB, weights_fake_score=8 * GiB, weights_G_ema=8 * GiB,
              weights_text_encoder=1 * GiB, adam=32 * GiB, grads=0)  # fmt: skip
    st["total"] = sum(st.values())
    rec = dict(static=st, fake_score=dict(peak=dict(per_image=GiB, intercept=8 * GiB)),
               generator=dict(peak=dict(per_image=2 * GiB, intercept=8 * GiB)))  # fmt: skip
    # One GPU: 61 GiB static; 80 - 2 headroom - 61 = 17 GiB; generator: (17 - 8) / 2 = 4 images.
    assert memory.fit_batch(rec, 80, 2) == 4
    # 8 GPUs: 9 GiB whole + 52 / 8 sharded = 15.5 GiB; 62.5 GiB for the phases; generator (62.5 - 1) / 2 = 30.
    assert memory.fit_batch_fsdp(rec, 80, 2, 8) == 30
    assert memory.fit_batch_fsdp(rec, 80, 2, 1) == memory.fit_batch(rec, 80, 2)


def test_the_flow_configurations_are_the_published_models():
    """bench.memory's DiT configurations, built on the meta device, have the published sizes (SD3-Medium 2.03 B at
    1024 and at 512 px, SD3.5-Large 8.06 B, FLUX.1-dev 11.9 B, SANA 0.59 B and 1.6 B): a wrong width or depth would
    change every byte the memory table reports."""
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    published = {"sd3-medium": (2.02, 2.04), "sd3-medium-512": (2.02, 2.04), "sd35-large": (8.05, 8.07),
                 "flux-dev": (11.85, 11.95), "sana-600m-512": (0.59, 0.60), "sana-1600m-512": (1.55, 1.65)}  # fmt: skip
    assert set(published) == {c.removesuffix("-sida") for c in memory.FLOW_CONFIGS}  # -sida: the same networks
    for name, (preset, net) in memory.FLOW_CONFIGS.items():
        assert (
            name.endswith("-sida") == preset.endswith("-sida")
            and net == memory.FLOW_CONFIGS[name.removesuffix("-sida")][1]
        )
    for name, (lo, hi) in published.items():
        cls = (
            FluxTransformer2DModel
            if name.startswith("flux")
            else SanaTransformer2DModel
            if name.startswith("sana")
            else SD3Transformer2DModel
        )
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(**memory.FLOW_CONFIGS[name][1]).parameters()) / 1e9
        assert lo <= n < hi, (name, n)
