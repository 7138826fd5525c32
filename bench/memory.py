"""Exact memory accounting of a SiD step, on the CPU: bytes held for backward, peaks, static bytes, recompute FLOPs.

    python -m bench.memory                                   # cifar10, ffhq64, imagenet64; every rung
    python -m bench.memory --configs cifar10 --rungs reference,+kernels --batches 32,64
    python -m bench.memory --device cuda --configs cifar10 --batches 8,16    # prediction vs the CUDA allocator

Memory depends on shapes and dtypes, not on the device, so the trainer's own phases (`SiDTrainer.fake_score_phase`,
`generator_phase`) run here on the meta device: every tensor has a shape, a dtype and a storage but no values, the
Triton kernel ops run their shape functions, and a full ImageNet-64 step takes seconds. Two instruments watch them:

- the ledger (a TorchDispatchMode): every storage an op creates is counted from its allocation until its last
  reference dies (a weakref finaliser on the storage); views and in-place results add nothing. From it: `held`, the
  bytes allocated in the phase that are alive when backward starts (what the graph keeps: saved activations,
  checkpoints' stashed inputs, the outputs the trainer holds); `bwd_peak`, the most bytes alive during backward
  (recomputation, gradients of the activations and of the trained parameters included); `peak`, the most alive at any
  time in the phase. Each storage is attributed to the network whose forward allocated it (G, teacher, fake score;
  "loss" for the rest of the phase). Python's cyclic garbage collector is paused during a phase, so that a storage
  kept by a reference cycle counts until the phase ends (an upper bound that does not depend on when a collection
  happens to run).
- `torch.autograd.graph.saved_tensors_hooks`: the unique storages packed for backward, parameters excluded (`saved`).
  Tensors saved inside a checkpointed region are not packed (they are recomputed), and a checkpoint's stashed inputs
  are not packed either: `held` is the complete figure, `saved` the classic one.

Each quantity is measured at two batch sizes per GPU and reported per image (the slope) and per batch (the
intercept: weight casts, per-layer bf16 copies, the trained network's gradients). The meta device takes the same time
at any batch, so measure where the activations dominate (default 32 and 64): at small batches a per-batch constant
(the trained network's fp32 gradients, late in backward) can set the phase's peak, and a line through two such
points underestimates the peak at large batches (a record whose peak grows slower per image than the bytes held
when backward starts is flagged `peak_regime_warning` and printed). Static bytes are counted after a
warm step: the parameters and buffers of the four networks, the gradients that outlive their phase and the Adam
states. FLOPs per phase come from torch.utils.flop_counter (with formulas for the Triton attention op); a
checkpointing policy's recomputation is the difference to the same rung without it. The largest batch-gpu that fits
a GPU: static + the larger phase peak, with --headroom-gib left for the CUDA context, cuDNN workspaces and allocator
slack (not modelled). The fake-score phase runs without augmentation (EDM's augmentation needs values to size its
padding; it runs without gradient and holds nothing for backward).

Rungs (each adds to the previous one, as bench.train_step's ladder; rungs that change only time are left out):
    reference      fp32 (SiD's numerics)
    bf16           bf16 UNet bodies, bf16 teacher weights
    +channels_last NHWC activations and weights
    +kernels       the Triton kernels (losses, GroupNorm+SiLU, flash attention)
    +ckpt_blocks   --checkpointing blocks (teacher and fake score, per UNet block, generator phase)
    +ckpt_nets     --checkpointing nets (teacher and fake score, whole forwards, generator phase)
    +ckpt_selective --checkpointing selective (every network with gradient, per UNet block: convolution, matmul and
                   attention outputs kept, the memory-bound rest recomputed)
Results: JSON lines in bench/results/memory.jsonl; `python -m bench.report` renders the table.
"""

from __future__ import annotations

import contextlib
import gc
import time
import types
import weakref
from collections import Counter

import click
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, register_flop_formula

import sid_fast.kernels.attention  # noqa: F401  (registers the kernel ops whose FLOPs are counted below)
from bench.common import command, environment, write_jsonl
from sid_fast import ops
from sid_fast.checkpoints import load_network_file
from sid_fast.families import DIGITS_TEACHER_PATH, TeacherSpec
from sid_fast.families.sd import SDFamily
from sid_fast.networks import build_network, official_config
from sid_fast.networks.edm2 import edm2_config
from sid_fast.training.config import resolve_config
from sid_fast.training.run import build_trainer

MiB = 2**20
GiB = 2**30

