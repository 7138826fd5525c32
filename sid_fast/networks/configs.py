"""Constructor kwargs of the official EDM checkpoints (EDM train.py and README.md).

Each entry is what `ema._init_kwargs` records in the corresponding `edm-*.pkl`; all of them are EDMPrecond.
The safe loader reads the kwargs from the file itself; these entries serve presets, tests and benchmarks.
"""

from __future__ import annotations

import copy

_DDPMPP = dict(
    model_type="SongUNet",
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    augment_dim=9,
    dropout=0.13,
    use_fp16=False,
)
_NCSNPP = dict(
    _DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]
)
_ADM = dict(
    model_type="DhariwalUNet",
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    dropout=0.10,
    use_fp16=True,
)

OFFICIAL_CONFIGS: dict[str, dict] = {
    "edm-cifar10-32x32-cond-vp": dict(_DDPMPP, img_resolution=32, img_channels=3, label_dim=10),
    "edm-cifar10-32x32-uncond-vp": dict(_DDPMPP, img_resolution=32, img_channels=3, label_dim=0),
    "edm-cifar10-32x32-cond-ve": dict(_NCSNPP, img_resolution=32, img_channels=3, label_dim=10),
    "edm-cifar10-32x32-uncond-ve": dict(_NCSNPP, img_resolution=32, img_channels=3, label_dim=0),
    "edm-ffhq-64x64-uncond-vp": dict(
        _DDPMPP, img_resolution=64, img_channels=3, label_dim=0, channel_mult=[1, 2, 2, 2], dropout=0.05
    ),
    "edm-afhqv2-64x64-uncond-vp": dict(
        _DDPMPP, img_resolution=64, img_channels=3, label_dim=0, channel_mult=[1, 2, 2, 2], dropout=0.25
    ),
    "edm-imagenet-64x64-cond-adm": dict(_ADM, img_resolution=64, img_channels=3, label_dim=1000),
}


def official_config(name: str) -> dict:
    """A fresh copy of the init kwargs of an official checkpoint, by its file stem."""
    stem = name[:-4] if name.endswith(".pkl") else name
    if stem not in OFFICIAL_CONFIGS:
        raise ValueError(f"Unknown official EDM configuration {name!r}; known: {sorted(OFFICIAL_CONFIGS)}.")
    return copy.deepcopy(OFFICIAL_CONFIGS[stem])
