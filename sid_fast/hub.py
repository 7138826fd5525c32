"""Generators in the format the field shares weights in: a folder of `model.safetensors`, `config.json` and a model card
(`README.md`), loadable by path or by a Hugging Face Hub id, and pushed to the Hub by one command.

    runs/00000-digits/network-snapshot-000000048128/
        model.safetensors   the network's fp32 state dict (safetensors: tensors and a JSON header, nothing executable)
        config.json         {"format": "sid_fast.network", "version": 1, "class_name", "init_kwargs",
                             "meta": {"kind": "generator", "sigma_init", "steps", "noise_type", "alpha",
                                      "teacher", "preset", "kimg", "metrics": {...}}}
        README.md           the model card: what it is, how it was made, how to sample it

The trainer writes every snapshot so; `sid_fast.sample`, `sid_fast.fid`, `sid_fast.export` and `--sid-model` take a
folder, a Hub id (`owner/name`, or `hf://owner/name[@revision]`) or a `.pt`/`.pkl` file alike
(`sid_fast.checkpoints.load_network_file`). Loading builds the network named by config.json on the meta device,
compares every key and shape with the file's tensors, and only then builds it for real and loads them (`strict=True`):
a folder whose tensors do not match its config is refused in one sentence. Why safetensors: a pickle (EDM's `.pkl`)
can carry code that runs when it is loaded, so sid_fast reads pickles and `.pt` files through allow-lists; a
safetensors file is a JSON header and raw tensor bytes, so it holds no code to refuse, by construction
(docs/reliability.md).

    python -m sid_fast.hub convert runs/.../network-snapshot-000000048128.pt out/digits-sid   # a .pt -> a folder
    python -m sid_fast.hub push out/digits-sid you/digits-sid [--private]                  # needs a Hub token
    python -m sid_fast.hub download you/digits-sid                                         # into the Hub cache

huggingface_hub is imported only when a Hub id is given or a push is asked for (`pip install huggingface_hub`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from sid_fast import fewstep
from sid_fast.checkpoints import load_network_file
from sid_fast.files import DestinationError, check_folder_destination
from sid_fast.sampling import generate
from sid_fast.storage import (  # noqa: F401  (the folder names and readers this module has always offered)
    CARD,
    CONFIG,
    FOLDER_FILES,
    SID_FAST_FORMAT,
    SID_FAST_FORMAT_VERSION,
    WEIGHTS,
    CheckpointError,
    _error,
    atomic_folder,
    atomic_write_text,
    download,
    hub_id,
    is_folder,
    plain_value,
    read_folder,
)
from sid_fast.t2i import export as t2i_export
from sid_fast.t2i.sd import SDError, load_sd

# ----------------------------------------------------------------------------------------------------------------
# Writing.


def model_card(class_name: str, init_kwargs: dict, meta: dict, repo_id: str | None = None) -> str:
    """The README.md of a generator folder: YAML front matter for the Hub, what the network is, how it was made."""
    kind = meta.get("kind", "network")
    label_dim = int(init_kwargs.get("label_dim", 0) or 0)
    res, ch = init_kwargs.get("img_resolution"), init_kwargs.get("img_channels")
    classes = f", {label_dim} classes" if label_dim else ""
    lines = [
        "---",
        "library_name: sid_fast",
        "tags:",
        "- score-identity-distillation",
        "- one-step-generation",
        "- diffusion-distillation",
    ]
    if label_dim == 0:
        lines.append("pipeline_tag: unconditional-image-generation")
    lines += [
        "---",
        "",
        f"# {steps_title(meta) if kind == 'generator' else 'Network'} distilled with Score identity Distillation",
        "",
        f"A network of class {class_name} ({res}x{res}x{ch}{classes}) written by sid_fast.",
    ]
    if kind == "generator" and int(meta.get("steps", 1)) == 1:
        lines += [
            "It maps Gaussian noise z to an image in one network call: x = G(sigma_init * z, sigma_init)"
            f" with sigma_init = {meta.get('sigma_init')}.",
        ]
    elif kind == "generator":
        sigmas = ", ".join(f"{s:.4g}" for s in fewstep.edm_sigmas(float(meta["sigma_init"]), int(meta["steps"])))
        lines += [
            f"It maps Gaussian noise z to an image in {meta['steps']} network calls: x_0 = G(sigma_0 z, sigma_0), then"
            f" x_i = G(x_(i-1) + sigma_i n_i, sigma_i) with sigma = {sigmas} and {meta.get('noise_type')} re-noising"
            " n_i (sid_fast.fewstep).",
        ]
    facts = [(k, meta.get(k)) for k in ("teacher", "preset", "kimg", "alpha") if meta.get(k) is not None]
    for name, value in (meta.get("metrics") or {}).items():
        facts.append((name, value))
    if facts:
        lines += ["", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts]
    where = repo_id or "PATH_OR_HUB_ID"
    lines += [
        "",
        "## Sampling",
        "",
        "```bash",
        f"python -m sid_fast.sample --network {where} --seeds 0-63 --outdir out --grid grid.png",
        "```",
        "",
        "```python",
        "from sid_fast.hub import load_generator",
        f'G, info = load_generator("{where}")',
        "images = G.sample(seeds=range(16))  # [16, C, H, W] in [-1, 1]",
        "```",
        "",
        "Files: `model.safetensors` (fp32 weights), `config.json` (class, init kwargs, how it was made). References:",
        'Zhou et al., "Score identity Distillation", ICML 2024; Karras et al., "Elucidating the Design Space of',
        'Diffusion-Based Generative Models", NeurIPS 2022.',
        "",
    ]
    return "\n".join(lines)


def steps_title(meta: dict) -> str:
    steps = int(meta.get("steps", 1))
    return "One-step generator" if steps == 1 else f"{steps}-step generator"


def folder_config(class_name: str, init_kwargs: dict, meta: dict) -> dict:
    return dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=class_name,
        init_kwargs=plain_value(init_kwargs),
        meta=plain_value(meta),
    )


def save_folder(path, net: torch.nn.Module, init_kwargs: dict, overwrite: bool = False, **meta) -> Path:
    """Write `net` (its fp32 CPU state dict) as a generator folder at `path`, atomically: the three files are written
    and fsynced in a temporary folder beside it, which is then renamed into place. A kill leaves the previous folder
    or the new one (an existing folder is first renamed to `<name>.old.tmp`; a kill between the two renames is undone
    by the next write of the same name, which also removes leftover `.tmp` folders)."""

    tensors = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    return write_folder(
        path, type(net).__name__, init_kwargs, tensors, meta, error=CheckpointError, overwrite=overwrite
    )


def write_folder(
    path, class_name: str, init_kwargs: dict, tensors: dict, meta: dict, error=None, overwrite: bool = False
) -> Path:
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = folder_config(class_name, init_kwargs, meta)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(class_name, config["init_kwargs"], config["meta"]))

    return atomic_folder(path, fill, error, own=FOLDER_FILES, overwrite=overwrite)


def update_meta(path, **meta) -> None:
    """Set entries of a generator folder's `meta` (e.g. the snapshot's metrics once evaluated): config.json and the
    model card rewritten atomically (each a temporary file renamed over the old one); the weights are not touched."""

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    config["meta"] = dict(config.get("meta", {}), **plain_value(meta))
    atomic_write_text(path / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(path / CARD, model_card(config["class_name"], config["init_kwargs"], config["meta"]))


# ----------------------------------------------------------------------------------------------------------------
# Reading.


def load_generator(spec):
    """(network in eval mode, info) from a folder, a Hub id, or a `.pt`/`.pkl` file; the network gets a
    `sample(seeds, class_labels=None)` method when it is a one-step generator (see `OneStepSampler`)."""

    net, info = load_network_file(spec)
    return OneStepSampler(net, info), info


class OneStepSampler(torch.nn.Module):
    """A loaded generator with the project's sampling conventions attached: per-seed latents (EDM's per-image
    generators) and the generator's own steps (x = G(sigma_init z, sigma_init) for one step), as `python -m
    sid_fast.sample` draws them."""

    def __init__(self, net: torch.nn.Module, info: dict):
        super().__init__()
        self.net = net
        self.info = info

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @torch.no_grad()
    def sample(self, seeds, device=None, class_idx=None) -> torch.Tensor:

        device = torch.device(device or next(self.net.parameters()).device)
        return generate(self.net, self.info, list(seeds), device, sampler="auto", class_idx=class_idx)


# ----------------------------------------------------------------------------------------------------------------
# Converting and pushing.


def convert(src, dst, overwrite: bool = False, teacher=None, base_model=None, license=None) -> Path:
    """A sid_fast `.pt` network file (or an EDM/SiD pickle, with its recorded kwargs) written as a folder. A
    text-to-image generator (a diffusers UNet folder of sid_fast, or an official SiD-LSG pickle) with its Stable
    Diffusion `teacher` folder written as a full diffusers pipeline folder (sid_fast.t2i.export.save_pipeline_folder);
    an official pickle without a teacher as a UNet folder. `base_model` (the teacher's Hub id) and `license` go into
    the text-to-image folder's sid_fast.json and card. A folder `dst` holding files other than the folder's own is
    refused unless `overwrite` (then they are kept)."""
    extra = dict(base_model=base_model, license=license)
    if t2i_export.is_generator(src):
        try:
            if teacher is not None:
                check_folder_destination(dst, lambda n: n in t2i_export.PIPELINE_FILES, "hub convert", overwrite)
                return t2i_export.save_pipeline_folder(dst, src, teacher, overwrite=overwrite, **extra)
            if t2i_export.is_generator_folder(src):
                raise CheckpointError(
                    f"{src}: a text-to-image generator becomes a pipeline folder with its teacher's text encoder, "
                    "tokenizer, VAE and scheduler; give the teacher's diffusers folder with --teacher."
                )
            check_folder_destination(dst, lambda n: n in t2i_export.FOLDER_FILES, "hub convert", overwrite)
            unet, meta = t2i_export.load_unet_folder(src)
            meta = dict(meta, **{k: v for k, v in extra.items() if v is not None})
            return t2i_export.save_unet_folder(dst, unet, overwrite=overwrite, **meta)
        except (DestinationError, SDError) as e:
            raise CheckpointError(str(e)) from None
    if base_model is not None or license is not None:
        raise CheckpointError(f"{src}: --base-model and --license are for text-to-image generators.")
    if teacher is not None:
        raise CheckpointError(
            f"--teacher {teacher}: only a text-to-image generator folder is converted with a teacher."
        )

    try:  # before reading the network (save_folder checks again as it writes)
        check_folder_destination(dst, lambda name: name in FOLDER_FILES, "hub convert", overwrite)
    except DestinationError as e:
        raise CheckpointError(str(e)) from None
    net, info = load_network_file(src)
    meta = dict(info.get("meta") or {})
    meta.setdefault("converted_from", Path(str(src)).name)
    return save_folder(dst, net, info["init_kwargs"], overwrite=overwrite, **meta)


def push(folder, repo_id: str, private: bool = False, token: str | None = None, message: str | None = None) -> str:
    """Upload a generator folder to the Hub repository `repo_id` (created if missing); returns the commit URL. The
    folder is loaded first (a folder that does not load is not pushed), and its model card names the repository."""

    folder = Path(folder)
    t2i = t2i_export.is_generator_folder(folder)
    # Refuse a broken folder before anything leaves the machine.
    if t2i:
        try:
            _, meta = t2i_export.load_unet_folder(folder)
            if t2i_export.is_pipeline_folder(folder):
                load_sd(folder, unet=False)
        except SDError as e:
            raise CheckpointError(str(e)) from None
        card = t2i_export.folder_card(folder, where=repo_id)
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != CARD)
    else:
        load_network_file(folder)
        config = json.loads((folder / CONFIG).read_text())
        card = model_card(config["class_name"], config["init_kwargs"], config.get("meta", {}), repo_id=repo_id)
        files = [WEIGHTS, CONFIG]
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise _error("push needs huggingface_hub: pip install huggingface_hub.") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / CARD).write_text(card)
            api.upload_file(path_or_fileobj=str(Path(tmp) / CARD), path_in_repo=CARD, repo_id=repo_id)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            allow_patterns=files,
            commit_message=message or f"sid_fast generator {folder.name}",
        )
    except Exception as e:  # no token, no permission, network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(
            f"{repo_id}: the push failed ({type(e).__name__}: {reason}); log in with `hf auth login` or pass --token."
        ) from None
    return str(getattr(info, "commit_url", info))


@click.group()
def main():
    """Generator folders (model.safetensors + config.json + model card): convert, push to and fetch from the Hub."""


@main.command("convert")
@click.argument("src", metavar="NETWORK")
@click.argument("dst", metavar="FOLDER", type=click.Path(file_okay=False))
@click.option(
    "--teacher", metavar="DIR", help="Text-to-image: the Stable Diffusion folder the generator was distilled from"
)
@click.option("--base-model", metavar="ID", help="Text-to-image: the teacher's Hub id, for the model card")
@click.option("--license", "license_", metavar="ID", help="Text-to-image: the card's license (e.g. the teacher's)")
@click.option("--overwrite", is_flag=True, help="Write into a FOLDER that holds other files (they are kept).")
def convert_cmd(src, dst, teacher, base_model, license_, overwrite):
    """Write NETWORK (a sid_fast .pt, or an EDM/SiD .pkl) as the generator folder FOLDER; a text-to-image generator
    (a diffusers UNet folder from train.py or state export, or an official SiD-LSG .pkl) with --teacher as a full
    diffusers pipeline folder that samples it in one call; an official SiD-LSG .pkl alone as a UNet folder."""

    try:
        out = convert(src, dst, overwrite=overwrite, teacher=teacher, base_model=base_model, license=license_)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    if teacher is not None:
        names = t2i_export.PIPELINE_FILES
    elif t2i_export.is_generator(src):
        names = t2i_export.FOLDER_FILES
    else:
        names = FOLDER_FILES
    click.echo(f"wrote {out}/ ({', '.join(names)})")


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--token", default=None, help="Hub token (default: the one `hf auth login` stored, or HF_TOKEN).")
@click.option("--message", default=None, help="Commit message.")
def push_cmd(folder, repo_id, private, token, message):
    """Upload the generator FOLDER (a sid_fast generator folder, or a text-to-image UNet or pipeline folder) to the
    Hub repository REPO_ID (owner/name)."""

    try:
        url = push(folder, repo_id, private=private, token=token, message=message)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pushed {folder} to {repo_id}: {url}")


@main.command("download")
@click.argument("repo_id")
def download_cmd(repo_id):
    """Fetch the generator REPO_ID (owner/name[@revision]) into the Hub cache and print its folder."""

    parsed = hub_id(repo_id if repo_id.startswith("hf://") else "hf://" + repo_id)
    if parsed is None:
        raise click.BadParameter(f"{repo_id!r} is not a Hub id (owner/name[@revision]).", param_hint="REPO_ID")
    try:
        click.echo(download(*parsed))
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