# name -> (official EDM checkpoint, SiD preset, preset values for a data-free run).
CONFIGS = {
    "cifar10": ("edm-cifar10-32x32-uncond-vp", "cifar10-uncond"),
    "ffhq64": ("edm-ffhq-64x64-uncond-vp", "ffhq64"),
    "imagenet64": ("edm-imagenet-64x64-cond-adm", "imagenet64-cond"),
}
# EDM2's ImageNet-512 networks (latents 4x64x64), SiD presets edm2-img512-{size}: `--configs edm2-xs,...,edm2-xxl`.
EDM2_CONFIGS = {f"edm2-{s}": (s, f"edm2-img512-{s}") for s in ("xs", "s", "m", "l", "xl", "xxl")}

# SiD-LSG's Stable Diffusion UNets (public configurations, sid_fast.t2i.configs) at the official shapes: SD 1.5 at
# 512 px (latents 4x64x64; the trainer with its CLIP ViT-L/14 text encoder, preset sd15-lsg2: kappa 2 everywhere, so
# the teacher and the fake score run on doubled batches) and SDXL's UNet at 1024 px (latents 4x128x128; the same
# iteration, its text states, pooled embedding and size conditioning drawn in their shapes: the SDXL text encoders are
# not counted). On the meta device, attention is PyTorch's CUDA choice for these shapes: the flash kernel for bf16 and
# the memory-efficient kernel for fp32 (both keep the output and the log-sum-exp, never the L x L matrix).
SD_CONFIGS = {"sd15": "sd15-lsg2", "sdxl": "sd15-lsg2"}
# SiD on flow-matching DiTs (sid_fast.families.flow) at 1024 px (latents 16x128x128): the public transformer
# configurations of SD3-Medium (2.03 B parameters), SD3.5-Large (8.06 B) and FLUX.1-dev (11.9 B), with their text
# encoders (SD3: CLIP-L 124 M, CLIP-G 695 M, T5-XXL's encoder 4.76 B at 77 tokens; FLUX: CLIP-L and T5-XXL at 512)
# built on the meta device, the presets' iteration (kappa 4.5 everywhere: the teacher and the fake score on doubled
# batches, the K-step generator's last step with gradient).
_SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192)  # fmt: skip
FLOW_CONFIGS = {
    "sd3-medium": ("sd3-medium-sid", dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536)),
    "sd35-large": ("sd35-large-sid", dict(_SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                          qk_norm="rms_norm")),
    "flux-dev": ("flux-dev-sid", dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                      guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    # 512 px: SD3-Medium at 16x64x64 latents; SANA-600M and 1.6B (Sana_{600M,1600M}_512px's transformers, 32x16x16
    # DC-AE latents) with Gemma-2 2B (its 300 kept tokens from the instruction's ~1,300).
    "sd3-medium-512": ("sd3-medium-sid", dict(_SD3, sample_size=64, num_layers=24, num_attention_heads=24,
                                              caption_projection_dim=1536, pos_embed_max_size=192)),
    "sana-600m-512": ("sana-600m-512-sid", dict(in_channels=32, out_channels=32, num_attention_heads=36,
                                                attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                                                cross_attention_head_dim=72, cross_attention_dim=1152,
                                                caption_channels=2304, mlp_ratio=2.5, sample_size=16, patch_size=1)),
    "sana-1600m-512": ("sana-1600m-512-sid", dict(in_channels=32, out_channels=32, num_attention_heads=70,
                                                  attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
                                                  cross_attention_head_dim=112, cross_attention_dim=2240,
                                                  caption_channels=2304, mlp_ratio=2.5, sample_size=16, patch_size=1)),
}  # fmt: skip
# The data-aided variant (--method sida) of the released SiDA teachers: the fake phase's extra real branch.
for _name, _sida in (("sd3-medium", "sd3-medium-sida"), ("sd35-large", "sd35-large-sida"),
                     ("sd3-medium-512", "sd3-medium-sida"), ("sana-600m-512", "sana-600m-512-sida")):  # fmt: skip
    FLOW_CONFIGS[_name + "-sida"] = (_sida, FLOW_CONFIGS[_name][1])
SANA_INSTRUCTED_TOKENS = 1300  # about the complex human instruction's Gemma tokens + 298 (SanaPipeline's length)
RUNGS = [
    ("reference", dict(precision="fp32")),
    ("bf16", dict(precision="bf16")),
    ("+channels_last", dict(channels_last=True)),
    ("+kernels", dict(kernels="all")),
    ("+ckpt_blocks", dict(checkpointing="blocks")),
    ("+ckpt_nets", dict(checkpointing="nets")),
    ("+ckpt_selective", dict(checkpointing="selective")),
]
PHASES = ("fake_score", "generator")


