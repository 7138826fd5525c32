"""Zero-shot COCO-2014 evaluation of text-to-image samples, by protocol.

    python -m sid_fast.t2i.evaluate --protocol gigagan-coco256 --images coco30k --captions captions.txt \
        --ref val2014 --detector inception-2015-12-05.pt --clip CLIP-ViT-g-14-laion2B-s12B-b42K
    # From a generator: its 30,000 images made first (t2i.sample's: caption i with seed i), over the ranks.
    torchrun --standalone --nproc_per_node=8 -m sid_fast.t2i.evaluate --network runs/.../network-snapshot-... \
        --teacher stable-diffusion-v1-5 --images coco30k --captions captions.txt --ref val2014 --detector ... --clip ...

`gigagan-coco256` is how SiD-LSG's published FID-30k and CLIP score were computed: its `evaluate_SiD_t2i_coco256.sh`
runs GigaGAN's evaluation/evaluation.py (how_many 30000, ref_data coco2014, ref_type val2014, eval_res 256) on the
30,000 images of generate_onestep.py (image i for line i of GigaGAN's COCO-2014 `captions.txt`, seed i). What that
code does, step by step (file and function of GigaGAN's evaluation/), and what sid_fast runs:

- Images (`data_util.py` EvalDataset, `CenterCropLongEdge`): RGB, centre-cropped to a square of the short side
  (torchvision's `center_crop` on a PIL image: offsets int(round((size - short) / 2)), Python's rounding), resized to
  256 with PIL's LANCZOS (`evaluation.py` compute_fid's `resize_and_center_crop`; `transforms.Resize(256, LANCZOS)`
  on a PIL image is the same call). Generated and reference images alike.
- FID (`evaluation.py` compute_fid): clean-fid's `fid.compute_fid(val2014_dir, fake_dir, model_name="inception_v3",
  custom_image_tranform=...)` in its default "clean" mode: every image file of each folder (fake: all of them; the
  reference: all of val2014, 40,504), each channel resized from 256 to 299 with PIL's bicubic filter on float32
  values and clipped to [0, 255] (clean-fid `resize.py` make_resizer("PIL", False, "bicubic")), then NVIDIA's
  TorchScript Inception `inception-2015-12-05.pt` without its own resize: `layers((x - 128) / 128)`, 2048 features
  (clean-fid `inception_torchscript.py` InceptionV3W); mean and unbiased covariance, Frechet distance with scipy's
  sqrtm. sid_fast accumulates the statistics in float64 (clean-fid averages float32 features in float32: the
  difference is in the 6th digit).
- CLIP score (`evaluation.py` compute_clip_score): the first how_many images of the natural-sorted `*.png` of the
  fake folder with the lines of captions.txt in order; each image after the crop and resize above goes through
  ToTensor, Normalize(0.5, 0.5) and back to uint8 as ((x + 1) * 127.5).clamp(0, 255) truncated (`tensor2pil`), then
  OpenCLIP ViT-g-14's preprocessing (PIL bicubic resize of the short side to 224, centre crop 224, OpenAI CLIP's mean
  and std); the caption is tokenised with OpenAI CLIP's tokenizer (77 tokens, truncated, end token last), the three
  tokens of "A photo depicts " are inserted after the start token, the row is cut to 77 and a non-zero last token set
  to the end token (49407); both embeddings in float32, their cosine similarity averaged.

The CLIP model: OpenCLIP's ViT-g-14 laion2b_s12b_b42k, read by transformers' CLIPModel from the Hugging Face format of
the same weights (laion publishes both): open_clip and clean-fid need torchvision, and the only torchvision wheels the
package index serves for torch 2.13 are CUDA builds, which do not import beside the CPU torch (checked: torchvision
0.28.0 raises "operator torchvision::nms does not exist"), so sid_fast computes both pipelines itself, on PIL, NumPy
and torch, and compares them with the libraries where they import (tests/test_t2i_evaluate.py). The tokenizer is
transformers' CLIPTokenizer of the same folder (the same BPE; without the ftfy package it cleans text with its basic
tokenizer instead of ftfy.fix_text, which changes nothing for plain-ASCII captions).

A doubt about the published numbers, for the record: SiD-LSG's script passes `--clip_model ViT-G/14`, but GigaGAN's
evaluation.py reads `--clip_model4eval` (default "ViT-B/32") through `parse_known_args`, which ignores unknown flags;
as published, that pairing scores CLIP with ViT-B/32 unless the authors' copy of evaluation.py differs. The paper
says ViT-g-14; `--clip` takes either model (a folder in Hugging Face's format).

`edm` is the protocol of sid_fast.fid (EDM's fid.py: the detector's own resize, `python -m sid_fast.fid calc`);
`--protocol edm` here runs it on the same folders (FID only), as a second, named number.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from sid_fast import dist
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.metrics import FeatureStats, frechet_distance, load_ref_stats, save_ref_stats
from sid_fast.metrics.clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPScoreError, CLIPScorer
from sid_fast.progress import Timer, bar, summary
from sid_fast.storage import CheckpointError

PROTOCOLS = ("gigagan-coco256", "edm")
EVAL_RES = 256  # eval_res
NUM = 30000  # how_many
COCO_VAL2014 = 40504  # images in COCO-2014 val
PREFIX = "A photo depicts "  # https://arxiv.org/abs/2104.08718, as GigaGAN prepends it
EOT = 49407
CONTEXT = 77
CLIP_SIZE = 224
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy")  # clean-fid's EXTENSIONS


class EvalError(ValueError):
    """A user-facing problem with the images, captions, reference or model files (one sentence naming it)."""


# ----------------------------------------------------------------------------------------------------------------
# The image transforms.


def crop_long_edge(img: PIL.Image.Image) -> PIL.Image.Image:
    """A centre square of the short side, with torchvision's center_crop offsets on PIL images."""
    w, h = img.size
    s = min(w, h)
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return img.crop((left, top, left + s, top + s))


