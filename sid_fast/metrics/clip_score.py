"""CLIP score of text-to-image samples as SiD-LSG reports it (official metrics/clip_score.py and networks/clip.py:
OpenCLIP ViT-g-14, pretrained laion2b_s12b_b42k): the mean over (image, prompt) pairs of the cosine similarity of the
image and text embeddings.

    python -m sid_fast.metrics.clip_score --images coco30k --prompts captions.txt --clip CLIP-ViT-g-14-laion2B-s12B-b42K

The model is read with transformers' CLIPModel from a local folder in Hugging Face's format (laion publishes ViT-g-14
laion2B-s12B-b42K so, beside its OpenCLIP file): `open_clip` itself is not used because its torchvision dependency
replaces the pinned torch. The official pipeline, reproduced: images as uint8 / 255, resized to the model's input side
(224) with F.interpolate(bicubic, align_corners=False) on the whole image (no crop, no antialias), normalised with
OpenAI CLIP's mean and std; texts tokenized to 77 tokens (truncated); both embeddings L2-normalised; the score is the
mean of their dot products (0.30 - 0.32 for SiD-LSG's generators; not multiplied by 100). Image i goes with prompt line
i (the sampling CLI's numbering); under torchrun each rank embeds every world-th pair and the sums are all-reduced.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from sid_fast import dist
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.hf import load_transformers_model

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPScoreError(ValueError):
    """A user-facing problem with the CLIP folder, the images or the prompts (one sentence)."""


class CLIPScorer:
    """A CLIP model (transformers' CLIPModel and its tokenizer) with the official preprocessing."""

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model.to(device).eval().requires_grad_(False), tokenizer, device
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD, device=device).reshape(1, 3, 1, 1)

    @classmethod
    def load(cls, folder, device="cpu") -> CLIPScorer:
        p = Path(folder)
        if not (p / "config.json").is_file():
            raise CLIPScoreError(f"{p}: not a CLIP model folder in Hugging Face's format (no config.json).")
        try:
            from transformers import CLIPModel, CLIPTokenizer

            model = load_transformers_model(CLIPModel, p)
            tokenizer = CLIPTokenizer.from_pretrained(str(p))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CLIPScoreError(f"{p}: the CLIP model does not load ({type(e).__name__}: {reason}).") from None
        return cls(model, tokenizer, device)

    @torch.no_grad()
    def image_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """[N, D] unit vectors of uint8 images [N, 3, H, W]."""
        x = images_uint8.to(self.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        dtype = next(self.model.parameters()).dtype
        pooled = self.model.vision_model(pixel_values=x.to(dtype)).pooler_output  # CLS token after post-LayerNorm
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit vectors of texts (77 tokens, truncated)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = self.model.text_model(input_ids=ids.input_ids.to(self.device)).pooler_output  # at the end token
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def pair_scores(self, images_uint8: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """[N] cosine similarities of image i and text i."""
        return (self.image_features(images_uint8) * self.text_features(texts)).sum(-1)


def read_image(path) -> torch.Tensor:
    img = np.asarray(PIL.Image.open(path).convert("RGB"))
    return torch.from_numpy(img.copy()).permute(2, 0, 1)


def clip_score(scorer: CLIPScorer, images_dir, prompts, indices, batch: int = 64, rank: int = 0, world: int = 1):
    """(mean score, count) over the pairs (images_dir/<i, 6 digits>.png, prompts[i]) for i in indices; this rank
    embeds every world-th pair, and the sum and count are all-reduced when world > 1."""
    mine = list(indices)[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=scorer.device)
    for k in range(0, len(mine), batch):
        part = mine[k : k + batch]
        missing = [i for i in part if not (Path(images_dir) / f"{i:06d}.png").is_file()]
        if missing:
            raise CLIPScoreError(f"{images_dir}: no image {missing[0]:06d}.png for prompt line {missing[0]}.")
        images = torch.stack([read_image(Path(images_dir) / f"{i:06d}.png") for i in part])
        s = scorer.pair_scores(images, [prompts[i] for i in part])
        total += torch.stack([s.double().sum(), torch.tensor(float(len(part)), dtype=torch.float64, device=s.device)])
    if world > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1]), int(total[1])


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--images", "images_dir", help="Folder of NNNNNN.png images (image i for prompt line i)", required=True)
@click.option("--prompts", "prompts_file", help="Prompt file, one per line", metavar="FILE", required=True)
@click.option("--clip", "clip_dir", help="CLIP model folder in Hugging Face's format", metavar="DIR", required=True)
@click.option("--num", "num", help="Pairs to score: lines 0..num-1 (default: every line)", type=click.IntRange(min=1))
@click.option("--batch", help="Images per CLIP call per GPU", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--json", "json_path", help="Append the result as a JSON line to this file", metavar="FILE")
def main(images_dir, prompts_file, clip_dir, num, batch, json_path):
    """CLIP score of text-to-image samples (SiD-LSG's metric)."""
    try:
        prompts = read_prompts(prompts_file)
    except PromptError as e:
        raise click.BadParameter(str(e), param_hint="--prompts") from None
    n = len(prompts) if num is None else num
    if n > len(prompts):
        raise click.BadParameter(f"{n} pairs, but {prompts_file} holds {len(prompts)} prompts.", param_hint="--num")
    device = dist.init()
    try:
        scorer = CLIPScorer.load(clip_dir, device)
        score, count = clip_score(scorer, images_dir, prompts, range(n), batch, dist.rank(), dist.world_size())
    except CLIPScoreError as e:
        raise click.ClickException(str(e)) from None
    if dist.rank() == 0:
        click.echo(f"CLIP score {score:.4f} over {count} image-prompt pairs ({Path(clip_dir).name})")
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(dict(metric="clip_score", value=score, num=count, images=str(images_dir))) + "\n")
    dist.finish()


if __name__ == "__main__":
    main()