# ----------------------------------------------------------------------------------------------------------------
# The ledger.


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
        return None


class Ledger(TorchDispatchMode):
    """Live bytes of the storages created by ops run under it (see the module docstring), with their owners."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str, str]] = {}  # storage key -> (bytes, owner, op that allocated it)
        self.cur = self.peak = self.bwd_peak = 0
        self.bwd_start: int | None = None
        self.held_by: dict[str, int] = {}
        self.held_by_op: dict[str, int] = {}
        self.owner = ["loss"]

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, (0,))[0]
        self.cur -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and self.bwd_start is None:
            self.bwd_start = self.cur
            by, by_op = Counter(), Counter()
            for nbytes, owner, op in self.live.values():
                by[owner] += nbytes
                by_op[f"{owner}/{op}"] += nbytes
            self.held_by = dict(by)
            self.held_by_op = {k: v for k, v in by_op.items() if v}
        out = func(*args, **kwargs)
        inputs = {
            s._cdata
            for s in (_storage(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
            if s is not None
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = _storage(t)
            if s is None or s._cdata in inputs:
                continue
            key = s._cdata
            if key in self.live or s.nbytes() == 0:
                continue
            self.live[key] = (s.nbytes(), self.owner[-1], f"{func.__name__.split('.')[0]}:{str(t.dtype)[6:]}")
            self.cur += s.nbytes()
            weakref.finalize(s, self._free, key)
        self.peak = max(self.peak, self.cur)
        if in_backward:
            self.bwd_peak = max(self.bwd_peak, self.cur)
        return out


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops torch.utils.flop_counter has formulas for (convolutions, matmuls, attention, and the Triton
    attention ops registered in this module), summed. torch's FlopCounterMode gives the same totals (checked on
    CIFAR-10's reference, bf16 + kernels + selective and nets rungs and on a small SD UNet) but tracks modules with
    hooks that keep tensors alive into backward: under it the ledger counted SD 1.5's checkpointed generator phase at
    9.9 GiB instead of 3.5 (batch 2), and EDM's checkpointed rungs too high."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class SavedTensors:
    """saved_tensors_hooks that count the unique storages packed for backward (parameters excluded), by owner."""

    def __init__(self, ledger: Ledger, exclude: set[int]):
        self.ledger, self.exclude = ledger, exclude
        self.seen: set[int] = set()
        self.by: Counter = Counter()

    def pack(self, t: torch.Tensor):
        s = _storage(t)
        if s is not None and s._cdata not in self.exclude and s._cdata not in self.seen:
            self.seen.add(s._cdata)
            self.by[self.ledger.owner[-1]] += s.nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@contextlib.contextmanager
def owners(ledger: Ledger, nets: dict[str, torch.nn.Module]):
    """Storages allocated inside a network's forward (also when recomputed) belong to that network."""
    handles = []
    for name, net in nets.items():
        handles.append(net.register_forward_pre_hook(lambda m, a, name=name: ledger.owner.append(name)))
        handles.append(net.register_forward_hook(lambda m, a, o: ledger.owner.pop() and None))  # hooks return None
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# FLOPs of the Triton attention op (torch's counter knows the matmuls of the reference, not custom ops).


@register_flop_formula(torch.ops.sid_fast_kernels.edm_flash_attention)
def _attention_flops(qkv_shape, num_heads, blocked, *args, out_shape=None, **kwargs) -> int:
    n, c3, h, w = qkv_shape
    L, d = h * w, c3 // (3 * num_heads)
    return 4 * n * num_heads * L * L * d  # S = QK^T and O = PV


@register_flop_formula(torch.ops.sid_fast_kernels.edm_flash_attention_bwd)
def _attention_bwd_flops(
    do_shape, qkv_shape, o_shape, lse_shape, num_heads, blocked, *args, out_shape=None, **kwargs
) -> int:
    n, c3, h, w = qkv_shape
    L, d = h * w, c3 // (3 * num_heads)
    return 10 * n * num_heads * L * L * d  # S recomputed, dV, dP, dQ, dK: five L x L x d products


# ----------------------------------------------------------------------------------------------------------------
# Trainers on the meta device.


