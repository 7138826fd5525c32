"""FD-DINOv2 as EDM2 computes it (edm2 calculate_metrics.py, after Stein et al.'s dgm-eval): the Frechet distance
between Gaussian fits of DINOv2 ViT-L/14 features of generated and reference images.

EDM2's recipe, followed here:
- features: the final-LayerNorm CLS token (1024-d) of `dinov2_vitl14` (torch.hub facebookresearch/dinov2: ViT-L/14,
  trained at 518 px, LayerScale 1.0, MLP FFN, no registers, positional embedding resized bicubically with the
  historical +0.1 offset and no antialiasing);
- preprocessing (EDM2's default "torch" resize mode): uint8 RGB [N, 3, H, W] as float, resized to 224 x 224 by
  `F.interpolate(mode="bicubic", antialias=True)`, divided by 255, normalised by ImageNet's mean (0.485, 0.456, 0.406)
  and std (0.229, 0.224, 0.225); grey images are repeated to RGB;
- statistics: float64 mean and unbiased covariance, all-reduced over ranks; the distance
  ||mu - mu_r||^2 + tr(S + S_r - 2 sqrtm(S S_r)) with scipy's sqrtm, real part (sid_fast.metrics.frechet_distance);
- references: EDM2's pickles hold {'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}} (dataset-refs/img512.pkl);
  `python -m sid_fast.fid ref --metric fd_dinov2` writes npz files of the same statistics.

The network is sid_fast's own ViT (`DinoVisionTransformer`), whose parameter names are those of Meta's checkpoint
`dinov2_vitl14_pretrain.pth` (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth), read
with torch.load(weights_only=True) or from a safetensors file: no torch.hub, no code from the network's repository,
no download unless a URL is given. The architecture (width, depth, patch, MLP width, position grid) is read from the
tensors' shapes, heads = width / 64 as in every DINOv2 model, so test-made small DINOv2s load the same way.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sid_fast.checkpoints import CheckpointError, cache_dir, load_torch_file, resolve_path
from sid_fast.metrics.inception import DetectorError

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION = 224  # EDM2 resizes every image to 224 x 224 before DINOv2
HEAD_DIM = 64


def default_dinov2_path() -> Path:
    """$SID_FAST_DINOV2, or dinov2_vitl14_pretrain.pth in sid_fast's cache."""
    return Path(os.environ.get("SID_FAST_DINOV2", cache_dir() / "dinov2_vitl14_pretrain.pth"))


class _Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        w = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        y = w.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class _LayerScale(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Mlp(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(torch.nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(torch.nn.Module):
    """DINOv2's ViT at inference (no masking, no registers, no stochastic depth): forward -> the normalised CLS token.
    ViT-L/14: dim 1024, depth 24, 16 heads, MLP 4096, trained at 518 px (a 37 x 37 position grid)."""

    def __init__(self, dim=1024, depth=24, patch=14, hidden=4096, grid=37, interpolate_offset=0.1):
        super().__init__()
        self.patch, self.grid, self.offset = patch, grid, interpolate_offset
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = torch.nn.Parameter(torch.zeros(1, dim))  # in the checkpoint; unused at inference
        self.blocks = torch.nn.ModuleList(_Block(dim, dim // HEAD_DIM, hidden) for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The learned grid x grid embedding resized to the (h / patch) x (w / patch) patches of the input, as
        DINOv2 does: bicubic, no antialiasing, by the scale factor ((h / patch) + 0.1) / grid (the +0.1 makes the
        output size come out right despite rounding), in fp32."""
        rows, cols = h // self.patch, w // self.patch
        pos = self.pos_embed.float()
        if rows == cols == self.grid:
            return pos
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        scale = ((rows + self.offset) / self.grid, (cols + self.offset) / self.grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if grid.shape[-2:] != (rows, cols):
            raise ValueError(f"position grid resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1)
        t = t + self.position_embedding(h, w).to(t.dtype)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)[:, 0]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1 or 3, H, W] -> the float32 [N, 3, 224, 224] DINOv2 sees (EDM2's "torch" resize mode)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"DINOv2 takes uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}.")
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    x = F.interpolate(x.float(), size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
    x = x / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


class DINOv2Detector(torch.nn.Module):
    """`features(uint8 NCHW)` -> float64 [N, D], as sid_fast's Inception Detector (sid_fast.metrics.fid uses either)."""

    kind = "dinov2"

    def __init__(self, net: DinoVisionTransformer, source: str):
        super().__init__()
        self.net, self.source = net.eval().requires_grad_(False), source
        self.feature_dim = net.norm.normalized_shape[0]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(preprocess(images)).double()


def architecture(state: dict, path) -> dict:
    """DinoVisionTransformer kwargs from a DINOv2 state dict's shapes; a file that is not one is refused."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight")
    missing = [k for k in need if k not in state]
    if missing:
        chunked = "blocks.0.0.norm1.weight" in state
        hint = " (a block-chunked training checkpoint? use the hub's *_pretrain.pth)" if chunked else ""
        raise DetectorError(f"{path}: not a DINOv2 ViT state dict: no {missing[0]}{hint}.")
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if dim % HEAD_DIM or grid * grid != state["pos_embed"].shape[1] - 1:
        positions = state["pos_embed"].shape[1] - 1
        raise DetectorError(f"{path}: a ViT of width {dim} with {positions} positions is not DINOv2's.")
    return dict(
        dim=dim,
        depth=depth,
        patch=state["patch_embed.proj.weight"].shape[-1],
        hidden=state["blocks.0.mlp.fc1.weight"].shape[0],
        grid=grid,
    )


def load_dinov2(path_or_url=None, device="cpu") -> DINOv2Detector:
    """DINOv2 from Meta's `dinov2_vitl14_pretrain.pth` (or a safetensors copy, or a smaller DINOv2 of the same
    layout) at a path or URL; default $SID_FAST_DINOV2 or the cache. Every fault is one DetectorError sentence."""
    if path_or_url is None:
        path_or_url = default_dinov2_path()
        if not Path(path_or_url).exists():
            raise DetectorError(
                f"No DINOv2 at {path_or_url}. Download {DINOV2_URL} and put it there (or set SID_FAST_DINOV2, or "
                "pass --dinov2 PATH or --dinov2 URL to download it)."
            )
    try:
        path = resolve_path(path_or_url)
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = load_torch_file(path)
    except CheckpointError as e:
        raise DetectorError(str(e)) from None
    except Exception as e:  # safetensors' errors
        raise DetectorError(f"{path_or_url}: not a readable DINOv2 file ({type(e).__name__}: {e}).") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DetectorError(f"{path}: not a DINOv2 state dict (expected a dict of tensors).")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # hub classifiers' linear heads
    net = DinoVisionTransformer(**architecture(state, path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DetectorError(f"{path}: tensors that do not fit DINOv2 ({str(e).splitlines()[0]}).") from None
    return DINOv2Detector(net.to(device), str(path))
