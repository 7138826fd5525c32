"""What a SiD step costs beyond its FLOPs, counted without a GPU: launches, host syncs, graph breaks, collectives.

    python -m bench.overhead                                     # every part, the four configurations, every rung
    python -m bench.overhead --parts launches --configs cifar10  # one part
    python -m bench.overhead --parts collectives                 # two gloo processes (DDP and FSDP2), digits

An H100 computes a CIFAR-10 SiD iteration at the official 16 images per GPU in about 10 ms of bf16 tensor-core time;
what else a step costs does not depend on the device and is counted here, on the trainer's own phases:

- launches: every aten op one iteration dispatches (a TorchDispatchMode), by phase and by part of the phase (the
  forwards of G, teacher and fake score; backward; gradient cleaning; optimizer; EMA; the loss and draws). In eager
  mode each op that is not a view or an allocation is a kernel launch on a GPU (foreach and fused-Adam ops count as
  one dispatch; CUDA splits them into a launch per ~100 tensors). Counted on the meta device (shapes only) at the
  official batch, except digits (CPU) and the fused optimizer, whose dispatches are counted on CPU twins of the
  parameters (the count depends on the number of tensors, not on their values or device).
- syncs: every op that needs a value on the host (`_local_scalar_dense` under .item()/int()/bool(), nonzero,
  masked_select, data-dependent boolean indexing, unique, equal) and every host copy of a tensor (`tolist`, `numpy`,
  seen through a profile hook since they are not dispatched), with its call site, counted on CPU for one iteration at
  one and at two micro-batches per phase: the difference is what each micro-batch adds.
- compile: with torch.compile (backend `eager`: Dynamo's graphs and guards are what decide breaks and
  recompilations, not the code generator) over several iterations that cross the phases' train/eval and
  requires_grad changes, the EMA ramp-up and a snapshot (G_ema sampled): graphs per call site, every graph break
  with its reason, every recompilation with the guard that failed.
- collectives (sid_fast.bench_overhead_dist, two gloo processes): every all-reduce, all-gather and reduce-scatter of
  one iteration with DDP and with FSDP2 (torch.profiler's record_param_comms events: kind, bytes, order), and whether
  it was issued while backward was still running (the overlap that hides it on a GPU).

Rungs (each adds to the previous one, as bench.train_step's ladder; compile rungs in the compile part):
    reference      fp32, the official Adam and EMA
    bf16           bf16 UNet bodies (grouped weight casts, bias in the convolution, one NaN-cleaning pass per network)
    +channels_last NHWC
    +fused_adam    fused Adam, foreach EMA
    +kernels       the Triton kernels (eager)
Results: JSON lines in bench/results/overhead.jsonl (`--out`); `python -m bench.report` renders them.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import types
from collections import Counter, defaultdict

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.common import command, environment, write_jsonl
from bench.memory import (
    FLOW_CONFIGS,
    SD_CONFIGS,
    autocast_on_meta,
    cuda_attention_on_meta,
    make_flow_trainer,
    make_sd_trainer,
    make_trainer,
)

ALL_CONFIGS = ("digits", "cifar10", "imagenet64", "edm2-xs")
LAUNCH_ONLY_CONFIGS = ("sd15", "sd3-medium")  # counted on request (--configs sd15), launches only
# The official per-GPU batch of each configuration (SiD's run_sid.sh: CIFAR-10 and ImageNet-64 16 per GPU; SiDA's
# EDM2 XS 64; the digits preset 256).
OFFICIAL_BATCH_GPU = {"digits": 256, "cifar10": 16, "imagenet64": 16, "edm2-xs": 64, "sd15": 1, "sd3-medium": 1}
# SD 1.5 (SiD-LSG, preset sd15-lsg2: guidance 2 everywhere) is counted on the meta device, launches only: the official
# batch_gpu is 1 (128 micro-batches per phase on 4 GPUs), so its record is one micro-batch pair and the optimizer
# and EMA of an iteration (an iteration of R micro-batches repeats the phases' per-micro-batch parts R times).
# SD3-Medium (SiD on flow matching, preset sd3-medium-sid: kappa 4.5 everywhere, four-step generator) likewise, one
# micro-batch pair at 1024 px; its k is the iteration's draw (the record says which), each step of G one call.

RUNGS = [
    ("reference", dict(precision="fp32")),
    ("bf16", dict(precision="bf16")),
    ("+channels_last", dict(channels_last=True)),
    ("+fused_adam", dict(optimizer="fused")),
    ("+kernels", dict(kernels="all")),
]
# Counted beside the ladder: the eager bf16 path without channels_last (what the 14,192 launches measured).
EXTRA_LAUNCH_RUNGS = [("bf16+fused_adam", dict(precision="bf16", optimizer="fused"))]
COMPILE_RUNGS = [
    ("+compile", dict(precision="bf16", channels_last=True, optimizer="fused", compile=True)),
    ("+compile+kernels", dict(precision="bf16", channels_last=True, optimizer="fused", compile=True, kernels="all")),
]

# Ops that allocate or re-describe memory without a kernel.
NO_LAUNCH = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.set_", "aten.lift_fresh", "aten.detach"}
# Ops whose time is the tensor cores' (counted as FLOPs, not bytes, by bench.predict).
DENSE_OPS = {
    "aten.convolution",
    "aten.convolution_backward",
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "sid_fast_kernels.edm_flash_attention",
    "sid_fast_kernels.edm_flash_attention_bwd",
}
# Ops that wait for a value on the host.
SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.is_nonzero",
    "aten.equal",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.repeat_interleave",
}


def _tensor_bytes(tree) -> int:
    """Bytes of the distinct storages among the tensors in `tree` (what one op reads and writes at least)."""
    from torch.utils._pytree import tree_flatten

    seen, total = set(), 0
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.device.type) if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _name(func) -> str:
    return str(func.overloadpacket)


# ------------------------------------------------------------------------------------------------------------------
# CUDA kernels per dispatched op: what PyTorch's CUDA backend, cuDNN and cuBLAS launch for one call, as a range (low,
# high) with the reason. A dispatch is what the host pays for; a kernel is what the device runs (>= 2.5 us each).
KERNELS_PER_OP: dict[str, tuple[int, int, str]] = {
    "aten.convolution": (
        1,
        3,
        "cuDNN's convolution (bias in its epilogue, or one add); an NCHW tensor-core engine "
        "adds up to two layout transposes",
    ),
    "aten.convolution_backward": (
        2,
        5,
        "cuDNN's dgrad and wgrad, the bias gradient's reduction; split-K wgrad adds "
        "a reduction, NCHW layouts transposes",
    ),
    "aten.mm": (1, 2, "cuBLAS GEMM; split-K adds a reduction kernel"),
    "aten.addmm": (1, 2, "cuBLASLt GEMM with the bias epilogue; split-K adds a reduction"),
    "aten.bmm": (1, 2, "cuBLAS batched GEMM; split-K adds a reduction"),
    "aten.native_group_norm": (2, 2, "PyTorch's GroupNorm: per-(sample, group) moments, then the normalisation"),
    "aten.native_group_norm_backward": (2, 4, "per-channel sums of dy and dy*x, then dx (and dgamma/dbeta)"),
    "aten.native_layer_norm": (1, 1, "one fused kernel"),
    "aten.native_layer_norm_backward": (2, 3, "dx, then dgamma/dbeta partial sums and their reduction"),
    "aten._scaled_dot_product_flash_attention": (1, 1, "FlashAttention-2 forward"),
    "aten._scaled_dot_product_flash_attention_backward": (2, 3, "dot(dO, O) pre-pass, the backward, dq conversion"),
    "aten._scaled_dot_product_efficient_attention": (1, 1, "memory-efficient attention forward"),
    "aten._scaled_dot_product_efficient_attention_backward": (1, 2, "the backward (and dq/dk/dv zeroing)"),
    **dict.fromkeys(
        ("aten.index_put", "aten.index_put_", "aten._index_put_impl_"),
        (1, 8, "accumulate=True sorts the indices first (radix sort, several kernels)"),
    ),  # fmt: skip
    "aten.nonzero": (2, 3, "count, then write the indices (and a host sync)"),
    "aten.native_dropout": (1, 1, "one fused mask-and-scale kernel"),
    "sid_fast_kernels.group_norm_silu": (1, 1, "one Triton kernel"),
    "sid_fast_kernels.group_norm_silu_bwd": (
        3,
        5,
        "one Triton kernel, two reductions of the partial weight and bias "
        "gradients, layout copies of dy and the modulation",
    ),
    "sid_fast_kernels.edm_flash_attention": (1, 1, "one Triton kernel"),
    "sid_fast_kernels.edm_flash_attention_bwd": (3, 3, "delta, dK/dV, dQ: three Triton kernels"),
    "sid_fast_kernels.sid_loss": (1, 1, "one Triton kernel"),
    "sid_fast_kernels.sid_loss_bwd": (1, 1, "one Triton kernel"),
    "sid_fast_kernels.edm_loss": (1, 1, "one Triton kernel"),
    "sid_fast_kernels.edm_loss_bwd": (1, 1, "one Triton kernel"),
}
DEFAULT_KERNELS = (1, 1, "one elementwise, reduction, copy, concatenation or random kernel")
# PyTorch's multi_tensor_apply (foreach ops, fused Adam): one launch holds at most MTA_TENSORS[depth] tensors of
# each list and MTA_BLOCKS chunks of MTA_CHUNK elements (aten/src/ATen/native/cuda/MultiTensorApply.cuh).
MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
MTA_BLOCKS, MTA_CHUNK = 320, 65536


def mta_launches(numels: list[int], depth: int) -> tuple[int, int]:
    """(low, high) launches of one multi_tensor_apply call over tensors of these sizes, `depth` lists."""
    if not numels:
        return 0, 0
    by_tensors = -(-len(numels) // MTA_TENSORS[min(max(depth, 1), 5)])
    by_blocks = -(-sum(-(-n // MTA_CHUNK) for n in numels) // MTA_BLOCKS)
    return max(by_tensors, by_blocks), by_tensors + by_blocks


def kernels_of(name: str, args, numels=None) -> tuple[int, int]:
    """(low, high) CUDA kernels of one dispatch of `name` with `args` (foreach and fused ops: by their tensor lists;
    `numels` replaces the sizes of their first list, e.g. the real parameters of CPU twins)."""
    if name.startswith("aten._foreach_") or name.startswith("aten._fused_"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(torch.is_tensor(t) for t in a)]
        if not lists:
            return 1, 1
        depth = 4 if name.startswith("aten._fused_adam") else len(lists)
        return mta_launches(numels if numels is not None else [t.numel() for t in lists[0]], depth)
    lo, hi, _ = KERNELS_PER_OP.get(name, DEFAULT_KERNELS)
    return lo, hi


def _is_view(func) -> bool:
    return func.is_view or _name(func) in ("aten.view", "aten._unsafe_view", "aten.alias")


# ----------------------------------------------------------------------------------------------------------------
# Launches.


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops by (phase, part, op): views and allocations apart from launches."""

    def __init__(self, tr):
        super().__init__()
        self.tr = tr
        self.phase = "other"
        self.region: list[str] = []  # innermost last: network forwards, clean, optimizer
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()  # (phase, part) -> bytes read and written by memory-bound launches
        self.kernels: Counter = Counter()  # (phase, part, "low" | "high") -> estimated CUDA kernels (KERNELS_PER_OP)
        self.views = 0
        self.allocs = 0

    def part(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            # a compiled graph's backward: its launches are counted from Inductor's code (compiled_launches)
            return "compiled_backward" if "CompiledFunction" in type(node).__name__ else "backward"
        return self.region[-1] if self.region else "loss_and_draws"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        if _is_view(func):
            self.views += 1
        elif name in NO_LAUNCH or name.startswith("profiler."):
            self.allocs += 1
        else:
            key = (self.phase, self.part())
            self.ops[(*key, name)] += 1
            lo, hi = kernels_of(name, args)
            self.kernels[(*key, "low")] += lo
            self.kernels[(*key, "high")] += hi
            out = func(*args, **(kwargs or {}))
            if name not in DENSE_OPS:
                self.bytes[key] += _tensor_bytes((args, kwargs, out))
            return out
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def regions(self):
        """Forward hooks name the network that runs; wrappers name the phases and the end-of-phase work."""
        tr, handles, saved = self.tr, [], []
        for name, net in dict(G=tr.G, teacher=tr.teacher, fake_score=tr.fake, G_ema=tr.G_ema).items():
            handles.append(net.register_forward_pre_hook(lambda m, a, n=name: self.region.append(n)))
            handles.append(net.register_forward_hook(lambda m, a, o: self.region.pop() and None))
        for opt in (tr.opt_g, tr.opt_fake):
            handles.append(opt.register_step_pre_hook(lambda *a: self.region.append("optimizer")))
            handles.append(opt.register_step_post_hook(lambda *a: self.region.pop() and None))

        def wrap(obj, attr, phase=None, region=None):
            fn = getattr(obj, attr)
            saved.append((obj, attr, fn))

            def wrapped(*a, **k):
                prev = self.phase
                if phase:
                    self.phase = phase
                if region:
                    self.region.append(region)
                try:
                    return fn(*a, **k)
                finally:
                    if region:
                        self.region.pop()
                    self.phase = prev

            setattr(obj, attr, wrapped)

        wrap(tr, "fake_score_phase", phase="fake_score")
        wrap(tr, "generator_phase", phase="generator")
        wrap(tr.calls, "update_ema", phase="ema", region="ema")
        wrap(tr.par, "clean_grads", region="clean")
        wrap(tr.par, "reduce_replicated", region="clean")
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for obj, attr, fn in saved:
                if obj is tr or obj is tr.par:
                    delattr(obj, attr)  # the bound method again
                else:
                    setattr(obj, attr, fn)


def optimizer_dispatches(opt, kind: str, kernels: list | None = None) -> Counter:
    """The ops one step of `opt` dispatches on a GPU, counted on CPU twins of its parameters of one element each (what
    an optimizer dispatches depends on the number of tensors, not on their sizes): `fused` and `foreach` as asked,
    and `adam` (the official torch.optim.Adam) with foreach, which PyTorch picks by itself for CUDA tensors. With
    `kernels` ([low, high], added to), the CUDA kernels of those dispatches, the lists of twins taken at the real
    parameters' sizes (multi_tensor_apply splits by tensor count and by size)."""
    real = [p.numel() for g in opt.param_groups for p in g["params"]]
    params = [torch.zeros(1, requires_grad=True) for g in opt.param_groups for _ in g["params"]]
    flag = "fused" if kind == "fused" else "foreach"
    twin = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999), eps=1e-8, **{flag: True})
    for p in params:
        p.grad = torch.zeros(1)
    twin.step()  # the states exist, as in every step but the first
    counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not _is_view(func) and _name(func) not in NO_LAUNCH:
                counter[_name(func)] += 1
                if kernels is not None:
                    first = next((a for a in args if isinstance(a, (list, tuple)) and a), None)
                    twins = (
                        first is not None
                        and len(first) == len(real)
                        and all(torch.is_tensor(t) and t.ndim == 1 for t in first)
                    )  # the parameters', gradients' or moments' twins (the step counts are 0-d)
                    lo, hi = kernels_of(_name(func), args, numels=real if twins else None)
                    kernels[0] += lo
                    kernels[1] += hi
            return func(*args, **(kwargs or {}))

    with _Count():
        twin.step()
    return counter