def make_trainer(
    config: str, batch_gpu: int, options: dict, device: str = "meta", rounds: int = 1, augment: bool = False
):
    """A trainer for `config` with random weights in the official shapes (values matter only off the meta device),
    `rounds` micro-batches of `batch_gpu` per phase, with the preset's augmentation if `augment` (it needs values:
    not on the meta device), else none. "digits": the bundled digits teacher (its weights)."""
    if config == "digits":
        teacher, info = load_network_file(DIGITS_TEACHER_PATH)
        cfg = resolve_config("digits", dict(batch=batch_gpu * rounds, batch_gpu=batch_gpu, metrics="none", **options))
        spec = TeacherSpec("EDMPrecond", info["init_kwargs"], teacher.state_dict())
        with torch.device(device):
            return build_trainer(
                cfg, torch.device(device), log=lambda *a: None, teacher=teacher.to(device), teacher_spec=spec
            )
    if config in EDM2_CONFIGS:
        stem, preset = EDM2_CONFIGS[config]
        class_name, kwargs = "Precond", dict(edm2_config(stem), use_fp16=False)
    else:
        stem, preset = CONFIGS[config]
        class_name, kwargs = "EDMPrecond", dict(official_config(stem), use_fp16=False)
    with torch.device(device):
        teacher = build_network(class_name, kwargs)
    cfg = resolve_config(
        preset,
        dict(
            teacher=f"<{stem}, random weights>",
            batch=batch_gpu * rounds,
            batch_gpu=batch_gpu,
            metrics="none",
            **({} if augment else dict(augment=0.0)),
            **options,
        ),
    )
    with torch.device(device):
        tr = build_trainer(
            cfg,
            torch.device(device),
            log=lambda *a: None,
            teacher=teacher,
            teacher_spec=TeacherSpec(class_name, kwargs, teacher.state_dict()),
        )
    return tr


@contextlib.contextmanager
def cuda_attention_on_meta():
    """F.scaled_dot_product_attention as CUDA runs it for SiD-LSG's shapes (no mask, no dropout): the flash kernel for
    fp16/bf16 inputs, the memory-efficient kernel for fp32 (PyTorch's dispatch order), so that the meta device holds
    what the GPU holds for backward (output and log-sum-exp) and the FLOP counter sees the fused ops."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused(*args, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        # q, k, v positional (diffusers' UNets, SD3) or as query=, key=, value= (diffusers' attention dispatch: FLUX)
        q, k, v = (*args, *(kw.pop(n) for n in ("query", "key", "value")[len(args) :]))
        if kw.get("enable_gqa") is False:
            kw.pop("enable_gqa")
        if q.device.type != "meta" or attn_mask is not None or dropout_p or kw:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if q.dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, 0.0, is_causal, scale=scale)[
            0
        ]

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def autocast_on_meta(dtype):
    """torch.autocast(dtype)'s casts, for meta tensors (which autocast does not reach): the inputs of convolutions,
    linear layers and attention cast to `dtype` (as autograd-visible casts, so backward keeps the low-precision copies
    as it does under autocast), group and layer norms run in fp32 (CUDA autocast's fp32 list). Other ops follow type
    promotion, as under autocast. Not modelled: autocast's weight-cast cache (each weight is used once per forward
    here, so it only matters when a checkpointed block is recomputed)."""
    F = torch.nn.functional
    saved = {name: getattr(F, name) for name in ("conv2d", "linear", "group_norm", "layer_norm")}

    def low(t):
        return (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype == torch.float32 else t
        )

    def high(t):
        return t.float() if isinstance(t, torch.Tensor) and t.device.type == "meta" and t.dtype != torch.float32 else t

    F.conv2d = lambda x, w, b=None, *a, **k: saved["conv2d"](low(x), low(w), low(b), *a, **k)
    F.linear = lambda x, w, b=None: saved["linear"](low(x), low(w), low(b))
    F.group_norm = lambda x, g, w=None, b=None, eps=1e-5: saved["group_norm"](high(x), g, high(w), high(b), eps)
    F.layer_norm = lambda x, s, w=None, b=None, eps=1e-5: saved["layer_norm"](high(x), s, high(w), high(b), eps)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def make_sd_trainer(
    config: str,
    batch_gpu: int,
    options: dict,
    device: str = "meta",
    rounds: int = 1,
    unet_config: dict | None = None,
    text_config: dict | None = None,
):
    """A SiD-LSG trainer with a public Stable Diffusion UNet configuration (random weights, or none on meta) and SD
    1.5's text encoder configuration (SDXL: its conditioning drawn in shape, see SD_CONFIGS); `unet_config` and
    `text_config` (CLIPTextConfig values) replace them (tests: small ones)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from sid_fast.t2i.configs import UNETS, build_unet
    from sid_fast.t2i.sd import Schedule, StableDiffusion

    if unet_config is None:
        unet = build_unet(config, device)
    else:
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config)
    schedule = Schedule(
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    )
    text = None
    if config == "sd15":  # CLIP ViT-L/14's text tower (SD 1.5's text_encoder/config.json)
        tc = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")  # fmt: skip
        tc = CLIPTextConfig(**dict(tc, **(text_config or {})))
        with torch.device(device):
            text = CLIPTextModel(tc).eval().requires_grad_(False)
    sd = StableDiffusion(unet, None, text, None, schedule, f"<{config}, random weights>")
    cfg = resolve_config(
        SD_CONFIGS[config],
        dict(teacher=f"<{config}, random weights>", data_prompt_text="<prompts>", batch=batch_gpu * rounds,
             batch_gpu=batch_gpu, resolution=(unet_config or UNETS[config])["sample_size"], **options),
    )  # fmt: skip
    family = (SDFamily if text is not None else SDXLShapes)(cfg, torch.device(device), sd, ["<prompt>"])
    return build_trainer(cfg, torch.device(device), family=family, log=lambda *a: None)


