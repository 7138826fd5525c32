"""How sid_fast loads Hugging Face (transformers) models: as plain torch modules, from local files.

transformers >= 5.25 "kernelizes" a model in `from_pretrained` by default when Hugging Face's `kernels` package is
installed (`use_kernels=None` means on): on CUDA it swaps layers such as activations and RMSNorm for kernels fetched
from the Hub at load time. sid_fast keeps every frozen text encoder, CLIP scorer and feature network as the
checkpoint's plain torch code: the numerics then match the official code, and loading never reaches for the network.
`use_kernels` exists since transformers 4.53 (the lower bound in pyproject.toml).

Also what kind of diffusers folder a path is (`pipeline_class`), which the teacher loaders read before loading.
"""

from __future__ import annotations

import json
from pathlib import Path

# Passed to every transformers `from_pretrained` call that sid_fast makes.
PLAIN_TORCH = {"use_kernels": False}


def load_transformers_model(cls, path, **kwargs):
    """`cls.from_pretrained(path, **kwargs)` with hub kernels off (a transformers PreTrainedModel class)."""
    return cls.from_pretrained(str(path), **PLAIN_TORCH, **kwargs)


def pipeline_class(path) -> str:
    """The `_class_name` of a diffusers folder's model_index.json ("StableDiffusion3Pipeline", "SanaPipeline", ...); ""
    when `path` is None or has no readable model_index.json."""
    if path is None:
        return ""
    index = Path(str(path)) / "model_index.json"
    try:
        return str(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else ""
    except (OSError, ValueError, AttributeError):
        return ""