def count_launches(config: str, rung: str, options: dict, device: str) -> dict:
    kind = options.get("optimizer", "adam")
    bg = OFFICIAL_BATCH_GPU[config]
    # On the meta device the trainer runs a foreach Adam (fused refuses meta; the EMA is the rung's own either way);
    # the optimizer's own dispatches are counted on CPU twins as a GPU would run them.
    opts = dict(options, optimizer="foreach") if kind == "fused" else options
    with contextlib.ExitStack() as stack:
        if config in SD_CONFIGS or config in FLOW_CONFIGS:  # CUDA attention and autocast, as bench.memory on meta
            stack.enter_context(cuda_attention_on_meta())
            if opts.get("precision") == "bf16":
                stack.enter_context(autocast_on_meta(torch.bfloat16))
            sd_opts = {k: v for k, v in opts.items() if k != "kernels"}
            if opts.get("kernels"):
                sd_opts["kernels"] = "sid_loss"  # the one kernel that applies to a diffusers UNet
            if config in FLOW_CONFIGS:  # seed 2: the counted (second) iteration runs all K = 4 generator steps
                tr = make_flow_trainer(config, bg, dict(sd_opts, seed=2), device)
            else:
                tr = make_sd_trainer(config, bg, sd_opts, device)
        else:
            tr = make_trainer(config, bg, opts, device)
        tr.step()  # warm: Adam states and gradients' first allocation done
        k_run = tr.generator_steps_now()  # the counted iteration's generator steps (few-step generators)
        counter = LaunchCounter(tr)
        flops = FlopCounterMode(display=False)
        with counter.regions(), flops, counter:
            tr.step()
    ops, kern = counter.ops, counter.kernels
    for key in [k for k in ops if k[1] == "optimizer"]:
        del ops[key]
    for key in [k for k in kern if k[1] == "optimizer"]:
        del kern[key]
    for phase, opt in (("fake_score", tr.opt_fake), ("generator", tr.opt_g)):
        k = [0, 0]
        for name, n in optimizer_dispatches(opt, kind, k).items():
            ops[(phase, "optimizer", name)] += n
        kern[(phase, "optimizer", "low")] += k[0]
        kern[(phase, "optimizer", "high")] += k[1]
    by_part: dict = defaultdict(Counter)
    for (phase, part, _), n in ops.items():
        by_part[phase][part] += n
    by_op = Counter()
    for (_, _, name), n in ops.items():
        by_op[name] += n
    n_params = sum(1 for _ in tr.G.parameters())
    # On CUDA, F.dropout is one fused kernel (native_dropout); on the CPU and the meta device it decomposes into
    # bernoulli_, div_ and mul (bernoulli_ is dispatched by dropout alone in these networks).
    dropout_calls = by_op.get("aten.bernoulli_", 0)
    return dict(
        bench="overhead",
        part="launches",
        config=config,
        mode=rung,
        options=options,
        batch_gpu=bg,
        device=device,
        generator_steps_run=k_run,
        launches=sum(ops.values()),
        launches_cuda=sum(ops.values()) - 2 * dropout_calls,
        views=counter.views,
        allocations=counter.allocs,
        by_phase={ph: sum(c.values()) for ph, c in by_part.items()},
        by_part={ph: dict(c) for ph, c in by_part.items()},
        top_ops=dict(by_op.most_common(25)),
        ops=dict(by_op.most_common()),
        # CUDA kernels (KERNELS_PER_OP, multi_tensor_apply's limits), low and high; dropout as one kernel on CUDA
        kernels_low=sum(n for (_, _, b), n in kern.items() if b == "low") - 2 * dropout_calls,
        kernels_high=sum(n for (_, _, b), n in kern.items() if b == "high") - 2 * dropout_calls,
        kernels_by_part={
            f"{ph}/{part}": [kern[(ph, part, "low")], kern[(ph, part, "high")]] for (ph, part, b) in kern if b == "low"
        },  # fmt: skip
        flops=float(flops.get_total_flops()),
        membound_bytes={f"{ph}/{part}": n for (ph, part), n in counter.bytes.items()},
        params_per_network=n_params,
        trained_params=sum(p.numel() for p in tr.G.parameters()),
    )


