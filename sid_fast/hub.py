"""Generators in the format the field shares weights in: a folder of `model.safetensors`, `config.json` and a model card
(`README.md`), loadable by path or by a Hugging Face Hub id, and pushed to the Hub by one command.

    runs/00000-digits/network-snapshot-000000048128/
        model.safetensors   the network's fp32 state dict (safetensors: tensors and a JSON header, nothing executable)
        config.json         {"format": "sid_fast.network", "version": 1, "class_name", "init_kwargs",
                             "meta": {"kind": "generator", "sigma_init", "alpha", "teacher", "preset", "kimg",
                                      "metrics": {...}}}
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
import os
import re
import shutil
import tempfile
from pathlib import Path

import click
import torch

from sid_fast.files import DestinationError, check_folder_destination, fsync_dir, umask_modes

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FOLDER_FILES = (WEIGHTS, CONFIG, CARD)

# owner/name as the Hub spells repository ids (letters, digits, '-', '_', '.'), optionally hf:// and @revision.
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?$")


def _error(msg: str):
    from sid_fast.checkpoints import CheckpointError

    return CheckpointError(msg)


def is_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).exists()


def hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `spec` names a Hub repository rather than a local path; None otherwise. A string that
    exists on disk is always a path; `hf://owner/name` is always an id; a bare `owner/name` that does not exist
    locally and has no file suffix is taken as an id."""
    s = str(spec)
    if not s.startswith("hf://") and (os.path.exists(s) or s.startswith((".", "/", "~")) or s.count("/") != 1):
        return None
    m = _HUB_ID.match(s)
    if m is None or (not s.startswith("hf://") and Path(m.group(1)).suffix in (".pt", ".pkl", ".safetensors")):
        return None
    return m.group(1), m.group(2)


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
        f"# {'One-step generator' if kind == 'generator' else 'Network'} distilled with Score identity Distillation",
        "",
        f"A network of class {class_name} ({res}x{res}x{ch}{classes}) written by sid_fast.",
    ]
    if kind == "generator":
        lines += [
            "It maps Gaussian noise z to an image in one network call: x = G(sigma_init * z, sigma_init)"
            f" with sigma_init = {meta.get('sigma_init')}.",
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


def folder_config(class_name: str, init_kwargs: dict, meta: dict) -> dict:
    from sid_fast.checkpoints import SID_FAST_FORMAT, SID_FAST_FORMAT_VERSION, _plain_value

    return dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=class_name,
        init_kwargs=_plain_value(init_kwargs),
        meta=_plain_value(meta),
    )


def save_folder(path, net: torch.nn.Module, init_kwargs: dict, overwrite: bool = False, **meta) -> Path:
    """Write `net` (its fp32 CPU state dict) as a generator folder at `path`, atomically: the three files are written
    and fsynced in a temporary folder beside it, which is then renamed into place. A kill leaves the previous folder
    or the new one (an existing folder is first renamed to `<name>.old.tmp`; a kill between the two renames is undone
    by the next write of the same name, which also removes leftover `.tmp` folders)."""
    from sid_fast.checkpoints import CheckpointError

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
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = folder_config(class_name, init_kwargs, meta)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(class_name, config["init_kwargs"], config["meta"]))

    return atomic_folder(path, fill, error, own=FOLDER_FILES, overwrite=overwrite)


