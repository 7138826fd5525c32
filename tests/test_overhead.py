"""The step around the kernels: grouped weight casts, the gradient arena and its NaN cleaning, the fixed-margin
augmentation, and bench.overhead's counts as guards (graph breaks, recompilations, host syncs per micro-batch,
per-parameter launches)."""

import pytest
import torch
from support.helpers import NET, cfg_for, cpu_trainer
from torch.utils._python_dispatch import TorchDispatchMode

from bench.overhead import compile_report, count_launches, count_syncs, mta_launches
from sid_fast.augment import AugmentPipe
from sid_fast.casts import GradArena
from sid_fast.networks import build_network
from sid_fast.networks.layers import Conv2d, UNetBlock
from sid_fast.training.parallel import flat_buffers


def _bf16_net(grouped: bool):
    torch.manual_seed(0)
    net = build_network("EDMPrecond", dict(NET, dropout=0.0))
    net.compute_dtype = torch.bfloat16
    for m in net.modules():
        if isinstance(m, Conv2d):
            m.bias_in_conv = True
        if isinstance(m, UNetBlock):
            m.group_casts = grouped
    return net


@pytest.mark.parametrize("checkpointing", [None, "full", "selective"])
def test_grouped_casts_give_the_same_bits_forward_and_backward(checkpointing):
    # A grouped cast is the same rounding of each element (one foreach copy instead of one copy per parameter) and
    # its backward the same exact widening: outputs and every parameter's gradient are equal bit for bit, also when
    # the blocks are recomputed in backward.
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    sigma = torch.rand(3) + 0.1
    labels = torch.eye(3)[[0, 2, 1]]
    aug = torch.randn(3, 9)
    results = []
    for grouped in (False, True):
        net = _bf16_net(grouped)
        for m in net.modules():
            if isinstance(m, UNetBlock):
                m.checkpoint_activations = checkpointing
        xi = x.detach().clone().requires_grad_(True)
        out = net(xi, sigma, labels, augment_labels=aug)
        (out.float() ** 2).sum().backward()
        results.append((out, xi.grad, {n: p.grad for n, p in net.named_parameters()}))
    (o0, x0, g0), (o1, x1, g1) = results
    assert torch.equal(o0, o1) and torch.equal(x0, x1)
    missing = [n for n in g0 if (g0[n] is None) != (g1[n] is None)]
    assert not missing, missing
    for n in g0:
        if g0[n] is not None:
            assert g1[n].dtype == torch.float32 and torch.equal(g0[n], g1[n]), n


class _NanToNumCount(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten.nan_to_num.out
        return func(*args, **(kwargs or {}))


def test_gradients_share_the_arena_and_its_cleaning_passes_match_per_tensor(teacher_file):
    tr = cpu_trainer(cfg_for(teacher_file, precision="bf16", dropout=0.0, augment=0.0))
    tr.step()
    seen = {}
    clean = tr.par.clean_grads

    def spy(params, device):
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        blocks = [m for net in (tr.G, tr.fake) for m in net.modules() if isinstance(m, UNetBlock)]
        affine = {id(p) for m in blocks for p in m.affine.parameters()}
        block_ids = {id(p) for m in blocks for p in m.parameters()} - affine
        in_blocks = [p.grad for p in params if id(p) in block_ids and p.grad is not None]
        affines = [p.grad for p in params if id(p) in affine and p.grad is not None]
        assert len(in_blocks) > 20 and len(affines) > 4
        if seen:  # the generator phase: poison two gradients, one in a block and one outside
            in_blocks[3].view(-1)[5] = float("nan")
            grads[0].view(-1)[0] = float("-inf")
        seen.setdefault("storages", []).append({g.untyped_storage().data_ptr() for g in in_blocks})
        # the affine layers run as one matmul: their gradients are slices of its weight's and its bias's
        seen.setdefault("affine_storages", []).append({g.untyped_storage().data_ptr() for g in affines})
        expect = [torch.nan_to_num(g.clone(), nan=0, posinf=1e5, neginf=-1e5) for g in grads]
        with _NanToNumCount() as passes:
            bad = clean(params, device)
        seen.setdefault("passes", []).append(passes.n)
        seen.setdefault("bad", []).append(bool(bad))
        for g, e in zip(grads, expect):
            assert torch.equal(g, e)
        return bad

    tr.par.clean_grads = spy
    tr.step()
    assert all(len(s) <= GradArena.CHUNKS for s in seen["storages"]), "block gradients not in the arena"
    assert all(len(s) == 2 for s in seen["affine_storages"])
    # a pass per arena buffer, per affine buffer and per tensor outside the blocks, not one per parameter
    assert all(n <= GradArena.CHUNKS + 16 for n in seen["passes"]), seen["passes"]
    assert seen["bad"] == [False, True]


def test_flat_buffers_only_merge_exact_tilings():
    buf = torch.arange(10.0)
    a, b = buf[:4].view(2, 2), buf[4:]
    assert [t.data_ptr() for t in flat_buffers([b, a])] == [buf.data_ptr()] and flat_buffers([a, b])[0].numel() == 10
    gap = torch.zeros(10)
    assert len(flat_buffers([gap[:4], gap[5:]])) == 2  # element 4 belongs to no tensor
    overlap = torch.zeros(10)
    assert len(flat_buffers([overlap[:6], overlap[4:8], overlap[8:]])) == 3
    strided = torch.zeros(4, 4)
    assert len(flat_buffers([strided[:, :2], strided[:, 2:]])) == 2  # not dense
    single = torch.ones(3)
    assert flat_buffers([single])[0] is single


def test_fixed_margin_augmentation_matches_edm_up_to_rounding():
    # Both pad with the same reflected pixels wherever a sample reads; only the sampling grid's fp32 coordinates are
    # rounded differently (~6e-8 relative to coordinates of up to ~3 image sizes after the 2x upsampling): a few 1e-6
    # of a pixel, times pixel differences of at most 2 (images in [-1, 1]), bounded here by 1e-4.
    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16) * 2 - 1
    for p in (0.12, 1.0):
        ya, la = AugmentPipe(p=p)(x, torch.Generator().manual_seed(5))
        yb, lb = AugmentPipe(p=p, fixed_margin=True)(x, torch.Generator().manual_seed(5))
        assert torch.equal(la, lb)
        assert (ya - yb).abs().max().item() < 1e-4


