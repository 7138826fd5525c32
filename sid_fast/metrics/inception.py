"""The Inception-v3 detector behind FID and IS, loaded from one of two files (EDM fid.py, StyleGAN2-ADA metrics).

- NVIDIA's TorchScript detector `inception-2015-12-05.pt` (the file SiD's and StyleGAN2-ADA's metrics use), loaded
  with `torch.jit.load` and called as `detector(images_uint8_NCHW, return_features=True)` for the 2048-d pool
  features, or with `no_output_bias=True` for the class probabilities of the Inception Score. It resizes to 299
  internally.
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a plain state dict, loaded into `FIDInceptionV3` below: the
  torchvision Inception-v3 layout with the TF-compatible blocks (average pools that exclude padding, a max pool in
  the last block), 1008 classes. Inputs are resized to 299 bilinearly and mapped to [-1, 1] as pytorch-fid does.
  Its features are close to, not bit-identical with, NVIDIA's; report which detector a number came from.

StyleGAN3's `inception-2015-12-05.pkl` is an ordinary pickle that runs code when loaded; it is refused with a
pointer to the `.pt` file. Nothing is downloaded unless the user passes a URL.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from sid_fast.checkpoints import CheckpointError, cache_dir, resolve_path

NVIDIA_DETECTOR_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURE_DIM = 2048  # Inception's pool features; the loaded detector's own size is Detector.feature_dim


class DetectorError(ValueError):
    """A detector file that is missing or of the wrong kind; the message names the file."""


def default_detector_path() -> Path:
    """Where the detector is looked for when --detector is not given: $SID_FAST_DETECTOR or the cache."""
    return Path(os.environ.get("SID_FAST_DETECTOR", cache_dir() / "inception-2015-12-05.pt"))


# ----------------------------------------------------------------------------------------------------------------
# pytorch-fid's network, written from the torchvision Inception-v3 layout (parameter names match its state dict).


class BasicConv2d(torch.nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's average pool does not count the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(torch.nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(torch.nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for i in range(1, 6):
            c = getattr(self, f"branch7x7dbl_{i}")(c)
        d = self.branch_pool(_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(torch.nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block (Mixed_7c) pools with max in the TF graph
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInceptionV3(torch.nn.Module):
    """Inception-v3 as pytorch-fid builds it for the TF FID weights; input uint8 NCHW, output pool features."""

    def __init__(self, num_classes=1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = torch.nn.Linear(2048, num_classes)

    def pool_features(self, img):
        x = img.float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean([2, 3])

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        """The TorchScript detector's call signature: features, or class probabilities (softmax)."""
        f = self.pool_features(img)
        if return_features:
            return f
        logits = F.linear(f, self.fc.weight, None if no_output_bias else self.fc.bias)
        return F.softmax(logits, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Loading.


def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "state_dict"
        return "unknown"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


class Detector(torch.nn.Module):
    """A loaded detector: `features(uint8 NCHW)` -> float64 [N, 2048], `probabilities(uint8 NCHW)` -> [N, classes]."""

    def __init__(self, net, kind: str, source: str, device="cpu"):
        super().__init__()
        self.net, self.kind, self.source = net, kind, source
        # The feature size, from one probe image (2048 for both Inception files; test-made detectors may differ).
        try:
            with torch.no_grad():
                f = self.net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device), return_features=True)
        except Exception as e:
            raise DetectorError(
                f"{source}: the detector cannot be called as detector(images, return_features=True) "
                f"({type(e).__name__}: {e})."
            ) from None
        if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != 1:
            raise DetectorError(
                f"{source}: the detector returned {type(f).__name__} {list(getattr(f, 'shape', []))}, expected "
                f"features [N, D]."
            )
        self.feature_dim = int(f.shape[1])

    @staticmethod
    def _rgb(images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"The detector takes uint8 images [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}."
            )
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grey repeated to RGB, as EDM

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.net(self._rgb(images), return_features=True)
        if f.ndim != 2 or f.shape != (images.shape[0], self.feature_dim):
            raise DetectorError(
                f"{self.source}: the detector returned features of shape {list(f.shape)}, expected "
                f"[{images.shape[0]}, {self.feature_dim}]."
            )
        return f.double()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        # StyleGAN2-ADA's Inception Score calls the detector with no_output_bias=True.
        return self.net(self._rgb(images), no_output_bias=True).double()


def load_detector(path_or_url=None, device="cpu") -> Detector:
    """Load NVIDIA's TorchScript detector or pytorch-fid's weights from a path (or a URL, downloaded to the cache)."""
    if path_or_url is None:
        path_or_url = default_detector_path()
        if not Path(path_or_url).exists():
            raise DetectorError(
                f"No Inception detector at {path_or_url}. Download {NVIDIA_DETECTOR_URL} and put it there (or set "
                f"SID_FAST_DETECTOR, or pass --detector PATH or --detector URL to download it)."
            )
    try:
        path = resolve_path(path_or_url)
    except CheckpointError as e:
        msg = str(e)
        if "download failed" in msg:
            msg += f" The file can live anywhere; {default_detector_path()} is used when no --detector is given."
        raise DetectorError(msg) from None
    kind = _kind(path)
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                net = torch.jit.load(str(path), map_location=device)
            except RuntimeError as e:
                raise DetectorError(
                    f"{path}: not a loadable TorchScript detector ({str(e).splitlines()[0]})."
                ) from None
        return Detector(net.eval(), "torchscript", str(path), device)
    if kind == "state_dict":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise DetectorError(
                f"{path}: a torch.save file but not pytorch-fid's Inception weights (no "
                f"'Mixed_7c.branch_pool.conv.weight'); "
                f"expected {NVIDIA_DETECTOR_URL} or {PYTORCH_FID_URL}."
            )
        net = FIDInceptionV3(num_classes=state["fc.weight"].shape[0] if "fc.weight" in state else 1008)
        own = net.state_dict()
        for k in own:  # older BatchNorm files carry no batch counter
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = own[k]
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise DetectorError(
                f"{path}: pytorch-fid weights that do not fit Inception-v3 ({str(e).splitlines()[0]})."
            ) from None
        return Detector(net.to(device).eval(), "pytorch-fid", str(path), device)
    if kind == "pickle":
        raise DetectorError(
            f"{path}: a Python pickle (StyleGAN3's inception-2015-12-05.pkl runs code when unpickled, so it is "
            f"not loaded); "
            f"use the TorchScript file {NVIDIA_DETECTOR_URL} instead."
        )
    raise DetectorError(
        f"{path}: not an Inception detector (neither a TorchScript archive nor pytorch-fid weights); "
        f"expected {NVIDIA_DETECTOR_URL} or {PYTORCH_FID_URL}."
    )