def make_flow_trainer(config: str, batch_gpu: int, options: dict, device: str = "meta", rounds: int = 1):
    """A trainer of the flow-matching family with a public SD3 transformer configuration and SD3's three text encoders
    (random weights, or none on meta; bf16 runs keep the encoders in bf16)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sid_fast.families.flow import FlowFamily
    from sid_fast.t2i.flux import Flux
    from sid_fast.t2i.sana import Sana
    from sid_fast.t2i.sd3 import SD3

    preset, tcfg = FLOW_CONFIGS[config]
    clip = dict(max_position_embeddings=77, vocab_size=49408)
    t5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")  # fmt: skip
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", **clip)  # fmt: skip
    flux, sana = config.startswith("flux"), config.startswith("sana")
    with torch.device(device):
        if sana:
            from diffusers import SanaTransformer2DModel
            from transformers import Gemma2Config, Gemma2Model

            net = SanaTransformer2DModel(**tcfg)
            encoders = [Gemma2Model(Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                                 head_dim=256, max_position_embeddings=8192))]  # fmt: skip
            encoders[0].to(torch.bfloat16)  # the official loop's Gemma precision, whatever the rung
        elif flux:
            net = FluxTransformer2DModel(**tcfg)
            encoders = [CLIPTextModel(CLIPTextConfig(**clip_l)), T5EncoderModel(T5Config(**t5))]
        else:
            net = SD3Transformer2DModel(**tcfg)
            encoders = [
                CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=768, **clip_l)),
                CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=20,
                                                           projection_dim=1280, hidden_act="gelu", **clip)),
                T5EncoderModel(T5Config(**t5)),
            ]  # fmt: skip
    if options.get("precision") == "bf16":
        encoders = [e.to(torch.bfloat16) for e in encoders]
    encoders = [e.eval().requires_grad_(False) for e in encoders]
    net = net.eval().requires_grad_(False)
    name = f"<{config}, random weights>"
    if sana:
        model = Sana(net, None, encoders, None, name, "", SANA_INSTRUCTED_TOKENS)
    else:
        model = Flux(net, None, encoders, None, name, 128) if flux else SD3(net, None, encoders, None, name)
    options = dict(dict(checkpointing="none"), **options)  # the presets' selective recomputation only in its rungs
    sida = config.endswith("-sida")
    text = dict(data="<pairs>") if sida else dict(data_prompt_text="<prompts>")
    cfg = resolve_config(
        preset,
        dict(teacher=f"<{config}, random weights>", batch=batch_gpu * rounds, batch_gpu=batch_gpu, **text, **options),
    )  # fmt: skip
    real = None
    if sida:  # latent/caption pairs in the teacher's latent shape (an AutoencoderKL's mean and std; SANA's latent)
        from sid_fast.t2i import pairs

        c, r = net.config.in_channels // (4 if flux else 1), cfg.resolution
        gaussian = not sana
        meta = dict(format=pairs.FORMAT, version=1, count=batch_gpu * rounds, latent_channels=c, scaling_factor=1.0,
                    shift_factor=0.0, posterior="gaussian" if gaussian else "deterministic", image_channels=3,
                    vae="AutoencoderKL" if gaussian else "AutoencoderDC", source="<zeros>")  # fmt: skip
        raw = np.zeros([batch_gpu * rounds, 2 * c if gaussian else c, r, r], np.float16)
        real = pairs.PairDataset(arrays=raw, captions=["<caption>"] * len(raw), meta=meta)
    family = FlowFamily(cfg, torch.device(device), model, ["<prompt>"] if real is None else real.captions,
                        real_data=real)  # fmt: skip
    tr = build_trainer(cfg, torch.device(device), family=family, log=lambda *a: None)
    if sida:  # past the warm-up: the generator phase runs with its GAN term (0.5 SiD + 0.5 GAN)
        tr.cur_nimg = (int(cfg.sida_gan_start_kimg * 1000) // cfg.batch + 1) * cfg.batch
    return tr


class SDXLShapes(SDFamily):
    """SiD-LSG's iteration on SDXL's UNet, its conditioning drawn in shape (the SDXL text encoders are not run)."""

    def encode_prompts(self, prompts):
        n, dev = len(prompts), self.device
        return dict(
            encoder_hidden_states=torch.zeros([n, 77, 2048], device=dev),
            text_embeds=torch.zeros([n, 1280], device=dev),
            time_ids=torch.zeros([n, 6], device=dev),
        )


def _storages_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = _storage(t)
        if s is not None and s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


def static_bytes(tr) -> dict:
    """Bytes alive between steps: networks' weights and buffers, gradients left from their phase, Adam states."""
    nets = dict(G=tr.G, G_ema=tr.G_ema, fake_score=tr.fake, teacher=tr.teacher)
    text = getattr(getattr(tr.family, "sd", None), "text_encoder", None)
    if text is not None:  # SiD-LSG: the text encoder stays on the device (the VAE does not)
        nets["text_encoder"] = text
    encoders = getattr(getattr(tr.family, "model", None), "text_encoders", None)
    if encoders:  # flow matching: SD3's three text encoders stay on the device
        nets["text_encoder"] = torch.nn.ModuleList(encoders)
    out = {f"weights_{k}": _storages_bytes([*v.parameters(), *v.buffers()]) for k, v in nets.items()}
    out["grads"] = _storages_bytes([p.grad for net in (tr.G, tr.fake) for p in net.parameters() if p.grad is not None])
    out["adam"] = _storages_bytes(
        [
            t
            for opt in (tr.opt_g, tr.opt_fake)
            for st in opt.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        ]
    )
    out["total"] = sum(out.values())
    return out


