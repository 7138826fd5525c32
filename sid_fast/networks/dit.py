"""The fast path's hold on diffusers' DiT transformers (SD3/SD3.5, FLUX): their adaLN modules' modulation through
sid_fast.ops.ada_layer_norm, so that `--kernels ada_norm` runs it as one fused Triton kernel.

diffusers' AdaLayerNormZero (SD3 and FLUX double blocks), AdaLayerNormZeroSingle (FLUX single blocks) and
AdaLayerNormContinuous (the final norm_out) compute emb = linear(silu(c)), split it, and return
norm(x) * (1 + scale[:, None]) + shift[:, None] with a LayerNorm without affine parameters. `fuse_adaln` gives each
such module of a network a forward that does the same with the modulation through the op (the reference, outside the
kernel's scope, is that expression itself). Modules whose norm is anything else (FP32LayerNorm, an affine LayerNorm,
RMSNorm) keep diffusers' forward. Not reached: the inline modulation of the blocks' second norms (norm2 and
norm2_context of SD3's JointTransformerBlock, FLUX's FluxTransformerBlock), written in the block's own forward,
SD3.5-Medium's SD35AdaLayerNormZeroX (two modulations of one norm, in its first 13 blocks), and SANA's scale-shift
tables (their LayerNorm's output is modulated inside SanaTransformerBlock.forward).
"""

from __future__ import annotations

import types

import torch

from sid_fast import ops

ADALN_CLASSES = ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous")


def _plain_layer_norm(norm) -> bool:
    return type(norm) is torch.nn.LayerNorm and norm.weight is None and norm.bias is None


def _zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return ops.ada_layer_norm(x, scale_msa, shift_msa, self.norm.eps), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _zero_single(self, x, emb=None):
    shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
    return ops.ada_layer_norm(x, scale_msa, shift_msa, self.norm.eps), gate_msa


def _continuous(self, x, conditioning_embedding):
    scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
    return ops.ada_layer_norm(x, scale, shift, self.norm.eps)


_FORWARDS = dict(zip(ADALN_CLASSES, (_zero, _zero_single, _continuous)))


def fuse_adaln(net: torch.nn.Module) -> int:
    """Give every adaLN module of `net` (diffusers' classes above, LayerNorm without affine parameters) the forward
    through sid_fast.ops.ada_layer_norm; returns how many modules it changed."""
    count = 0
    for m in net.modules():
        forward = _FORWARDS.get(type(m).__name__)
        if forward is not None and _plain_layer_norm(getattr(m, "norm", None)):
            m.forward = types.MethodType(forward, m)
            count += 1
    return count