def compiled_launches(config: str, rung: str, options: dict, batch_gpu: int) -> dict:
    """Launches of one compiled iteration (Inductor, one micro-batch per phase): the kernel calls in the wrapper code
    Inductor wrote for each graph (its generated kernels and the extern kernels it keeps: convolutions, matmuls), each
    graph running once per iteration, plus the ops dispatched one by one outside the compiled call sites (losses,
    draws, gradient cleaning, optimizer, EMA). Inductor writes C++ kernels for the CPU here: its scheduler makes the
    same fusion decisions as for Triton on a GPU, but the counts are the CPU backend's."""
    import logging
    import re

    import torch._dynamo
    import torch._inductor.config
    from torch.utils._python_dispatch import _disable_current_modes

    torch._dynamo.reset()
    codes: list[str] = []

    class _Code(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "def call(" in msg:
                codes.append(msg)

    handler = _Code()
    log = logging.getLogger("torch._inductor")
    torch._logging.set_logs(output_code=True)
    log.addHandler(handler)
    try:
        # every graph compiled here and its code written to the log (a cache hit would write none)
        with torch._inductor.config.patch(force_disable_caches=True):
            tr = make_trainer(config, batch_gpu, dict(options, compile_backend="inductor"), "cpu")
            tr.step()
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
    per_graph = []
    for code in codes:
        body = code[code.index("def call(") :]
        generated = len(re.findall(r"\b(?:cpp_fused_\w+|triton_\w+\.run)\(", body))
        extern = len(re.findall(r"\bextern_kernels\.\w+\(|\baten\.\w+\.\w+\(", body))
        per_graph.append(dict(generated=generated, extern=extern))
    for site in ("G_train", "G_eval", "fake_train", "fake_eval", "teacher"):  # the graphs run unwatched
        fn = getattr(tr.calls, site)

        def unwatched(*a, fn=fn, **k):
            with _disable_current_modes():
                return fn(*a, **k)

        setattr(tr.calls, site, unwatched)
    counter = LaunchCounter(tr)
    with counter.regions(), counter:
        tr.step()
    for key in [k for k in counter.ops if k[1] == "compiled_backward"]:
        del counter.ops[key]
    outside = sum(counter.ops.values())
    in_graphs = sum(g["generated"] + g["extern"] for g in per_graph)
    return dict(
        bench="overhead",
        part="compiled_launches",
        config=config,
        mode=rung,
        options=options,
        batch_gpu=batch_gpu,
        graphs=len(per_graph),
        inductor_kernels=sum(g["generated"] for g in per_graph),
        extern_kernels=sum(g["extern"] for g in per_graph),
        outside_graphs=outside,
        launches=in_graphs + outside,
        by_part_outside={ph: sum(n for (p2, _, _), n in counter.ops.items() if p2 == ph) for ph in PHASE_NAMES},
        top_outside=_by_op(counter.ops),
    )


PHASE_NAMES = ("fake_score", "generator", "ema", "other")


def _by_op(ops: Counter) -> dict:
    out = Counter()
    for (_, _, name), n in ops.items():
        out[name] += n
    return dict(out.most_common(20))


# ----------------------------------------------------------------------------------------------------------------
# Host synchronisations.


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if "/sid_fast/" in f.filename or "/kernels/" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {(f.line or '').strip()}"


class SyncCounter(TorchDispatchMode):
    """Ops and host copies that wait for device values, with their call sites."""

    HOST_COPIES = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self, host_tensors=()):
        super().__init__()
        self.sites: Counter = Counter()
        self.host = {id(t) for t in host_tensors}  # CPU tensors on a GPU run too (the official Adam's step counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        sync = name in SYNC_OPS and not (args and id(args[0]) in self.host)
        if name == "aten.index" and len(args) > 1:  # boolean-mask indexing: the result's shape needs the mask's sum
            sync = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
        if name == "aten._to_copy" and isinstance(args[0], torch.Tensor):
            dev = (kwargs or {}).get("device")
            sync = dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu"
        if sync:
            self.sites[(name, _site())] += 1
        return func(*args, **(kwargs or {}))

    def _profile(self, frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) in ("tolist", "numpy"):
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, torch.Tensor):
                self.sites[(f"Tensor.{arg.__name__}", _site())] += 1

    @contextlib.contextmanager
    def watching(self):
        sys.setprofile(self._profile)
        try:
            with self:
                yield
        finally:
            sys.setprofile(None)