def measure_phase(tr, phase: str) -> dict:
    """One phase of a warm trainer under the ledger, the saved-tensor hooks and the FLOP count."""
    ledger = Ledger()
    exclude = {
        s._cdata
        for net in (tr.G, tr.fake, tr.teacher, tr.G_ema)
        for t in (*net.parameters(), *net.buffers())
        if (s := _storage(t)) is not None
    }
    saved = SavedTensors(ledger, exclude)
    run = tr.fake_score_phase if phase == "fake_score" else tr.generator_phase
    nets = dict(G=tr.G, teacher=tr.teacher, fake_score=tr.fake)
    flops = FlopCount()
    cuda = tr.device.type == "cuda"
    if cuda:  # the prediction's check: the caching allocator's own peak over the same phase
        torch.cuda.synchronize(tr.device)
        torch.cuda.reset_peak_memory_stats(tr.device)
        base = torch.cuda.memory_allocated(tr.device)
    gc.collect()
    gc.disable()  # storages in reference cycles die at the next collection, which must not depend on timing
    try:
        with ops.kernels(tr.kernels), owners(ledger, nets), flops, ledger, saved.hooks():
            run()
    finally:
        gc.enable()
    measured = torch.cuda.max_memory_allocated(tr.device) - base if cuda else None
    return dict(
        measured_peak=measured,
        held=ledger.bwd_start or 0,
        held_by=ledger.held_by,
        held_by_op=ledger.held_by_op,
        saved=sum(saved.by.values()),
        saved_by=dict(saved.by),
        bwd_peak=ledger.bwd_peak,
        peak=ledger.peak,
        flops=float(flops.total),
    )