@pytest.mark.slow
def test_whole_step_compiles_to_one_graph_per_call_site_without_breaks_or_recompilations():
    rec = compile_report("digits", "+compile", dict(precision="bf16", optimizer="fused", compile=True), 2, steps=3)
    assert rec["graph_breaks"] == 0, rec["graph_break_reasons"]
    assert rec["graphs_by_site"] == {s: 1 for s in ("G_eval", "fake_train", "G_train", "teacher", "fake_eval")}
    assert rec["recompiles_after_first_step"] == 0, rec["recompilations"]


def test_no_host_sync_inside_the_micro_batch_loop_on_the_fast_path(teacher_file):
    # With augmentation on, the reference pads as EDM does (one host read per fake-score micro-batch, which the
    # counter must see); the bf16 fast path reads nothing from the device inside the loop.
    def build(**options):
        return lambda rounds: cpu_trainer(cfg_for(teacher_file, augment=0.5, batch=2 * rounds, batch_gpu=2, **options))

    ref = count_syncs("tiny", "reference", {}, 2, build=build(precision="fp32"))
    assert ref["syncs_per_micro_batch"] == 1, ref
    assert any("augment.py" in site for site in ref["per_micro_batch_sites"])
    fast = count_syncs("tiny", "bf16", {}, 2, build=build(precision="bf16", optimizer="fused"))
    assert fast["syncs_per_micro_batch"] == 0 and fast["syncs_per_step"] == 0, fast


def test_per_parameter_work_is_done_per_tensor_list_on_the_eager_fast_path():
    ref = count_launches("digits", "reference", dict(precision="fp32"), "cpu")
    fast = count_launches("digits", "+fused_adam", dict(precision="bf16", optimizer="fused"), "cpu")
    n = ref["params_per_network"]
    for phase in ("fake_score", "generator"):
        # the official per-parameter cleaning: 7 ops (isfinite, all, or, nan_to_num) per gradient
        assert ref["by_part"][phase]["clean"] >= 7 * n
        # a pass per arena buffer plus the parameters outside the UNet blocks
        assert fast["by_part"][phase]["clean"] <= 7 * (GradArena.CHUNKS + 20)
    casts = [k for k in fast["top_ops"] if k == "aten._to_copy"]
    assert not casts or fast["top_ops"]["aten._to_copy"] < 2 * n  # not one per parameter per network call
    assert fast["launches"] <= 0.5 * ref["launches"], (fast["launches"], ref["launches"])
    # CUDA kernels per dispatch (KERNELS_PER_OP, multi_tensor_apply's limits): every dispatch at least one kernel, the
    # convolutions' backward two to five; fused Adam split by the tensor and block limits of its real parameters
    for rec in (ref, fast):
        assert rec["launches_cuda"] <= rec["kernels_low"] <= rec["kernels_high"]
        conv_bwd = rec["ops"]["aten.convolution_backward"]
        assert rec["kernels_high"] - rec["kernels_low"] >= 3 * conv_bwd
    lo, hi = fast["kernels_by_part"]["generator/optimizer"]
    adam_lo, adam_hi = mta_launches(fast_param_numels(), 4)  # _fused_adam_ alone, at the parameters' real sizes
    assert adam_lo > 1 and lo >= adam_lo and hi >= adam_hi


def fast_param_numels():
    from bench.memory import make_trainer

    tr = make_trainer("digits", 4, dict(precision="bf16"), "cpu")
    return [p.numel() for p in tr.G.parameters()]


def test_multi_tensor_apply_launches_follow_its_limits():
    from bench.overhead import MTA_BLOCKS, MTA_CHUNK, kernels_of

    assert mta_launches([1] * 36, 4) == (1, 2) and mta_launches([1] * 37, 4) == (2, 3)  # 36 tensors per launch
    assert mta_launches([1] * 110, 1) == (1, 2) and mta_launches([1] * 111, 1) == (2, 3)
    big = [MTA_CHUNK * MTA_BLOCKS * 3]  # one tensor of three launches' worth of blocks
    assert mta_launches(big, 4) == (3, 4)
    assert kernels_of("aten.convolution_backward", ()) == (2, 5) and kernels_of("aten.add", ()) == (1, 1)
    xs = [torch.zeros(3) for _ in range(70)]
    assert kernels_of("aten._foreach_add", (xs, xs)) == (2, 3)  # depth 2: 64 tensors per launch