def atomic_folder(path, fill, error=None, own=(), overwrite: bool = False) -> Path:
    """The folder `path` as `fill(tmp)` writes it into a temporary folder beside it: every file fsynced, then renamed
    into place. A kill leaves the previous folder or the new one (an existing folder is first renamed to
    `<name>.old.tmp`; a kill between the two renames is undone by the next write of the same name, which also removes
    leftover `.tmp` folders). An OSError becomes `error`'s one sentence when given.

    `own` names the files `fill` writes: an existing folder holding anything else is refused before any work unless
    `overwrite`, and then those other entries are moved into the new folder, so only the command's own files are
    replaced."""
    path = Path(path)
    try:
        foreign = check_folder_destination(path, lambda name: name in own, "this command", overwrite)
    except DestinationError as e:
        if error is None:
            raise
        raise error(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.with_name(f"{path.name}.old.tmp")
    if previous.is_dir() and not path.exists():  # killed between the two renames below: the old folder comes back
        os.replace(previous, path)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        umask_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 become the umask's modes, as open() gives
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted({f.parent for f in tmp.rglob("*")} - {tmp}):
            fsync_dir(d)
        for name in foreign:  # --overwrite: the user's own entries move into the new folder, untouched
            os.replace(path / name, tmp / name)
        old = None
        if path.exists():  # the same snapshot written again (a resumed run): swap, then drop the old folder
            old = previous
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and error is not None:
            kept = "the previous folder is intact" if path.exists() else "no earlier folder existed"
            raise error(f"{path}: writing failed ({e.strerror or e}); {kept}.") from None
        raise
    return path


def update_meta(path, **meta) -> None:
    """Set entries of a generator folder's `meta` (e.g. the snapshot's metrics once evaluated): config.json and the
    model card rewritten atomically (each a temporary file renamed over the old one); the weights are not touched."""
    from sid_fast.checkpoints import _plain_value, atomic_write_text

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    config["meta"] = dict(config.get("meta", {}), **_plain_value(meta))
    atomic_write_text(path / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(path / CARD, model_card(config["class_name"], config["init_kwargs"], config["meta"]))


# ----------------------------------------------------------------------------------------------------------------
# Reading.


def read_folder(path) -> dict:
    """The record of a generator folder, in the form of a sid_fast `.pt` file (format, version, class_name,
    init_kwargs, state_dict, meta), for `checkpoints.network_from_record`, which checks the tensors against the
    network config.json names. Any fault is one CheckpointError sentence naming the file."""
    from safetensors import SafetensorError, safe_open

    from sid_fast.checkpoints import SID_FAST_FORMAT, SID_FAST_FORMAT_VERSION

    path = Path(path)
    cfg_path, weights = path / CONFIG, path / WEIGHTS
    if not cfg_path.exists():
        raise _error(
            f"{path}: no {CONFIG}; a sid_fast generator folder holds {WEIGHTS} and {CONFIG} (convert a .pt file with "
            "`python -m sid_fast.hub convert`)."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"{cfg_path}: not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("format") != SID_FAST_FORMAT:
        raise _error(f'{cfg_path}: not a sid_fast network config (no "format": "{SID_FAST_FORMAT}").')
    if config.get("version") != SID_FAST_FORMAT_VERSION:
        raise _error(f"{cfg_path}: format version {config.get('version')}, expected {SID_FAST_FORMAT_VERSION}.")
    class_name, init_kwargs = config.get("class_name"), config.get("init_kwargs")
    if not isinstance(class_name, str) or not isinstance(init_kwargs, dict):
        raise _error(f'{cfg_path}: needs "class_name" (a string) and "init_kwargs" (an object).')
    if not weights.exists():
        raise _error(f"{path}: no {WEIGHTS} beside {CONFIG}.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(f"{weights}: not a readable safetensors file ({reason}).") from None
    meta = config.get("meta", {})
    record = dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=class_name,
        init_kwargs=init_kwargs,
        state_dict=tensors,
        meta=meta if isinstance(meta, dict) else {},
    )
    return record


def download(repo_id: str, revision: str | None = None) -> Path:
    """The folder of Hub repository `repo_id` (its config.json, model.safetensors and README.md), fetched into
    huggingface_hub's cache (or found there offline). One CheckpointError sentence for every failure."""
    spec = repo_id + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise _error(
            f"{spec}: looks like a Hugging Face Hub id, and loading one needs huggingface_hub "
            "(pip install huggingface_hub); for a local folder give a path that exists."
        ) from None
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=list(FOLDER_FILES))
    except Exception as e:  # huggingface_hub's errors: not found, offline and not cached, gated, network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(
            f"{spec}: not a local path, and the Hugging Face Hub could not provide it ({type(e).__name__}: {reason}); "
            "offline, only ids already in the Hub cache load."
        ) from None
    if not is_folder(local):
        raise _error(f"{spec}: the Hub repository has no {CONFIG}; it is not a sid_fast generator folder.")
    return Path(local)


def load_generator(spec):
    """(network in eval mode, info) from a folder, a Hub id, or a `.pt`/`.pkl` file; the network gets a
    `sample(seeds, class_labels=None)` method when it is a one-step generator (see `OneStepSampler`)."""
    from sid_fast.checkpoints import load_network_file

    net, info = load_network_file(spec)
    return OneStepSampler(net, info), info


class OneStepSampler(torch.nn.Module):
    """A loaded generator with the project's sampling conventions attached: per-seed latents (EDM's per-image
    generators) and x = G(sigma_init z, sigma_init), as `python -m sid_fast.sample` draws them."""

    def __init__(self, net: torch.nn.Module, info: dict):
        super().__init__()
        self.net = net
        self.info = info

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @torch.no_grad()
    def sample(self, seeds, device=None, class_idx=None) -> torch.Tensor:
        from sid_fast.sampling import generate

        device = torch.device(device or next(self.net.parameters()).device)
        return generate(self.net, self.info, list(seeds), device, sampler="auto", class_idx=class_idx)


# ----------------------------------------------------------------------------------------------------------------
# Converting and pushing.


def convert(src, dst, overwrite: bool = False) -> Path:
    """A sid_fast `.pt` network file (or an EDM/SiD pickle, with its recorded kwargs) written as a folder. A folder
    `dst` holding files other than a generator folder's is refused unless `overwrite` (then they are kept)."""
    from sid_fast.checkpoints import CheckpointError, load_network_file

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
    from sid_fast.checkpoints import load_network_file

    folder = Path(folder)
    load_network_file(folder)  # refuse a broken folder before anything leaves the machine
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise _error("push needs huggingface_hub: pip install huggingface_hub.") from None
    config = json.loads((folder / CONFIG).read_text())
    card = model_card(config["class_name"], config["init_kwargs"], config.get("meta", {}), repo_id=repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / CARD).write_text(card)
            api.upload_file(path_or_fileobj=str(Path(tmp) / CARD), path_in_repo=CARD, repo_id=repo_id)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            allow_patterns=[WEIGHTS, CONFIG],
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
@click.option("--overwrite", is_flag=True, help="Write into a FOLDER that holds other files (they are kept).")
def convert_cmd(src, dst, overwrite):
    """Write NETWORK (a sid_fast .pt, or an EDM/SiD .pkl) as the generator folder FOLDER."""
    from sid_fast.checkpoints import CheckpointError

    try:
        out = convert(src, dst, overwrite=overwrite)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}/ ({', '.join(FOLDER_FILES)})")


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--token", default=None, help="Hub token (default: the one `hf auth login` stored, or HF_TOKEN).")
@click.option("--message", default=None, help="Commit message.")
def push_cmd(folder, repo_id, private, token, message):
    """Upload the generator FOLDER to the Hub repository REPO_ID (owner/name)."""
    from sid_fast.checkpoints import CheckpointError

    try:
        url = push(folder, repo_id, private=private, token=token, message=message)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pushed {folder} to {repo_id}: {url}")


@main.command("download")
@click.argument("repo_id")
def download_cmd(repo_id):
    """Fetch the generator REPO_ID (owner/name[@revision]) into the Hub cache and print its folder."""
    from sid_fast.checkpoints import CheckpointError

    parsed = hub_id(repo_id if repo_id.startswith("hf://") else "hf://" + repo_id)
    if parsed is None:
        raise click.BadParameter(f"{repo_id!r} is not a Hub id (owner/name[@revision]).", param_hint="REPO_ID")
    try:
        click.echo(download(*parsed))
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