def measure(config: str, rung: str, options: dict, batches: tuple[int, int], device: str = "meta") -> dict:
    per_batch = {}
    static = None
    sd = config in SD_CONFIGS or config in FLOW_CONFIGS
    for b in batches:
        with contextlib.ExitStack() as stack:
            if sd and device == "meta":
                stack.enter_context(cuda_attention_on_meta())
                if options.get("precision") == "bf16":
                    stack.enter_context(autocast_on_meta(torch.bfloat16))
            if config in FLOW_CONFIGS:
                tr = make_flow_trainer(config, b, options, device)
            elif sd:
                tr = make_sd_trainer(config, b, options, device)
            else:
                tr = make_trainer(config, b, options, device)
            tr.step()  # warm: gradients and Adam states exist, as in every step but the first
            static = static_bytes(tr)
            per_batch[b] = {ph: measure_phase(tr, ph) for ph in PHASES}
    b0, b1 = batches
    rec = dict(
        bench="memory", config=config, mode=rung, options=options, batches=list(batches), device=device, static=static
    )
    rec["g_ema_on_host"] = tr.cfg.ema == 0  # --ema 0: G_ema waits on the host (sid_fast.training.sid)
    for ph in PHASES:
        m0, m1 = per_batch[b0][ph], per_batch[b1][ph]
        d = {}
        for q in ("held", "saved", "bwd_peak", "peak"):
            slope = (m1[q] - m0[q]) / (b1 - b0)
            d[q] = dict(per_image=slope, intercept=m0[q] - slope * b0, at=[m0[q], m1[q]])
        for q in ("held_by", "held_by_op", "saved_by"):
            owners_ = set(m0[q]) | set(m1[q])
            d[q + "_per_image"] = {o: (m1[q].get(o, 0) - m0[q].get(o, 0)) / (b1 - b0) for o in sorted(owners_)}
        d["flops_per_image"] = (m1["flops"] - m0["flops"]) / (b1 - b0)
        d["peak_regime_warning"] = d["peak"]["per_image"] < 0.99 * d["held"]["per_image"]
        if m0["measured_peak"] is not None:  # CUDA: torch.cuda.max_memory_allocated over the phase, at both batches
            d["measured_peak_at"] = [m0["measured_peak"], m1["measured_peak"]]
            d["measured_vs_predicted_peak"] = [m["measured_peak"] / m["peak"] for m in (m0, m1)]
        rec[ph] = d
    return rec


def _host_bytes(rec: dict) -> float:
    """Static bytes that stay on the host: G_ema with the EMA off (--ema 0, sid_fast.training.sid)."""
    return rec["static"].get("weights_G_ema", 0) if rec.get("g_ema_on_host") else 0


