"""EDM's preconditioning wrappers (EDM training/networks.py): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

All wrappers hold the UNet as `.model`, so their state_dict keys are `model.<...>` as in EDM's pickles.
`use_fp16` runs the UNet body in float16 on CUDA exactly as EDM does (fp32 master weights cast per layer, fp32
mapping MLP and preconditioning). `compute_dtype` is sid_fast's addition for the fast path (e.g. bfloat16); it is
not part of the checkpoint and defaults to EDM's behaviour.
"""

from __future__ import annotations

import numpy as np
import torch

from sid_fast.networks import edm2
from sid_fast.networks.common import prepare_inputs
from sid_fast.networks.unets import DhariwalUNet, SongUNet

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _build_model(model_type: str, **kwargs) -> torch.nn.Module:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"Unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}.")
    return MODEL_TYPES[model_type](**kwargs)


class _Precond(torch.nn.Module):
    """Shared input handling of EDM's four wrappers."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.compute_dtype: torch.dtype | None = None  # sid_fast: override the UNet body's dtype (fast path).
        self.model = _build_model(
            model_type,
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    def _prepare(self, x, sigma, class_labels, force_fp32):
        return prepare_inputs(self, x, sigma, class_labels, force_fp32)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for sigma [N, 1, 1, 1]."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_flag="decoder", **model_kwargs):
        """D(x, sigma); SiDA's calls (official sida branch): return_flag "encoder" gives only the discriminator logits
        [N, 1, h, w] in fp32 (the decoder is not run), "encoder_decoder" gives (D(x, sigma), logits) from one
        forward."""
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        if return_flag != "decoder":
            model_kwargs["return_flag"] = return_flag
        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if return_flag == "encoder":
            return out.to(torch.float32)
        if return_flag == "encoder_decoder":
            F_x, logits = out
            return c_skip * x + c_out * F_x.to(torch.float32), logits.to(torch.float32)
        return c_skip * x + c_out * out.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        sigma_min=0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        model_type="DhariwalUNet",
        **model_kwargs,
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        beta_d=19.9,
        beta_min=0.1,
        M=1000,
        epsilon_t=1e-5,
        model_type="SongUNet",
        **model_kwargs,
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device("cpu"):  # Python constants, also when the network is built under another device context
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim=0,
        use_fp16=False,
        sigma_min=0.02,
        sigma_max=100,
        model_type="SongUNet",
        **model_kwargs,
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


PRECOND_TYPES = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "Precond": edm2.Precond}

# Class names in the official SiDA pickles (sida branch: sida_training/sida_networks.py and
# sida_training_edm2/sida_networks_edm2.py) -> ours. Their modules hold the same parameters under the same names; the
# extra init kwargs are how upstream switched the discriminator and forced weight normalisation, which sid_fast does
# at call time (return_flag) and once per optimizer step (edm2.force_weight_norm_).
FILE_CLASS_ALIASES = {
    "EDMPrecond_EncoderDecoder": "EDMPrecond",
    "SongUNet_EncoderDecoder": "SongUNet",
    "DhariwalUNet_EncoderDecoder": "DhariwalUNet",
    "EDM_2_Precond_EncoderDecoder": "Precond",
    "EDM_2_Precond_Generator": "Precond",
    "UNet_EncoderDecoder": "UNet",
}


def official_kwargs(class_name: str, kwargs: dict) -> tuple[str, dict]:
    """(our class name, our init kwargs) for a class name and kwargs recorded in an official pickle."""
    if class_name not in FILE_CLASS_ALIASES:
        return class_name, kwargs
    kwargs = dict(kwargs)
    if class_name.startswith("EDM_2_"):
        kwargs.pop("force_normalization", None)
        kwargs.pop("use_gan", None)
        if class_name == "EDM_2_Precond_Generator":
            kwargs["logvar_channels"] = 0  # the generator class has no log-variance head
    elif isinstance(kwargs.get("model_type"), str):
        kwargs["model_type"] = FILE_CLASS_ALIASES.get(kwargs["model_type"], kwargs["model_type"])
    return FILE_CLASS_ALIASES[class_name], kwargs


def build_network(class_name: str, init_kwargs: dict) -> torch.nn.Module:
    """Build a preconditioned network (EDM's wrappers or EDM2's Precond) from its class name and init kwargs; the
    class names of the official SiDA pickles are accepted too (FILE_CLASS_ALIASES)."""
    class_name, init_kwargs = official_kwargs(class_name, init_kwargs)
    if class_name not in PRECOND_TYPES:
        raise ValueError(f"Unknown network class {class_name!r}; sid_fast builds {sorted(PRECOND_TYPES)}.")
    kwargs = {k: _plain(v) for k, v in init_kwargs.items()}
    try:
        return PRECOND_TYPES[class_name](**kwargs)
    except TypeError as e:
        raise ValueError(f"Cannot build {class_name} from init kwargs {sorted(kwargs)}: {e}") from None


def _plain(v):
    """Convert numpy scalars/arrays and tuples from a pickle's kwargs into plain Python values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