def opt_keeps_step_on_host(tr) -> bool:
    """Does the rung's Adam keep its step counts on the host on a GPU (torch.optim.Adam unless fused or capturable)?"""
    return tr.cfg.optimizer != "fused"


def count_syncs(config: str, rung: str, options: dict, batch_gpu: int, build=None) -> dict:
    """Syncs of one iteration on CPU (the preset's augmentation on) with one and with two micro-batches per phase;
    the difference is what each micro-batch adds. `build(rounds)`: another trainer than the configuration's."""
    per_rounds = {}
    for rounds in (1, 2):
        if build is not None:
            tr = build(rounds)
        else:
            tr = make_trainer(config, batch_gpu, options, "cpu", rounds=rounds, augment=True)
        tr.step()
        steps = [st["step"] for opt in (tr.opt_g, tr.opt_fake) for st in opt.state.values() if "step" in st]
        c = SyncCounter(host_tensors=[t for t in steps if not t.is_cuda and opt_keeps_step_on_host(tr)])
        with c.watching():
            tr.step()
        per_rounds[rounds] = c.sites
    one, two = per_rounds[1], per_rounds[2]
    per_micro = {f"{k[0]} @ {k[1]}": two[k] - one.get(k, 0) for k in two if two[k] - one.get(k, 0)}
    per_step = {f"{k[0]} @ {k[1]}": n for k, n in one.items()}
    return dict(
        bench="overhead",
        part="syncs",
        config=config,
        mode=rung,
        options=options,
        batch_gpu=batch_gpu,
        augment=tr.cfg.augment,
        syncs_per_step=sum(one.values()),
        syncs_per_micro_batch=sum(per_micro.values()),
        per_micro_batch_sites=per_micro,
        per_step_sites=per_step,
    )