def eval_image(path, size: int = EVAL_RES) -> PIL.Image.Image:
    """An image file as the protocol reads it: RGB, centre-cropped on its long edge, resized to `size` (LANCZOS)."""
    img = PIL.Image.open(path).convert("RGB")
    return crop_long_edge(img).resize((size, size), PIL.Image.LANCZOS)


def eval_array(a: np.ndarray, size: int = EVAL_RES) -> np.ndarray:
    """The same on a uint8 HWC array (GigaGAN's custom_image_tranform for clean-fid)."""
    return np.asarray(crop_long_edge(PIL.Image.fromarray(a)).resize((size, size), PIL.Image.LANCZOS))


def clean_resize(img: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's "clean" resize of a uint8 HWC image: each channel as float32 through PIL's bicubic filter, clipped
    to [0, 255]; float32 HWC."""
    chans = []
    for c in range(img.shape[2]):
        plane = PIL.Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((size, size), PIL.Image.BICUBIC)
        chans.append(np.asarray(plane).clip(0, 255).reshape(size, size, 1))
    return np.concatenate(chans, axis=2).astype(np.float32)


def roundtrip_uint8(img: PIL.Image.Image) -> PIL.Image.Image:
    """GigaGAN's ToTensor, Normalize(0.5, 0.5) and tensor2pil: float32 (p / 255 - 0.5) / 0.5, then ((x + 1) * 127.5)
    clamped and truncated to uint8 (which can lower a pixel by one level)."""
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.float32).div(255)
    x = x.sub(0.5).div(0.5)
    out = ((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(out)


def clip_pixels(img: PIL.Image.Image, size: int = CLIP_SIZE) -> torch.Tensor:
    """OpenCLIP's eval preprocessing of a PIL image: short side to `size` (PIL bicubic), centre crop, [0, 1], OpenAI
    CLIP's mean and std; float32 [3, size, size]."""
    w, h = img.size
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    img = img.resize((ow, oh), PIL.Image.BICUBIC)
    top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(OPENAI_CLIP_MEAN).reshape(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).reshape(3, 1, 1)
    return x.sub(mean).div(std)


# ----------------------------------------------------------------------------------------------------------------
# Tokens.


def prefixed_tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    """[N, 77] token ids as GigaGAN builds them: OpenAI CLIP's tokenisation (start, BPE, end, zeros; truncated to 77
    with the end token last), the tokens of "A photo depicts " inserted after the start token, cut to 77, and a
    non-zero last token replaced by the end token."""
    rows = []
    for text in captions:
        ids = tokenizer(text, truncation=True, max_length=CONTEXT)["input_ids"]
        rows.append(ids + [0] * (CONTEXT - len(ids)))
    tokens = torch.tensor(rows, dtype=torch.long)
    prefix = tokenizer(PREFIX)["input_ids"]
    if len(prefix) != 5:  # GigaGAN takes [1:4]: OpenAI CLIP's BPE makes "a", "photo", "depicts"
        raise EvalError(
            f"the CLIP tokenizer splits {PREFIX!r} into {len(prefix) - 2} tokens, not OpenAI CLIP's 3 (a, photo, "
            "depicts): not a CLIP tokenizer."
        )
    prefix = torch.tensor(prefix[1:4], dtype=torch.long)
    new = torch.cat([tokens[:, :1], prefix.expand(len(rows), -1), tokens[:, 1:]], dim=1)[:, :CONTEXT]
    last = new[:, CONTEXT - 1 :].clone()
    last[last > 0] = EOT
    return torch.cat([new[:, : CONTEXT - 1], last], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Files.


def natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split("([0-9]+)", name)]


def image_files(folder, what: str) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise EvalError(f"{p}: no such folder ({what}).")
    files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()), key=lambda f: f.name)
    if not files:
        raise EvalError(f"{p}: no image files ({what}).")
    return files


