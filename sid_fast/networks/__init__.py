"""Networks written for sid_fast: EDM's layers, SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM) and
preconditioners; EDM2's magnitude-preserving UNet and Precond (`sid_fast.networks.edm2`)."""

from sid_fast.networks import edm2
from sid_fast.networks.configs import OFFICIAL_CONFIGS, official_config
from sid_fast.networks.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from sid_fast.networks.precond import PRECOND_TYPES, EDMPrecond, VEPrecond, VPPrecond, build_network
from sid_fast.networks.unets import DhariwalUNet, SongUNet

__all__ = [
    "edm2",
    "OFFICIAL_CONFIGS",
    "official_config",
    "Conv2d",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "UNetBlock",
    "PRECOND_TYPES",
    "EDMPrecond",
    "VEPrecond",
    "VPPrecond",
    "build_network",
    "DhariwalUNet",
    "SongUNet",
]