# ----------------------------------------------------------------------------------------------------------------
# Graph breaks and recompilations.


def compile_report(config: str, rung: str, options: dict, batch_gpu: int, steps: int) -> dict:
    """Dynamo's graphs, breaks and recompilations over `steps` iterations and a G_ema sample, backend eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    recompiles: list[str] = []
    graphs: Counter = Counter()

    def backend_for(site):
        def backend(gm, example_inputs):
            graphs[site] += 1
            return gm.forward

        return backend

    import logging

    class _Recompiles(logging.Handler):
        def emit(self, record):
            recompiles.append(record.getMessage().strip()[:400])

    handler = _Recompiles()
    rlog = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    rlog.addHandler(handler)
    try:
        tr = make_trainer(config, batch_gpu, dict(options, compile_backend="eager"), "cpu")
        from sid_fast import perf

        # The trainer compiles with the configured backend; the same call sites, with a counting backend.
        sites = ("G_train", "G_eval", "fake_train", "fake_eval", "teacher")
        backends = {site: backend_for(site) for site in sites}
        tr.calls = perf.call_sites(tr.cfg, tr.teacher, tr.G, tr.fake, tr.par.G_dist, tr.par.fake_dist, backends)
        warm = {}
        for i in range(steps):
            tr.step()
            if i == 0:
                warm = dict(graphs=sum(graphs.values()), recompiles=len(recompiles))
        with torch.no_grad():  # what a snapshot does: G_ema samples (not compiled: eval only)
            tr.generate(tr.G_ema, *tr.draw_z_cond(tr.micro_batch_rng(0, 0)))
    finally:
        rlog.removeHandler(handler)
        torch._logging.set_logs()
    breaks = {str(k): v for k, v in counters["graph_break"].items()}
    return dict(
        bench="overhead",
        part="compile",
        config=config,
        mode=rung,
        options=options,
        batch_gpu=batch_gpu,
        steps=steps,
        graphs=sum(graphs.values()),
        graphs_by_site=dict(graphs),
        graph_breaks=sum(breaks.values()),
        graph_break_reasons=breaks,
        recompilations=[r for r in recompiles if "Recompiling" in r or "triggered by" in r],
        graphs_after_first_step=sum(graphs.values()) - warm.get("graphs", 0),
        recompiles_after_first_step=len(recompiles) - warm.get("recompiles", 0),
    )


# ----------------------------------------------------------------------------------------------------------------


@command(__doc__)
@click.option("--configs", default=",".join(ALL_CONFIGS), show_default=True)
@click.option("--rungs", default=",".join(r for r, _ in RUNGS + EXTRA_LAUNCH_RUNGS + COMPILE_RUNGS), show_default=True)
@click.option(
    "--parts",
    default="launches,syncs,compile",
    show_default=True,
    help="launches, syncs, compile, inductor (with compile), collectives",
)
@click.option(
    "--sync-batch-gpu",
    "sync_batch_gpu",
    type=int,
    default=2,
    show_default=True,
    help="micro-batch of the CPU sync count",
)
@click.option("--compile-steps", "compile_steps", type=int, default=3, show_default=True)
@click.option("--out", default="overhead.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    configs, parts, wanted = a.configs.split(","), a.parts.split(","), a.rungs.split(",")
    for c in configs:
        if c not in ALL_CONFIGS + LAUNCH_ONLY_CONFIGS:
            raise SystemExit(f"--configs: unknown {c!r}; choose from {','.join(ALL_CONFIGS + LAUNCH_ONLY_CONFIGS)}.")
    known = {r for r, _ in RUNGS + COMPILE_RUNGS + EXTRA_LAUNCH_RUNGS}
    if unknown := [r for r in wanted if r not in known]:
        raise SystemExit(f"--rungs: unknown {unknown}; the rungs are {sorted(known)}.")
    env = environment()
    records = []
    ladder, options = [], {}
    for rung, delta in RUNGS:
        options = {**options, **delta}
        ladder.append((rung, dict(options)))
    for config in configs:
        extra = list(EXTRA_LAUNCH_RUNGS) if config in ALL_CONFIGS else []
        if config in LAUNCH_ONLY_CONFIGS:
            parts = [p for p in parts if p == "launches"]
        for rung, options in ladder + extra:
            if rung not in wanted:
                continue
            if "launches" in parts:
                dev = "cpu" if config == "digits" else "meta"
                rec = count_launches(config, rung, options, dev)
                records.append({**rec, **env})
                print(
                    f"{config} {rung:<15} launches {rec['launches']:>6}  kernels "
                    f"{rec['kernels_low']}-{rec['kernels_high']}  {rec['by_phase']}",
                    flush=True,
                )
            if (
                "syncs" in parts and "kernels" not in options and (rung, options) not in extra
            ):  # the Triton kernels on CPU need the interpreter
                rec = count_syncs(config, rung, options, a.sync_batch_gpu)
                records.append({**rec, **env})
                print(
                    f"{config} {rung:<15} syncs per step {rec['syncs_per_step']}, per micro-batch "
                    f"{rec['syncs_per_micro_batch']} {list(rec['per_micro_batch_sites'])}",
                    flush=True,
                )
        if "compile" in parts:
            for rung, options in COMPILE_RUNGS:
                if rung not in wanted or ("kernels" in options and config != "digits"):
                    continue
                rec = compile_report(config, rung, options, a.sync_batch_gpu, a.compile_steps)
                records.append({**rec, **env})
                print(
                    f"{config} {rung:<17} graphs {rec['graphs']} breaks {rec['graph_breaks']} recompilations after "
                    f"the first step {rec['recompiles_after_first_step']}",
                    flush=True,
                )
                if "inductor" in parts and "kernels" not in options:
                    rec = compiled_launches(config, rung, options, a.sync_batch_gpu)
                    records.append({**rec, **env})
                    print(
                        f"{config} {rung:<17} {rec['graphs']} graphs: Inductor kernels {rec['inductor_kernels']} + "
                        f"extern {rec['extern_kernels']} + outside the graphs {rec['outside_graphs']} = "
                        f"{rec['launches']} launches",
                        flush=True,
                    )
    if "collectives" in parts:
        from bench import collectives

        for rec in collectives.run_all():
            records.append({**rec, **env})
            print(f"collectives {rec['mode']}: {rec['summary']}", flush=True)
    path = write_jsonl(records, a.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