def check_fakes(images, captions_file, num: int) -> tuple[list[Path], list[str]]:
    """The generated images (exactly `num` PNGs 000000.png ... as t2i.sample names them, the whole folder, since the
    FID reads every image in it) and the first `num` caption lines."""
    files = image_files(images, "the generated images")
    pngs = sorted((f for f in files if f.suffix.lower() == ".png"), key=lambda f: natural_key(f.name))
    want = [f"{i:06d}.png" for i in range(num)]
    if len(files) != num or [f.name for f in pngs] != want:
        raise EvalError(
            f"{images}: the protocol scores exactly --num-images {num} images named 000000.png to {num - 1:06d}.png "
            f"(python -m sid_fast.t2i.sample --prompts CAPTIONS), found {len(files)} image files."
        )
    captions = read_captions(captions_file, num)
    return pngs, [captions[i] for i in range(num)]  # a PromptFile reads lines by index


def read_captions(captions_file, num: int):
    """The caption file, which must hold at least `num` lines."""
    try:
        captions = read_prompts(captions_file)
    except PromptError as e:
        raise EvalError(str(e)) from None
    if len(captions) < num:
        raise EvalError(f"{captions_file}: {len(captions)} caption lines, fewer than --num-images {num} images.")
    return captions


# ----------------------------------------------------------------------------------------------------------------
# FID (clean-fid's "clean" mode through NVIDIA's TorchScript Inception).


class CleanInception:
    """NVIDIA's `inception-2015-12-05.pt` called as clean-fid's InceptionV3W does without resizing inside:
    layers((x - 128) / 128) on [N, 3, 299, 299] float32 in [0, 255]."""

    def __init__(self, path, device):
        p = Path(path)
        if not p.is_file():
            raise EvalError(f"{p}: no such file (NVIDIA's TorchScript Inception, inception-2015-12-05.pt).")
        try:
            self.net = torch.jit.load(str(p), map_location=device).eval()
            self.layers = self.net.layers
        except (RuntimeError, AttributeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EvalError(
                f"{p}: not NVIDIA's TorchScript Inception with a `layers` module (inception-2015-12-05.pt): {reason}"
            ) from None
        self.device = device

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, torch.float32)
        return self.layers.forward((x - 128) / 128).reshape(x.shape[0], -1)


def clean_stats(files: list[Path], model: CleanInception, batch: int, desc: str) -> FeatureStats:
    """Mean and covariance sums of this rank's share (every world-th file), all-reduced."""
    mine = files[dist.rank() :: dist.world_size()]
    stats = None
    progress = bar(len(mine), desc, enabled=dist.rank() == 0)
    for k in range(0, len(mine), batch):
        arrs = [clean_resize(np.asarray(eval_image(f))) for f in mine[k : k + batch]]
        x = torch.from_numpy(np.stack(arrs).transpose(0, 3, 1, 2).copy())
        f = model.features(x)
        stats = stats or FeatureStats(f.shape[1], device=model.device)
        stats.add(f)
        progress.update(len(arrs))
    progress.close()
    if stats is None:  # a rank with no share still takes part in the all-reduce
        stats = FeatureStats(model.features(torch.zeros(1, 3, 299, 299)).shape[1], device=model.device)
    stats.all_reduce()
    return stats