def fit_batch(rec: dict, capacity_gib: float, headroom_gib: float) -> int:
    """Largest batch-gpu whose predicted peak (static + the larger phase peak) fits capacity - headroom."""
    budget = (capacity_gib - headroom_gib) * GiB - rec["static"]["total"] + _host_bytes(rec)
    best = 0
    for ph in PHASES:
        p = rec[ph]["peak"]
        n = int((budget - p["intercept"]) // p["per_image"]) if p["per_image"] > 0 else 0
        best = n if ph == PHASES[0] else min(best, n)
    return max(best, 0)


def fit_batch_fsdp(rec: dict, capacity_gib: float, headroom_gib: float, world: int) -> int:
    """fit_batch under --fsdp over `world` GPUs, derived from the same measurement: the teacher, G, the fake score and
    their Adam states are 1/world per GPU (G_ema and the text encoder stay whole; G_ema on the host with --ema 0),
    and the part of each phase's peak that does not grow with the batch (its intercept) is taken to be the trained
    network's gradient up to that gradient's size, which is 1/world too. (Gradients that appear chunk by chunk as
    backward reaches them are only partly alive at the peak: the intercept then bounds what sharding can take off
    it.) Not modelled: FSDP2's all-gather buffers of the block being run and the next one (for XXL about 0.7 GB at
    fp32), which the headroom has to cover."""
    st = rec["static"]
    sharded = st["weights_teacher"] + st["weights_G"] + st["weights_fake_score"] + st["adam"]
    static = st["total"] - st["grads"] - sharded * (1 - 1 / world) - _host_bytes(rec)  # the rest whole
    budget = (capacity_gib - headroom_gib) * GiB - static
    best = None
    for ph, trained in (("fake_score", "weights_fake_score"), ("generator", "weights_G")):
        p = rec[ph]["peak"]
        grad = min(st[trained], max(p["intercept"], 0.0))  # the gradient alive at the peak, at most all of it
        intercept = p["intercept"] - grad * (1 - 1 / world)  # -> one shard
        n = int((budget - intercept) // p["per_image"]) if p["per_image"] > 0 else 0
        best = n if best is None else min(best, n)
    return max(best, 0)


def add_derived(records: list[dict], headroom_gib: float) -> None:
    """Ratios to the reference rung of the same config, recompute FLOPs and the batch sizes that fit."""
    for rec in records:
        ref = next((r for r in records if r["config"] == rec["config"] and r["mode"] == "reference"), None)
        step_flops = rec["fake_score"]["flops_per_image"] + rec["generator"]["flops_per_image"]
        base = next((r for r in records if r["config"] == rec["config"] and r["mode"] == "+kernels"), None)
        rec["derived"] = dict(
            held_vs_reference={ph: rec[ph]["held"]["per_image"] / ref[ph]["held"]["per_image"] for ph in PHASES}
            if ref
            else None,
            saved_vs_reference={ph: rec[ph]["saved"]["per_image"] / ref[ph]["saved"]["per_image"] for ph in PHASES}
            if ref
            else None,
            recompute_flops_fraction=(
                (rec["generator"]["flops_per_image"] - base["generator"]["flops_per_image"])
                / (base["fake_score"]["flops_per_image"] + base["generator"]["flops_per_image"])
                if base and rec["options"].get("checkpointing", "none") != "none"
                else 0.0
            ),
            step_flops_per_image=step_flops,
            batch_gpu_fits={f"{cap}GB": fit_batch(rec, cap * 1e9 / GiB, headroom_gib) for cap in (80, 141)},
            batch_gpu_fits_fsdp={
                f"{cap}GB x{n}": fit_batch_fsdp(rec, cap * 1e9 / GiB, headroom_gib, n)
                for cap in (80, 141)
                for n in (2, 4, 8)
            },
            headroom_gib=headroom_gib,
        )


@command(__doc__)
@click.option("--configs", default=",".join(CONFIGS), show_default=True)
@click.option("--rungs", default=",".join(r for r, _ in RUNGS), show_default=True)
@click.option(
    "--batches", default="32,64", show_default=True, help="two batch-gpu sizes: slope per image and intercept"
)
@click.option("--headroom-gib", "headroom_gib", type=float, default=2.0, show_default=True)
@click.option(
    "--device",
    default="meta",
    show_default=True,
    type=click.Choice(["meta", "cuda", "cpu"]),
    help="meta: shapes only (seconds); cuda: also torch.cuda.max_memory_allocated per phase, to check "
    "the prediction; cpu: real arithmetic (slow)",
)
@click.option("--out", default="memory.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    configs = a.configs.split(",")
    names = [r for r, _ in RUNGS]
    wanted = a.rungs.split(",")
    for bad, known, flag in (
        (
            set(configs) - set(CONFIGS) - set(EDM2_CONFIGS) - set(SD_CONFIGS) - set(FLOW_CONFIGS),
            [*CONFIGS, *EDM2_CONFIGS, *SD_CONFIGS, *FLOW_CONFIGS],
            "--configs",
        ),
        (set(wanted) - set(names), names, "--rungs"),
    ):
        if bad:
            raise SystemExit(f"{flag}: unknown {sorted(bad)}; known: {known}.")
    batches = tuple(int(b) for b in a.batches.split(","))
    if len(batches) != 2 or batches[0] >= batches[1] or batches[0] < 1:
        raise SystemExit(f"--batches {a.batches}: give two increasing batch sizes, e.g. 2,4.")
    env = environment()
    records = []
    for config in configs:
        options = {}
        for rung, delta in RUNGS:
            options = {**options, **delta}
            if rung not in wanted:
                continue
            t0 = time.perf_counter()
            rec = measure(config, rung, dict(options), batches, a.device)
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            g = rec["generator"]
            print(
                f"{config:<10} {rung:<15} generator: held {g['held']['per_image'] / MiB:7.1f} MiB/img "
                f"(saved {g['saved']['per_image'] / MiB:7.1f}), bwd peak {g['bwd_peak']['per_image'] / MiB:7.1f} "
                f"MiB/img + {g['bwd_peak']['intercept'] / MiB:6.0f} MiB; fake score: held "
                f"{rec['fake_score']['held']['per_image'] / MiB:7.1f} MiB/img; static "
                f"{rec['static']['total'] / GiB:.2f} "
                f"GiB ({rec['wall_s']:.0f} s)",
                flush=True,
            )
            for ph in PHASES:
                if rec[ph]["peak_regime_warning"]:
                    print(f"{'':<27}warning: the {ph} phase's peak grows slower than its held bytes between batches "
                          f"{a.batches}: a per-batch constant sets it there; measure at larger --batches.")  # fmt: skip
            if "measured_vs_predicted_peak" in g:
                print(
                    f"{'':<27}generator peak: torch.cuda.max_memory_allocated / predicted = "
                    f"{', '.join(f'{x:.3f}' for x in g['measured_vs_predicted_peak'])} at batch {a.batches}"
                )
    add_derived(records, a.headroom_gib)
    for r in records:
        r.update(env)
    print(f"-> {write_jsonl(records, a.out)}")


if __name__ == "__main__":
    main()