def reference_stats(ref, model: CleanInception, batch: int, save=None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference: an .npz written by this command (--save-ref), or a folder of COCO-2014 val
    images (all of it, as clean-fid reads it)."""
    p = Path(ref)
    if p.is_file():
        try:
            return load_ref_stats(p)
        except ValueError as e:
            raise EvalError(str(e)) from None
    files = image_files(p, "the reference images, COCO-2014 val2014")
    if len(files) != COCO_VAL2014:
        click.echo(f"note: {p} holds {len(files)} images; COCO-2014 val2014 has {COCO_VAL2014} (the published FIDs).")
    mu, sigma = clean_stats(files, model, batch, "reference").mean_cov()
    if save is not None and dist.rank() == 0:
        save_ref_stats(save, mu, sigma)
    return mu, sigma


# ----------------------------------------------------------------------------------------------------------------
# CLIP score.


@torch.no_grad()
def clip_score(files: list[Path], captions: list[str], scorer: CLIPScorer, batch: int) -> float:
    """The mean cosine similarity of image i and caption i (GigaGAN's pipeline, module docstring), over ranks."""
    idx = list(range(len(files)))[dist.rank() :: dist.world_size()]
    dtype = next(scorer.model.parameters()).dtype
    total = torch.zeros(2, dtype=torch.float64, device=scorer.device)
    progress = bar(len(idx), "CLIP", enabled=dist.rank() == 0)
    for k in range(0, len(idx), batch):
        part = idx[k : k + batch]
        pixels = [clip_pixels(roundtrip_uint8(eval_image(files[i])), scorer.size) for i in part]
        pixels = torch.stack(pixels).to(scorer.device)
        tokens = prefixed_tokens(scorer.tokenizer, [captions[i] for i in part]).to(scorer.device)
        m = scorer.model  # CLIPModel: projections of the post-LayerNorm class token and of the end token's state
        img = m.visual_projection(m.vision_model(pixel_values=pixels.to(dtype)).pooler_output)
        txt = m.text_projection(m.text_model(input_ids=tokens).pooler_output)
        s = F.cosine_similarity(img.float(), txt.float(), dim=1)
        total += torch.stack([s.double().sum(), torch.tensor(float(len(part)), dtype=torch.float64, device=s.device)])
        progress.update(len(part))
    progress.close()
    if dist.world_size() > 1:
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------------------------------------------


def generate_images(network, teacher, captions_file, images, num: int, batch: int, device, steps=None) -> None:
    """The generator's images for the first `num` captions (image i: caption i, seed i, as the official
    generate_onestep.py and t2i.sample make them) into the empty or new folder `images`, every rank its share;
    `steps`: the generator's sampling steps (default: its K)."""
    from sid_fast.t2i.sample import generate, resolve_network  # start-up: the sampler's code, only with --network

    out = Path(images)
    if out.exists() and any(out.iterdir()):
        raise EvalError(f"{out}: not empty; --network writes the generated images into a new or empty --images folder.")
    captions = read_captions(captions_file, num)
    network = resolve_network(str(network))
    if teacher is None:
        from sid_fast.t2i.export import is_pipeline_folder  # start-up: only with --network

        if not is_pipeline_folder(network):
            raise EvalError("--teacher is required unless --network is a pipeline folder (hub convert --teacher).")
        teacher = network
    todo = [(i, captions[i], i) for i in range(num)]
    generate(network, teacher, todo, out, batch, torch.float32, device, log=lambda *a: None, steps=steps)
    dist.barrier()


def evaluate(protocol, images, captions_file, ref, detector, clip, num, batch, device, save_ref=None) -> dict:
    """{"protocol", "num", "fid", ["clip_score"]} of the folder `images` (see the module docstring)."""
    timer = Timer()
    files, captions = check_fakes(images, captions_file, num)
    out = dict(protocol=protocol, num=num, images=str(images))
    if protocol == "edm":
        from sid_fast.metrics.fid import fid_against  # start-up: the EDM protocol's code, loaded when chosen
        from sid_fast.metrics.inception import DetectorError, load_detector  # start-up: likewise

        try:
            det = load_detector(detector, device)
        except DetectorError as e:
            raise EvalError(str(e)) from None
        stats = FeatureStats(det.feature_dim, device=device)
        mine = files[dist.rank() :: dist.world_size()]
        for k in range(0, len(mine), batch):
            imgs = [torch.from_numpy(np.asarray(PIL.Image.open(f).convert("RGB")).copy()) for f in mine[k : k + batch]]
            stats.add(det.features(torch.stack(imgs).permute(0, 3, 1, 2).to(device)))
        stats.all_reduce()
        out["fid"] = fid_against(stats, ref)
    else:
        model = CleanInception(detector, device)
        mu_ref, sigma_ref = reference_stats(ref, model, batch, save=save_ref)
        mu, sigma = clean_stats(files, model, batch, "generated").mean_cov()
        out["fid"] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        if clip is not None:
            try:
                scorer = CLIPScorer.load(clip, device)
            except CLIPScoreError as e:
                raise EvalError(str(e)) from None
            out["clip_score"] = clip_score(files, captions, scorer, batch)
    out["seconds"] = round(timer.seconds, 1)
    return out


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="gigagan-coco256", show_default=True,
              help="gigagan-coco256: SiD-LSG's published FID-30k and CLIP; edm: sid_fast.fid's FID")  # fmt: skip
@click.option("--images", help="Generated images 000000.png ... (t2i.sample --prompts CAPTIONS)", metavar="DIR",
              required=True)  # fmt: skip
@click.option("--captions", "captions_file", help="Caption file, line i for image i (GigaGAN's captions.txt)",
              metavar="FILE", required=True)  # fmt: skip
@click.option("--ref", help="COCO-2014 val2014 folder, or an .npz of --save-ref (edm: sid_fast.fid ref's npz)",
              metavar="DIR|NPZ", required=True)  # fmt: skip
@click.option("--detector", help="NVIDIA's TorchScript Inception, inception-2015-12-05.pt", metavar="PT",
              required=True)  # fmt: skip
@click.option("--clip", help="CLIP model folder in Hugging Face's format (the paper: ViT-g-14 laion2B-s12B-b42K)",
              metavar="DIR")  # fmt: skip
@click.option(
    "--num-images",
    "num",
    help="Images scored (the paper: 30000)",
    type=click.IntRange(2),
    default=NUM,
    show_default=True,
)
@click.option("--batch", help="Images per network call per GPU", type=click.IntRange(1), default=64, show_default=True)
@click.option("--save-ref", help="Also write the reference statistics to this .npz", metavar="NPZ")
@click.option("--json", "json_path", help="Append the result as a JSON line to this file", metavar="FILE")
@click.option("--network", help="Make the images first with this generator (t2i.sample's --network)", metavar="DIR|ID")
@click.option("--teacher", help="With --network: its teacher's Stable Diffusion folder (default: a pipeline --network)",
              metavar="DIR")  # fmt: skip
@click.option("--steps", help="With --network: the generator's sampling steps (default: the K it was trained for)",
              type=click.IntRange(1, 64))  # fmt: skip
def main(protocol, images, captions_file, ref, detector, clip, num, batch, save_ref, json_path, network, teacher,
         steps):  # fmt: skip
    """Zero-shot COCO-2014 FID and CLIP score of text-to-image samples, by a named protocol."""
    if steps is not None and network is None:
        raise click.UsageError("--steps is for --network (the generator's sampling steps).")
    device = dist.init()
    try:
        if network is not None:
            generate_images(network, teacher, captions_file, images, num, batch, device, steps)
        out = evaluate(protocol, images, captions_file, ref, detector, clip, num, batch, device, save_ref=save_ref)
    except (EvalError, ValueError, CheckpointError) as e:  # SDError is a ValueError
        raise click.ClickException(str(e)) from None
    if dist.rank() == 0:
        click.echo(json.dumps(out))
        click.echo(summary(f"{protocol}: FID {out['fid']:.4f}" + (f", CLIP {out['clip_score']:.4f}"
                           if "clip_score" in out else ""), num, "images", out["seconds"]))  # fmt: skip
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(out) + "\n")
    dist.finish()


if __name__ == "__main__":
    main()
